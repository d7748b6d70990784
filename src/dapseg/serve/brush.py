"""PLACEHOLDER until the labeling module with Label Studio's brush RLE lands (branch issue-27-export):
a boolean mask -> Label Studio's brush RLE, by label-studio-sdk's converter."""

from __future__ import annotations

import numpy as np


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """(H, W) bool -> Label Studio's brush RLE of the RGBA image (255 where ``mask``)."""
    from label_studio_sdk.converter.brush import mask2rle

    return [int(v) for v in mask2rle(mask.astype(np.uint8) * 255)]
