"""Anomaly tokens: an outlier score over a window's patch tokens, and their replacement on the grid.

SC-CLIP (its public code) finds the patch tokens that stand out from their k nearest neighbours in
feature space, the ``contamination`` fraction with the highest score, and replaces each by the mean
of its spatial 3×3 neighbours that are not outliers themselves. Two scores are offered:

``kdist_ratio`` (the official code's ``lof_pytorch``, the default)
    d²_ij = ‖x_i − x_j‖² (squared), kNN(i) = the k nearest other tokens, kd(i) = the k-th of them;
    the reach distance of i to every neighbour is kd(i) itself, so lrd(i) = k / kd(i) and
    score(i) = mean_{o ∈ kNN(i)} lrd(o) / lrd(i) = mean_o kd(i) / kd(o).
``lof``
    Breunig et al.'s local outlier factor as scikit-learn's ``LocalOutlierFactor`` computes it:
    Euclidean distances, reach(i, o) = max(d_io, kd(o)), lrd(i) = 1 / (mean_o reach(i, o) + 1e-10),
    score(i) = mean_o lrd(o) / lrd(i).

Both keep as outliers the tokens whose score is above the (1 − contamination) quantile of the
window's scores (linear interpolation), which is scikit-learn's ``offset_`` rule as well.

Shapes: B windows, N = h·w patch tokens, C channels. Everything runs batched over windows on the
tokens' device, in at least float32 (autocast off): the k-th distance decides the score, and half
precision would round neighbouring distances into ties.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

OutlierScore = Literal["kdist_ratio", "lof"]

# scikit-learn's LocalOutlierFactor adds this to the mean reach distance (duplicates: distance 0).
LOF_EPS = 1e-10


def _work_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


# A squared distance within this fraction of ‖a‖² + ‖b‖² (the rounding of the float64 product) is 0:
# a token and its duplicates are at distance exactly 0, as the difference of equal vectors is.
ZERO_DISTANCE_RTOL = 1e-12


def pairwise_sq_distances(x: Tensor) -> Tensor:
    """‖x_i − x_j‖²: (B, N, C) -> (B, N, N) in the work dtype (at least float32).

    ‖a‖² + ‖b‖² − 2a·b as one float64 product of the tokens centred per window: CLIP's residual
    stream carries a few channels of large values shared by every token, which centring removes,
    and float64 keeps the cancellation far below float32's rounding of the distances themselves
    (3× faster than differencing every pair on a CPU, exact to float32 on real tokens).
    """
    x64 = x.double()
    x64 = x64 - x64.mean(dim=1, keepdim=True)
    sq = x64.pow(2).sum(dim=-1)  # (B, N)
    norms = sq.unsqueeze(2) + sq.unsqueeze(1)  # (B, N, N) ‖a‖² + ‖b‖²
    d = norms - 2 * torch.bmm(x64, x64.transpose(1, 2))
    d = d.masked_fill(d <= ZERO_DISTANCE_RTOL * norms, 0.0)
    return d.to(_work_dtype(x))


def knn(d: Tensor, k: int, drop: Literal["first", "self"]) -> tuple[Tensor, Tensor]:
    """The k nearest other tokens of every token: distances (B, N, N) -> (values, indices), (B, N, k),
    nearest first.

    drop="first": the k + 1 smallest of each row without the first (the token itself, or a
    duplicate at distance 0: the official code's rule). drop="self": the k smallest of the row with
    the token itself excluded by index (scikit-learn's ``kneighbors()`` on the training points).
    """
    if drop == "first":
        values, indices = torch.topk(d, k + 1, dim=-1, largest=False)
        return values[..., 1:], indices[..., 1:]
    eye = torch.eye(d.shape[-1], dtype=torch.bool, device=d.device)
    return torch.topk(d.masked_fill(eye, float("inf")), k, dim=-1, largest=False)


def _gather_rows(values: Tensor, indices: Tensor) -> Tensor:
    """values (B, N) at indices (B, N, k) -> (B, N, k)."""
    b, n, k = indices.shape
    return torch.gather(values, 1, indices.reshape(b, n * k)).reshape(b, n, k)


def kdist_ratio_scores(x: Tensor, n_neighbors: int) -> Tensor:
    """The official code's score: (B, N, C) -> (B, N) (module docstring); ``n_neighbors`` < N."""
    k = n_neighbors
    d, idx = knn(pairwise_sq_distances(x), k, drop="first")  # (B, N, k) squared distances
    kd = d[..., -1:]  # (B, N, 1) own k-distance
    # Its reach distance to every neighbour is its own k-distance (max with the sorted row); the mean
    # of k equal values is kept as a mean, as the official code takes it (rounding included).
    lrd = k / torch.nan_to_num(torch.maximum(d, kd).mean(dim=-1), nan=1e-6)  # (B, N)
    return (_gather_rows(lrd, idx) / lrd.unsqueeze(-1)).mean(dim=-1)


def lof_scores(x: Tensor, n_neighbors: int) -> Tensor:
    """Local outlier factor as scikit-learn computes it: (B, N, C) -> (B, N) (= −negative_outlier_factor_)."""
    d, idx = knn(pairwise_sq_distances(x).sqrt(), n_neighbors, drop="self")  # (B, N, k) Euclidean
    kd = d[..., -1]  # (B, N) k-distance of every token
    reach = torch.maximum(d, _gather_rows(kd, idx))  # reach(i, o) = max(d_io, kd(o))
    lrd = 1.0 / (reach.mean(dim=-1) + LOF_EPS)  # (B, N)
    return (_gather_rows(lrd, idx) / lrd.unsqueeze(-1)).mean(dim=-1)


def outlier_scores(x: Tensor, n_neighbors: int, score: OutlierScore = "kdist_ratio") -> Tensor:
    """Outlier score of each token among the tokens of its window: (B, N, C) -> (B, N).

    ``n_neighbors`` is clamped to N − 1 (as scikit-learn does when a window has few tokens).
    """
    if x.dim() != 3:
        raise ValueError(f"outlier_scores expects tokens (B, N, C), got {tuple(x.shape)}")
    if n_neighbors < 1:
        raise ValueError(f"n_neighbors must be >= 1, got {n_neighbors}")
    k = min(n_neighbors, x.shape[1] - 1)
    if k < 1:  # a single token: nothing to compare with, nothing is an outlier
        return torch.ones(x.shape[:2], dtype=_work_dtype(x), device=x.device)
    with torch.autocast(x.device.type, enabled=False):
        if score == "kdist_ratio":
            return kdist_ratio_scores(x, k)
        if score == "lof":
            return lof_scores(x, k)
    raise ValueError(f"unknown outlier score {score!r}; valid: kdist_ratio, lof")


def outliers_from_scores(scores: Tensor, contamination: float) -> Tensor:
    """True where a score is above the (1 − contamination) quantile of its window: (B, N) -> bool (B, N).

    A window whose scores hold a NaN (the kdist_ratio of duplicate tokens, 0 / 0) has no outliers,
    as in the official code (every comparison with its NaN quantile is false).
    """
    if not 0.0 <= contamination <= 0.5:
        raise ValueError(f"contamination must be in [0, 0.5], got {contamination}")
    threshold = torch.quantile(scores.float(), 1.0 - contamination, dim=-1, keepdim=True)  # (B, 1)
    return scores > threshold


def outlier_mask(
    x: Tensor, n_neighbors: int = 30, contamination: float = 0.05, score: OutlierScore = "kdist_ratio"
) -> Tensor:
    """The anomaly tokens of each window: patch tokens (B, N, C) -> bool (B, N)."""
    return outliers_from_scores(outlier_scores(x, n_neighbors, score), contamination)


def replace_by_neighbour_mean(tokens: Tensor, mask: Tensor, grid: tuple[int, int]) -> Tensor:
    """Each masked token replaced by the mean of its 3×3 grid neighbours that are not masked.

    tokens (B, N, C), mask bool (B, N), grid (h, w) with N = h·w, row-major -> (B, N, C). Neighbours
    outside the grid do not count; a masked token with no unmasked neighbour keeps its value. All
    replacements read the unreplaced tokens (they happen at once).
    """
    b, n, c = tokens.shape
    h, w = grid
    if n != h * w or mask.shape != (b, n):
        raise ValueError(f"tokens {tuple(tokens.shape)} and mask {tuple(mask.shape)} do not fit the grid {grid}")
    if not bool(mask.any()):
        return tokens
    keep = (~mask).to(tokens.dtype).reshape(b, 1, h, w)
    fmap = tokens.transpose(1, 2).reshape(b, c, h, w) * keep  # masked tokens contribute nothing
    ring = torch.ones(1, 1, 3, 3, dtype=tokens.dtype, device=tokens.device)
    ring[..., 1, 1] = 0  # the 8 neighbours, not the token itself
    sums = F.conv2d(fmap.reshape(b * c, 1, h, w), ring, padding=1).reshape(b, c, h, w)
    counts = F.conv2d(keep, ring, padding=1)  # (B, 1, h, w) unmasked neighbours in the grid
    means = (sums / counts.clamp_min(1)).reshape(b, c, n).transpose(1, 2)  # (B, N, C)
    replace = mask & (counts.reshape(b, n) > 0)
    return torch.where(replace.unsqueeze(-1), means, tokens)
