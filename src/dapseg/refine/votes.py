"""Class votes inside regions, shared by the region refiners (``sam_vote``, ``map_correction``).

The winner of a vote is the class with the most pixels; ties go to the lower class index (what
``torch.mode`` returns on the CPU, as CorrCLIP's map correction calls it).
"""

from __future__ import annotations

import torch
from torch import Tensor


def majority_class(counts: Tensor) -> Tensor:
    """counts (..., C) pixels per class -> (...) int64 winning class (first maximum: the lowest index)."""
    return counts.argmax(dim=-1)


def region_class_counts(labels: Tensor, region_index: Tensor, regions: int, num_classes: int) -> Tensor:
    """Pixels of each class in each region: labels (H, W) and region_index (H, W) in 0..regions−1
    (int64) -> (regions, num_classes) int64, one ``bincount``."""
    flat = region_index.flatten() * num_classes + labels.flatten()
    return torch.bincount(flat, minlength=regions * num_classes).view(regions, num_classes)
