"""Region maps on a patch grid for CorrCLIP: nearest resizing, mask merging and the scope mask.

A region map gives every pixel (or patch) of a window an integer id; the lowest id of a window is
the union of the pixels no mask covers (the region generators' encoding), and window padding holds
a sentinel id (10000, above every real id). Shapes: B windows, (h', w') a patch grid,
N' = h'·w' patches, R regions of one window, C feature channels.

Facts from the public reference (zdk258/CorrCLIP, ``CorrCLIPv1/open_clip/transformer.py``):

* maps are resized with ``F.interpolate(mode="nearest")`` (the source index is ⌊i·in/out⌋);
* mask merging runs per window when it holds more than two ids: the mean ℓ2-normalised feature of
  each region, normalised again; the lowest id is left out; cosine similarities ``sim`` between the
  others; DBSCAN (scikit-learn, ``metric="precomputed"``, eps 0.2, min_samples 1) on
  ``max(sim) − sim`` (the maximum over the whole matrix); region k of cluster c takes the id
  c + 10000 (``MERGED_BASE``), the lowest region keeps its id;
* scope: patches i, j may attend when they share a region other than the lowest; a pair where i or
  j lies in the lowest region is kept when S_ij > mean(S) (the reference's "method 1").

DBSCAN with min_samples = 1 makes every point whose neighbourhood holds itself a core point (here
dist_ii = max(sim) − sim_ii ≈ 0), so its clusters are what scikit-learn's depth-first expansion
reaches: seeds in index order, edges i → j where dist_ij ≤ eps, through points not labelled yet.
``dbscan_clusters`` runs exactly that expansion, noise included (tests check it against
scikit-learn, asymmetric float matrices included), so scikit-learn is not a dependency.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

MERGED_BASE = 10000  # merged regions take ids MERGED_BASE + cluster (the reference's offset)


def nearest_indices(size_in: int, size_out: int, device: torch.device) -> Tensor:
    """The source index of each of ``size_out`` outputs under ``F.interpolate(mode="nearest")``.

    Taken from interpolate itself (on an index ramp), so the rounding is PyTorch's own."""
    ramp = torch.arange(size_in, device=device, dtype=torch.float64).view(1, 1, size_in)
    return F.interpolate(ramp, size=size_out, mode="nearest").view(size_out).long()


def resize_nearest(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Integer maps (B, H, W) -> (B, h, w) as ``F.interpolate(mode="nearest")``, exact for any int64 id."""
    rows = nearest_indices(maps.shape[-2], size[0], maps.device)
    cols = nearest_indices(maps.shape[-1], size[1], maps.device)
    return maps[:, rows][:, :, cols]


def dbscan_clusters(dist: np.ndarray, eps: float) -> np.ndarray:
    """scikit-learn's ``DBSCAN(eps, min_samples=1, metric="precomputed").fit_predict(dist)``.

    dist (R, R), float; returns (R,) int64 labels 0, 1, … in the order of their first point, −1 for
    noise. Neighbourhoods are ``dist[i] <= eps`` compared in dist's own dtype, as scikit-learn does;
    a point is a core point when its neighbourhood is not empty (it holds the point itself unless
    dist_ii > eps); clusters grow from core points in index order, through core points only.
    """
    n = dist.shape[0]
    near = dist <= (dist.dtype.type(eps) if np.issubdtype(dist.dtype, np.floating) else eps)  # (R, R)
    core = near.any(axis=1)
    labels = np.full(n, -1, dtype=np.int64)
    cluster = 0
    for seed in range(n):
        if labels[seed] != -1 or not core[seed]:
            continue
        labels[seed] = cluster
        stack = [seed]
        while stack:
            i = stack.pop()
            if not core[i]:
                continue  # a border point joins the cluster but does not extend it
            for j in np.flatnonzero(near[i] & (labels == -1)):
                labels[j] = cluster
                stack.append(int(j))
        cluster += 1
    return labels


def merge_regions(region: Tensor, feats: Tensor, eps: float = 0.2) -> Tensor:
    """One window's region map on the feature grid after mask merging.

    region (N',) int64 ids, feats (N', C) ℓ2-normalised patch features -> (N',) int64 ids.
    Fewer than three ids: unchanged (the reference merges only then).
    """
    values, inverse = torch.unique(region, return_inverse=True)  # sorted ids (R,), (N',)
    if values.numel() <= 2:
        return region
    one_hot = F.one_hot(inverse, values.numel()).to(feats.dtype)  # (N', R)
    with torch.autocast(feats.device.type, enabled=False):
        means = (one_hot.T @ feats.float()) / one_hot.sum(0).float()[:, None]  # (R, C) region means
        means = F.normalize(means, dim=1)[1:]  # the lowest region takes no part
        sim = means @ means.T  # (R - 1, R - 1)
        dist = (sim.max() - sim).cpu().numpy()
    clusters = torch.from_numpy(dbscan_clusters(dist, eps)).to(region.device)
    new_ids = values.clone()
    new_ids[1:] = torch.where(clusters >= 0, clusters + MERGED_BASE, values[1:])  # noise keeps its id
    return new_ids[inverse]


def scope_keep(region: Tensor, sim: Tensor) -> Tensor:
    """Which pairs of patches may attend (CorrCLIP's scope reconstruction).

    region (B, N') int64 ids, sim (B, N', N') similarities -> keep (B, N', N') bool: i and j in the
    same region other than the window's lowest; or i or j in the lowest region and S_ij > mean(S)
    (the mean over all N'² entries of the window).
    """
    lowest = region == region.amin(dim=1, keepdim=True)  # (B, N')
    same = region[:, :, None] == region[:, None, :]
    touches_lowest = lowest[:, :, None] | lowest[:, None, :]
    above_mean = sim > sim.mean(dim=(-2, -1), keepdim=True)
    return (same & ~touches_lowest) | (touches_lowest & above_mean)
