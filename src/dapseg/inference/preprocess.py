"""Resizing and normalisation, as MMSegmentation's test pipeline does them for the references."""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch import Tensor


def short_side_size(h: int, w: int, short_side: int, max_long_side: int = 2048) -> tuple[int, int]:
    """Target (H, W) keeping the aspect ratio: short side -> ``short_side``, long side <= ``max_long_side``.

    The references resize with scale (2048, short_side) and keep_ratio, i.e. by the factor
    min(max_long / long, short_side / short), rounding each side to the nearest pixel.
    """
    scale = min(max_long_side / max(h, w), short_side / min(h, w))
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) uint8, bilinear (OpenCV, as the references' image loader)."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)


def to_tensor01(image: np.ndarray) -> Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div_(255.0)


def normalize(images01: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """(B, 3, H, W) in [0, 1] -> normalised with per-channel mean / std."""
    m = torch.tensor(mean, dtype=images01.dtype, device=images01.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=images01.dtype, device=images01.device).view(1, 3, 1, 1)
    return (images01 - m) / s
