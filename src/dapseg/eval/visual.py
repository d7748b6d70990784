"""Side-by-side pictures for ``--show``: image | ground truth | prediction (ignore pixels black)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from dapseg.data.io import atomic_save_image


def palette(n: int) -> np.ndarray:
    """(n, 3) uint8 distinct colours (the PASCAL bit-interleaving scheme, deterministic)."""
    out = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i + 1, 0, 0, 0  # +1: class 0 is not black, black means "ignore"
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        out[i] = (r, g, b)
    return out


def colorize(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8; values outside 0..C-1 (ignore) are black."""
    pal = palette(num_classes)
    valid = (labels >= 0) & (labels < num_classes)
    out = np.zeros((*labels.shape, 3), dtype=np.uint8)
    out[valid] = pal[labels[valid]]
    return out


def save_comparison(path: Path, image: np.ndarray, gt: np.ndarray, pred: np.ndarray, num_classes: int,
                    alpha: float = 0.6) -> None:
    def blend(lab: np.ndarray) -> np.ndarray:
        return (alpha * colorize(lab, num_classes) + (1 - alpha) * image).astype(np.uint8)

    canvas = np.concatenate([image, blend(gt), blend(pred)], axis=1)
    atomic_save_image(Image.fromarray(canvas), path, fmt="JPEG")
