"""SLIC superpixels in torch, batched over windows and run on the windows' device.

The algorithm is scikit-image's ``slic`` (colour in CIELAB, distance
``|Δlab|²/m² + |Δyx|²/S²`` with m the compactness and S the grid step, the same initial grid,
up to ten Lloyd-style iterations, stopping early when nothing moves, small pieces merged into a
neighbour) with two changes that make it cheap on any device:

- each pixel compares itself with the 3 × 3 initial-grid centres around its own cell (the original
  SLIC search window, ±S) instead of scikit-image's ±2S box: one iteration is a few elementwise
  passes over a (B, 5, 9, pixels) tensor, with no Python loop over centres;
- the window is area-averaged (in RGB, before the Lab conversion) by an integer factor so that a
  superpixel is still about ``WORK_STEP`` pixels across, and the labels are brought back to full
  resolution by nearest neighbour. A region is then off by at most half that factor at its boundary,
  well below the VFM patch the labels are pooled onto.

The connectivity clean-up is label propagation with pointer jumping (each pixel takes the smallest
index among its 4-neighbours of the same superpixel until nothing changes), then every piece
smaller than half a superpixel joins its largest neighbouring piece, as scikit-image's
``min_size_factor=0.5``.

``slic_skimage`` is scikit-image's own SLIC on the CPU, kept for comparison.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# Superpixel side (pixels of the working image) the iterations keep at least; see the module docstring.
WORK_STEP = 8
MAX_ITER = 10
MIN_SIZE_FACTOR = 0.5  # pieces smaller than this share of a superpixel join a neighbour (scikit-image's default)

# sRGB (D65) -> XYZ, and the D65 white point of the CIE 1931 2° observer: scikit-image's rgb2lab.
_XYZ_FROM_RGB = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
_D65_WHITE = (0.95047, 1.0, 1.08883)


def rgb_to_lab(images: Tensor) -> Tensor:
    """sRGB (B, 3, H, W) in [0, 1] -> CIELAB (B, 3, H, W) float32, the formulas of ``skimage.color.rgb2lab``."""
    rgb = images.float().clamp(0, 1)
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    m = torch.tensor(_XYZ_FROM_RGB, dtype=rgb.dtype, device=rgb.device)
    white = torch.tensor(_D65_WHITE, dtype=rgb.dtype, device=rgb.device)
    xyz = torch.einsum("ij,bjhw->bihw", m, linear) / white[:, None, None]
    f = torch.where(xyz > 0.008856, xyz.clamp_min(1e-12) ** (1 / 3), 7.787 * xyz + 16 / 116)
    fx, fy, fz = f.unbind(1)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=1)


def grid_steps(height: int, width: int, n_segments: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """scikit-image's ``regular_grid`` in 2-D: ((start_y, start_x), (step_y, step_x)) of the initial centres."""
    steps = [math.sqrt(height * width / n_segments)] * 2
    if height * width <= n_segments:
        return (0, 0), (1, 1)
    short, long = sorted((height, width))
    if short < steps[0]:  # the grid is one row (or column): the long side gets all the centres
        steps = [float(short), long / n_segments]
        if height > width:
            steps.reverse()
    starts = (int(steps[0] // 2), int(steps[1] // 2))
    return starts, (max(1, round(steps[0])), max(1, round(steps[1])))


def _neighbour_cells(coord: Tensor, start: int, step: int, n: int) -> Tensor:
    """Initial-grid cell nearest each coordinate, then that cell -1, 0, +1 (clamped): (3, len(coord))."""
    cell = ((coord - start) / step).round().clamp(0, n - 1).long()
    return torch.stack([(cell + d).clamp(0, n - 1) for d in (-1, 0, 1)])


@torch.no_grad()
def slic_labels(
    images: Tensor, n_segments: int, compactness: float, *, max_iter: int = MAX_ITER, enforce_connectivity: bool = True
) -> Tensor:
    """SLIC superpixels of each window on its own device: images (B, 3, H, W) in [0, 1] -> (B, H, W) int64.

    Labels run 0..R_b-1 in each window. See the module docstring for how this follows scikit-image.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"slic_labels needs images (B, 3, H, W), got shape {tuple(images.shape)}")
    if n_segments < 1 or compactness <= 0:
        raise ValueError(f"slic_labels needs n_segments >= 1 and compactness > 0, got {n_segments}, {compactness}")
    with torch.autocast(images.device.type, enabled=False), _one_cpu_thread(images.device):
        return _slic(images, n_segments, compactness, max_iter, enforce_connectivity)  # float32 always


@contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """On the CPU, run on one thread: each op here touches some 10⁴-10⁵ values, where a second
    thread costs more than it brings (many times more on a loaded machine); other devices: as is."""
    if device.type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _slic(images: Tensor, n_segments: int, compactness: float, max_iter: int, enforce_connectivity: bool) -> Tensor:
    b, _, height, width = images.shape
    (y0, x0), (sy, sx) = grid_steps(height, width, n_segments)
    step = max(sy, sx)
    factor = max(1, min(sy, sx) // WORK_STEP)
    hw, ww = -(-height // factor), -(-width // factor)
    rgb = images.float().clamp(0, 1)
    if factor > 1:
        rgb = F.interpolate(rgb, size=(hw, ww), mode="area")
    lab = rgb_to_lab(rgb)  # (B, 3, hw, ww)
    dev = lab.device
    # working-pixel centres in full-resolution pixel coordinates
    ys = (torch.arange(hw, device=dev, dtype=torch.float32) + 0.5) * (height / hw) - 0.5  # (hw,)
    xs = (torch.arange(ww, device=dev, dtype=torch.float32) + 0.5) * (width / ww) - 0.5  # (ww,)
    # features in the scaled space where SLIC's distance is Euclidean: Lab / m, (y, x) / S
    feats = torch.cat([
        lab / compactness,
        (ys / step)[None, None, :, None].expand(b, 1, hw, ww),
        (xs / step)[None, None, None, :].expand(b, 1, hw, ww),
    ], dim=1).flatten(2)  # (B, 5, P), P = hw·ww

    cy = torch.arange(y0, height, sy, device=dev)  # initial centre rows
    cx = torch.arange(x0, width, sx, device=dev)
    gh, gw = len(cy), len(cx)
    n_centres = gh * gw
    rows, cols = _neighbour_cells(ys, y0, sy, gh), _neighbour_cells(xs, x0, sx, gw)  # (3, hw), (3, ww)
    candidates = torch.stack([
        (rows[i][:, None] * gw + cols[j][None, :]).flatten() for i in range(3) for j in range(3)
    ])  # (9, P) centre index of each pixel's 9 candidates
    # initial centres: the working pixel at each grid point
    iy = ((cy.float() + 0.5) * hw / height - 0.5).round().clamp(0, hw - 1).long()
    ix = ((cx.float() + 0.5) * ww / width - 0.5).round().clamp(0, ww - 1).long()
    centres = feats[:, :, (iy[:, None] * ww + ix[None, :]).flatten()]  # (B, 5, K)

    labels = _assign(feats, centres, candidates)  # (B, P)
    for _ in range(max_iter - 1):
        sums = torch.zeros(b, 5, n_centres, device=dev).scatter_add_(2, labels[:, None].expand(-1, 5, -1), feats)
        counts = torch.zeros(b, 1, n_centres, device=dev).scatter_add_(
            2, labels[:, None], torch.ones(b, 1, labels.shape[1], device=dev)
        )
        centres = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
        new = _assign(feats, centres, candidates)
        if torch.equal(new, labels):  # converged, as scikit-image stops
            break
        labels = new
    labels = labels.view(b, hw, ww)
    if enforce_connectivity:
        min_size = int(MIN_SIZE_FACTOR * hw * ww / n_centres)
        labels = merge_small_pieces(connected_pieces(labels), min_size)
    labels = _consecutive(labels)
    if factor > 1:  # nearest neighbour back to the window's pixels
        ri = ((torch.arange(height, device=dev) + 0.5) * hw / height).long().clamp_max(hw - 1)
        ci = ((torch.arange(width, device=dev) + 0.5) * ww / width).long().clamp_max(ww - 1)
        labels = labels[:, ri][:, :, ci]
    return labels


def _assign(feats: Tensor, centres: Tensor, candidates: Tensor) -> Tensor:
    """Nearest of each pixel's candidate centres: feats (B, 5, P), centres (B, 5, K),
    candidates (9, P) -> (B, P) centre index (ties: the earlier candidate)."""
    b, f, k = centres.shape
    near = centres.reshape(b * f, k).index_select(1, candidates.flatten()).view(b, f, *candidates.shape)  # (B, 5, 9, P)
    dist = (feats[:, :, None] - near).square_().sum(1)  # (B, 9, P)
    pick = dist.argmin(dim=1)  # (B, P) which candidate
    return candidates.gather(0, pick)  # (B, P): out[b, p] = candidates[pick[b, p], p]
def _shifted(x: Tensor, dy: int, dx: int, fill: int) -> Tensor:
    """x (B, h, w) moved so that out[y, x] = x[y + dy, x + dx]; outside the map: ``fill``."""
    out = torch.full_like(x, fill)
    h, w = x.shape[-2:]
    out[:, max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)] = \
        x[:, max(0, dy) : h - max(0, -dy), max(0, dx) : w - max(0, -dx)]
    return out


_NEIGHBOURS = ((-1, 0), (1, 0), (0, -1), (0, 1))


def connected_pieces(labels: Tensor, max_rounds: int = 10_000) -> Tensor:
    """4-connected pieces of equal labels: (B, h, w) -> (B, h, w) id of each piece (the smallest flat
    index of its pixels), by min-propagation until nothing changes."""
    b, h, w = labels.shape
    big = h * w
    piece = torch.arange(big, device=labels.device).view(1, h, w).expand(b, h, w).contiguous()
    same = [(_shifted(labels, dy, dx, -1) == labels) for dy, dx in _NEIGHBOURS]
    for _ in range(max_rounds):
        new = piece
        for (dy, dx), ok in zip(_NEIGHBOURS, same, strict=True):
            new = torch.minimum(new, torch.where(ok, _shifted(piece, dy, dx, big), big))
        new = new.flatten(1).gather(1, new.flatten(1)).view(b, h, w)  # pointer jumping: id of my id
        if torch.equal(new, piece):
            break
        piece = new
    return piece


def merge_small_pieces(piece: Tensor, min_size: int, rounds: int = 3) -> Tensor:
    """Pieces (B, h, w) of fewer than ``min_size`` pixels join their largest 4-neighbouring piece.

    A piece joins only a neighbour larger than itself (by size, then id), so pieces never swap; a small
    piece whose largest neighbour is small too joins it and, in the next round, moves on with it; a
    piece with no larger neighbour stays.
    """
    b, h, w = piece.shape
    big = h * w
    for _ in range(rounds):
        flat = piece.flatten(1)
        size = torch.zeros(b, big, dtype=torch.int64, device=piece.device).scatter_add_(1, flat, torch.ones_like(flat))
        small = size.gather(1, flat) < min_size  # (B, h·w) pixel in a small piece
        if not bool(small.any()):
            break
        # best neighbour of each small piece: the largest by size, then by id (deterministic)
        score = torch.full((b, big), -1, dtype=torch.int64, device=piece.device)
        for dy, dx in _NEIGHBOURS:
            other = _shifted(piece, dy, dx, -1).flatten(1)
            ok = small & (other >= 0) & (other != flat)
            cand = torch.where(ok, size.gather(1, other.clamp_min(0)) * big + other, -1)
            score.scatter_reduce_(1, flat, cand, reduce="amax")
        ids = torch.arange(big, device=piece.device)
        own = size * big + ids  # (B, big) each piece's own score
        target = torch.where(score > own, score % big, ids)  # (B, big)
        piece = target.gather(1, flat).view(b, h, w)
    return piece


def _consecutive(labels: Tensor) -> Tensor:
    """Relabel each map 0..R_b-1 in one ``unique`` over the batch: (B, h, w) -> (B, h, w) int64."""
    b = labels.shape[0]
    offset = torch.arange(b, device=labels.device)[:, None, None] * (int(labels.max()) + 1)
    inverse = torch.unique(labels + offset, return_inverse=True)[1]
    first = inverse.flatten(1).min(dim=1).values  # ids of map b start where map b-1's stop
    return inverse - first[:, None, None]


def slic_skimage(images: Tensor, n_segments: int, compactness: float) -> Tensor:
    """scikit-image's SLIC of each window, on the CPU: images (B, 3, H, W) in [0, 1] -> (B, H, W) int64."""
    from skimage.segmentation import slic

    pixels = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy().astype(np.float64)
    maps = [
        slic(img, n_segments=n_segments, compactness=compactness, start_label=0, channel_axis=-1)
        for img in pixels
    ]
    return torch.from_numpy(np.stack(maps)).long().to(images.device)
