"""Logits -> class probabilities -> labels (docs/design.md, "Data flow").

logits × logit_scale → softmax over queries → synonyms of a class merged by max → argmax; where
the top probability is below ``prob_thd`` the pixel takes the *unsure* label: ``UNLABELED`` (the
API, ``dapseg segment``: "not sure, leave it to the annotator"), or class 0 under the benchmarks'
protocol (``ClassSet.unsure_class``: class 0 is the dataset's background).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

UNLABELED = -1
"""The label of a pixel left unlabeled, in every labels tensor (int64). Saved label PNGs hold
``viz.UNLABELED_PNG`` (255) there, or 65535 in the 16-bit PNGs of lists over 255 classes."""


def merge_synonyms(query_probs: Tensor, query_to_class: list[int]) -> Tensor:
    """(Q, ...) -> (C, ...): each class takes the max over its synonyms' probabilities."""
    index = torch.tensor(query_to_class, device=query_probs.device)
    n_classes = int(index.max()) + 1
    if n_classes == query_probs.shape[0]:
        return query_probs
    out = query_probs.new_full((n_classes, *query_probs.shape[1:]), float("-inf"))
    expanded = index.view(-1, *([1] * (query_probs.dim() - 1))).expand_as(query_probs)
    return out.scatter_reduce(0, expanded, query_probs, reduce="amax")


def class_probs(logits: Tensor, logit_scale: float, query_to_class: list[int]) -> Tensor:
    """(Q, ...) cosine logits -> (C, ...) class probabilities (synonyms merged)."""
    return merge_synonyms(torch.softmax(logits * logit_scale, dim=0), query_to_class)


def labels_from_probs(probs: Tensor, prob_thd: float, unsure: int = UNLABELED) -> Tensor:
    """(C, ...) -> (...) int64 argmax; below ``prob_thd`` -> ``unsure`` (``UNLABELED``, or 0 under
    the benchmarks' protocol).

    Tie rule: equal top probabilities go to the lowest class index (``torch.max`` returns the first
    maximal index).
    """
    top, labels = probs.max(dim=0)
    if prob_thd > 0:
        labels = torch.where(top < prob_thd, torch.full_like(labels, unsure), labels)
    return labels


def leave_unlabeled(labels: Tensor, classes: tuple[int, ...]) -> Tensor:
    """``labels`` with the pixels of ``classes`` (e.g. a "background" class the user added to absorb
    what is none of the others) set to ``UNLABELED``."""
    if not classes:
        return labels
    drop = torch.isin(labels, torch.tensor(classes, dtype=labels.dtype, device=labels.device))
    return labels.masked_fill(drop, UNLABELED)


def upsample_rows(logits: Tensor, out_size: tuple[int, int], r0: int, r1: int) -> Tensor:
    """Rows r0:r1 of ``F.interpolate(logits[None], out_size, bilinear, align_corners=False)[0]``.

    Computed with grid_sample on just those rows so a large output never exists whole; bilinear
    with align_corners=False and border clamping is the same sampling as interpolate's.
    """
    out_h, out_w = out_size
    ys = (torch.arange(r0, r1, dtype=torch.float64) + 0.5) * 2 / out_h - 1
    xs = (torch.arange(out_w, dtype=torch.float64) + 0.5) * 2 / out_w - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack([gx, gy], dim=-1)[None].to(logits.dtype)
    return F.grid_sample(logits[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]


def labels_banded(
    logits: Tensor,
    out_size: tuple[int, int],
    logit_scale: float,
    query_to_class: list[int],
    prob_thd: float,
    max_elements: int = 1 << 24,
    unsure: int = UNLABELED,
) -> Tensor:
    """(Q, h, w) logits at processing resolution -> (H, W) labels at ``out_size``, in row bands.

    Peak memory is about ``max_elements`` floats however large the output image is.
    """
    q = logits.shape[0]
    out_h, out_w = out_size
    rows = max(1, max_elements // max(1, q * out_w))
    labels = torch.empty(out_size, dtype=torch.int64)
    for r0 in range(0, out_h, rows):
        r1 = min(out_h, r0 + rows)
        band = upsample_rows(logits, out_size, r0, r1)
        labels[r0:r1] = labels_from_probs(class_probs(band, logit_scale, query_to_class), prob_thd, unsure)
    return labels
