"""Class votes inside regions, shared by the region refiners (``sam_vote``, ``map_correction``).

The winner of a vote is the class with the most pixels; ties go to the lower class index (what
``torch.mode`` returns on the CPU, as CorrCLIP's map correction calls it).
"""

from __future__ import annotations

import torch
from torch import Tensor


def class_counts(labels: Tensor, num_classes: int) -> Tensor:
    """labels (any shape) in UNLABELED (-1) or 0..C−1 -> (C + 1,) pixel counts, column 0 the unlabeled ones
    (a pixel below ``prob_thd`` outside the benchmarks takes part in the vote as "no label")."""
    return torch.bincount(labels.flatten() + 1, minlength=num_classes + 1)


def majority_class(counts: Tensor) -> Tensor:
    """counts (..., C + 1) as ``class_counts`` -> (...) int64 winning label (-1: unlabeled); first maximum:
    the lowest label, unlabeled first."""
    return counts.argmax(dim=-1) - 1


def region_class_counts(labels: Tensor, region_index: Tensor, regions: int, num_classes: int) -> Tensor:
    """Pixels of each label in each region: labels (H, W) in -1..C−1 and region_index (H, W) in 0..regions−1
    (int64) -> (regions, C + 1) int64 (column 0: unlabeled), one ``bincount``."""
    width = num_classes + 1
    flat = region_index.flatten() * width + labels.flatten() + 1
    return torch.bincount(flat, minlength=regions * width).view(regions, width)
