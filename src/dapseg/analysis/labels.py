"""The analysed window of an image and the label of each patch of a feature grid on it.

Window: the image is resized so that its short side is the window size (bilinear, as the
segmenter's pre-processing; the label by nearest neighbour), then the centred square of that size is
cut out. ProxyCLIP runs its models on 336×336 windows; Fig. 1 of the paper scores patch pairs of such
windows, and one centred window per image keeps every image's pair count the same.

Patch label: the majority vote of the window pixels under the patch, the ignore label taking part as
one more candidate; a patch whose majority is "ignore" is dropped (label -1). Ties go to the lowest
class index. A grid covers ``grid × cell`` window pixels from the top-left corner (``cell`` = the
patch stride in window pixels, fractional when a model resizes its input); pixels beyond the last
full patch are seen by no patch and take no part; a patch smaller than a pixel (a model that
upsamples a small window) takes the label of the pixel at its centre.
"""

from __future__ import annotations

import numpy as np
import torch

from dapseg.inference.preprocess import resize_image

DROPPED = -1  # the label of a patch whose pixels are mostly "ignore"


def _short_side_to(h: int, w: int, size: int) -> tuple[int, int]:
    scale = size / min(h, w)
    return max(size, int(h * scale + 0.5)), max(size, int(w * scale + 0.5))


def _nearest(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) -> size, nearest neighbour at pixel centres (exact for any integer dtype)."""
    h, w = label.shape
    rows = np.minimum(((np.arange(size[0]) + 0.5) * h / size[0]).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * w / size[1]).astype(np.int64), w - 1)
    return label[rows[:, None], cols[None, :]]


def center_window(image: np.ndarray, label: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Image (H, W, 3) uint8 and label (H, W) -> the centred size×size window of both, the short side
    first resized to ``size``."""
    if size < 1:
        raise ValueError(f"window size must be >= 1, got {size}")
    if image.shape[:2] != label.shape:
        raise ValueError(f"image {image.shape[:2]} and label {label.shape} differ in size")
    h, w = _short_side_to(*label.shape, size)
    image, label = resize_image(image, (h, w)), _nearest(label, (h, w))
    top, left = (h - size) // 2, (w - size) // 2
    return image[top : top + size, left : left + size], label[top : top + size, left : left + size]


def patch_labels(label: torch.Tensor, grid: tuple[int, int], cell: tuple[float, float], num_classes: int,
                 ignore_index: int) -> torch.Tensor:
    """Window label (S_h, S_w) with classes 0..C-1 or ``ignore_index`` -> (gh·gw,) patch labels in
    raster order, ``DROPPED`` where the majority of the patch's pixels is "ignore"."""
    gh, gw = grid
    sh, sw = label.shape
    rows = torch.floor(torch.arange(sh, dtype=torch.float64) / cell[0]).long()  # patch row of each pixel row
    cols = torch.floor(torch.arange(sw, dtype=torch.float64) / cell[1]).long()
    seen = (rows < gh)[:, None] & (cols < gw)[None, :]  # pixels under some patch
    cls = torch.where(label == ignore_index, num_classes, label.long())  # ignore is candidate C
    bad = (cls < 0) | (cls > num_classes)
    if bad.any():
        raise ValueError(f"label value {int(label[bad].flatten()[0])} is neither a class 0..{num_classes - 1} "
                         f"nor the ignore label {ignore_index}")
    patch = rows[:, None] * gw + cols[None, :]
    slots = num_classes + 1
    counts = torch.bincount((patch * slots + cls)[seen], minlength=gh * gw * slots).view(gh * gw, slots)
    winner = counts.argmax(dim=1)  # the first maximum: ties go to the lowest class
    empty = counts.sum(dim=1) == 0  # patches finer than a pixel (cell < 1): the pixel at their centre
    if empty.any():
        cy = torch.floor((torch.arange(gh, dtype=torch.float64) + 0.5) * cell[0]).long().clamp_(max=sh - 1)
        cx = torch.floor((torch.arange(gw, dtype=torch.float64) + 0.5) * cell[1]).long().clamp_(max=sw - 1)
        winner = torch.where(empty, cls[cy[:, None], cx[None, :]].flatten(), winner)
    return torch.where(winner == num_classes, DROPPED, winner)
