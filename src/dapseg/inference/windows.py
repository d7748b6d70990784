"""Windows: the sliding-window grid of the references (MMSegmentation's slide inference), cropping
and padding. Every strategy that cuts an image into windows uses these: ``window_padding`` is the one
rule for padding a window (whole, slide, splice and stitch alike) and ``WindowPadding`` crops the
padding back off pixel maps and token / feature grids."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from dapseg.config import InferenceConfig


@dataclass(frozen=True)
class Window:
    y1: int
    y2: int
    x1: int
    x2: int

    @property
    def size(self) -> tuple[int, int]:
        return self.y2 - self.y1, self.x2 - self.x1


@dataclass(frozen=True)
class WindowPlan:
    """Where a strategy cuts a processed image: the working size it resizes the image to first
    (``size`` (h, w): the image's own size where it keeps it) and the windows on that working image.

    A strategy declares its plan as the registry extra ``windows``, a ``WindowPlanner``:
    ``planner((H, W) of the processed image, the inference settings, the CLIP patch) -> WindowPlan``,
    computed by the same functions the strategy cuts its windows with (``dapseg bench`` asks it).
    """

    size: tuple[int, int]
    windows: list[Window]


WindowPlanner = Callable[[tuple[int, int], "InferenceConfig", int], WindowPlan]


def window_grid(h: int, w: int, crop: int, stride: int) -> list[Window]:
    """Windows of size min(crop, side) covering an (h, w) image.

    Rows of windows start every ``stride`` pixels; the last row/column is shifted back so that it
    ends at the border (never padded), and an image smaller than ``crop`` is one window of its own
    size — the rule of the references' ``forward_slide``. Every window has the same size.
    """
    if min(h, w, crop, stride) < 1:
        raise ValueError(f"invalid sliding window: image {h}x{w}, crop {crop}, stride {stride}")
    h_grids = max(h - crop + stride - 1, 0) // stride + 1
    w_grids = max(w - crop + stride - 1, 0) // stride + 1
    windows = []
    for i in range(h_grids):
        for j in range(w_grids):
            y2 = min(i * stride + crop, h)
            x2 = min(j * stride + crop, w)
            windows.append(Window(max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return windows


def centred_padding(h: int, w: int, multiple: int | None) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding that makes h and w multiples of ``multiple``.

    ProxyCLIP pads each window this way (multiple 56) and crops the logits back afterwards.
    """
    if not multiple:
        return 0, 0, 0, 0
    lr = (-w) % multiple
    tb = (-h) % multiple
    return lr // 2, lr - lr // 2, tb // 2, tb - tb // 2


class WindowPadding(NamedTuple):
    """Padding of an (h, w) window, in pixels, and how to take it back off what the window gives."""

    left: int
    right: int
    top: int
    bottom: int

    def padded_size(self, h: int, w: int) -> tuple[int, int]:
        return h + self.top + self.bottom, w + self.left + self.right

    def apply(self, windows01: Tensor, fill: tuple[float, ...]) -> Tensor:
        """(B, 3, h, w) windows padded with the colour ``fill`` (see ``pad_windows``)."""
        return pad_windows(windows01, tuple(self), fill)

    def apply_map(self, maps: Tensor, fill: int) -> Tensor:
        """(B, h, w) integer maps (e.g. region maps) padded like the pixels, with the value ``fill``."""
        return F.pad(maps, tuple(self), value=fill) if any(self) else maps

    def crop_pixels(self, maps: Tensor, size: tuple[int, int]) -> Tensor:
        """(..., h + top + bottom, w + left + right) maps of the padded window -> (..., h, w)."""
        h, w = size
        return maps[..., self.top : self.top + h, self.left : self.left + w]

    def crop_cells(self, maps: Tensor, size: tuple[int, int]) -> tuple[Tensor, float]:
        """(..., gh, gw) maps on a grid of cells covering the padded window -> (the cells covering the
        (h, w) window itself, pixels per cell along the rows). Along each axis a cell is the padded
        side over the grid side; the window spans cells round(pad / cell) .. round((pad + side) / cell)."""
        h, w = size
        ph, pw = self.padded_size(h, w)
        cell_h, cell_w = ph / maps.shape[-2], pw / maps.shape[-1]
        r0, r1 = round(self.top / cell_h), round((self.top + h) / cell_h)
        c0, c1 = round(self.left / cell_w), round((self.left + w) / cell_w)
        return maps[..., r0:r1, c0:c1], cell_h


def window_padding(h: int, w: int, pad_multiple: int | None, min_side: int) -> WindowPadding:
    """The padding of an (h, w) window: ``centred_padding`` to ``pad_multiple``, then, where a side is
    still shorter than ``min_side``, centred padding up to ``min_side`` (a window narrower than one
    patch, e.g. of a 10000×10 image, would give an empty token grid)."""
    left, right, top, bottom = centred_padding(h, w, pad_multiple)
    extra_w, extra_h = max(0, min_side - (w + left + right)), max(0, min_side - (h + top + bottom))
    return WindowPadding(left + extra_w // 2, right + extra_w - extra_w // 2, top + extra_h // 2,
                         bottom + extra_h - extra_h // 2)


def crop_windows(image01: Tensor, windows: list[Window]) -> Tensor:
    """(3, H, W) -> (n, 3, h, w) stacked crops (all windows of a grid share one size)."""
    return torch.stack([image01[:, w.y1 : w.y2, w.x1 : w.x2] for w in windows])


def crop_maps(maps: Tensor, windows: list[Window]) -> Tensor:
    """(H, W) -> (n, h, w) stacked crops of a per-pixel map (e.g. the region map)."""
    return torch.stack([maps[w.y1 : w.y2, w.x1 : w.x2] for w in windows])


def pad_windows(windows01: Tensor, pad: tuple[int, int, int, int], fill: tuple[float, ...]) -> Tensor:
    """Pad (B, 3, h, w) windows by (left, right, top, bottom) with a constant colour ``fill``
    (the CLIP mean, so that padding is zero after normalisation)."""
    if not any(pad):
        return windows01
    out = F.pad(windows01, pad, value=0.0)
    left, _, top, _ = pad
    h, w = windows01.shape[-2:]
    mask = torch.ones_like(out[:, :1], dtype=torch.bool)
    mask[..., top : top + h, left : left + w] = False
    colour = torch.tensor(fill, dtype=out.dtype, device=out.device).view(1, 3, 1, 1)
    return torch.where(mask, colour, out)


class GridAverage:
    """Running average of window maps on the image's grid of ``cell``-pixel cells.

    Windows are added one batch at a time, so memory is one image grid, not every window's map.
    Window (y1, x1, y2, x2) covers cells round(y1 / cell) .. round(y2 / cell) (and the same for x);
    a map whose size differs from that span (odd sizes without ``align``) is bilinearly resized to it.
    """

    def __init__(self, image_size: tuple[int, int], cell: float, channels: int, device: torch.device) -> None:
        h, w = image_size
        self.cell = cell
        self.grid = (math.ceil(h / cell), math.ceil(w / cell))
        self.total = torch.zeros(channels, *self.grid, device=device)  # (C, gh, gw) float32
        self.count = torch.zeros(1, *self.grid, device=device)

    def add(self, m: Tensor, box: tuple[int, int, int, int]) -> None:
        """m (C, h, w) covering pixels box = (y1, x1, y2, x2)."""
        y1, x1, y2, x2 = box
        gh, gw = self.grid
        r1, c1 = round(y1 / self.cell), round(x1 / self.cell)
        r2, c2 = min(gh, max(r1 + 1, round(y2 / self.cell))), min(gw, max(c1 + 1, round(x2 / self.cell)))
        m = m.float()
        if m.shape[-2:] != (r2 - r1, c2 - c1):
            m = F.interpolate(m[None], size=(r2 - r1, c2 - c1), mode="bilinear", align_corners=False)[0]
        self.total[:, r1:r2, c1:c2] += m
        self.count[:, r1:r2, c1:c2] += 1

    def mean(self) -> Tensor:
        """(C, gh, gw); cells no window covers (none for a window grid) stay zero."""
        return self.total / self.count.clamp(min=1)
