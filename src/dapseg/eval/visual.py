"""Side-by-side pictures for ``--show``: image | ground truth | prediction (ignore pixels black)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from dapseg.data.io import atomic_save_image
from dapseg.viz import display_palette


def colorize(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8; values outside 0..C-1 (ignore) are black."""
    pal = display_palette(num_classes)  # class 0 is not black: black means "ignore"
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
