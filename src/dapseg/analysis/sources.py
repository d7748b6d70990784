"""Affinity sources: what scores a pair of patches (i, j) of a window.

Every score is a cosine, cos(a_i, b_j), so all sources share the score range [-1, 1] and one set of
histogram bins:

* CLIP's last block (the block the heads replace), on the tokens entering it: q·k, q·q, k·k, v·v,
  each vector being the concatenation of all heads (width D) after LN_1 and the block's in-projection,
  CLS dropped. q·k is not symmetric: pair (i, j) scores cos(q_i, k_j).
* A VFM's patch features (the features the proxy head uses): cos(x_i, x_j).

Cosines rather than softmax attention: AP ranks all pairs of all rows together, and a row softmax
would make scores of different rows incomparable (every row sums to 1 whatever its content).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dapseg.heads.base import merge_heads, qkv
from dapseg.inference.preprocess import normalize
from dapseg.models.clip import DenseClip


@dataclass(frozen=True)
class SourceInfo:
    key: str  # machine name, e.g. "clip:q-k", "vfm:dino_vitb8"
    label: str  # shown in tables and plots


@dataclass
class Affinity:
    """Patch vectors of one window whose cosines are the scores of ``info``."""

    info: SourceInfo
    rows: Tensor  # (N, D) ℓ2-normalised, the first patch of each pair
    cols: Tensor  # (N, D) ℓ2-normalised, the second patch
    grid: tuple[int, int]  # (h, w), N = h·w in raster order
    cell: tuple[float, float]  # patch stride in window pixels


class AffinitySource(Protocol):
    def infos(self) -> list[SourceInfo]: ...

    def __call__(self, window01: Tensor) -> list[Affinity]: ...


CLIP_PAIRS = (("q", "k"), ("q", "q"), ("k", "k"), ("v", "v"))


class ClipAttention:
    """CLIP's last-block q·k, q·q, k·k and v·v of a window (1, 3, S, S) in [0, 1]."""

    def __init__(self, clip: DenseClip) -> None:
        self.clip = clip

    def infos(self) -> list[SourceInfo]:
        return [SourceInfo(f"clip:{a}-{b}", f"CLIP {self.clip.name} {a}·{b}") for a, b in CLIP_PAIRS]

    def check_window(self, size: int) -> None:
        p = self.clip.patch_size
        if size % p:
            raise ValueError(f"--window {size} is not a multiple of CLIP {self.clip.name}'s patch size {p}")

    @torch.no_grad()
    def __call__(self, window01: Tensor) -> list[Affinity]:
        clip = self.clip
        x, grid = clip.tokens_before_last_block(normalize(window01, clip.mean, clip.std))
        q, k, v = (F.normalize(merge_heads(t)[0, 1:].float(), dim=-1)  # (N, D), CLS dropped
                   for t in qkv(clip.last_block, x))
        vectors = {"q": q, "k": k, "v": v}
        p = float(clip.patch_size)
        return [Affinity(info, vectors[a], vectors[b], grid, (p, p))
                for info, (a, b) in zip(self.infos(), CLIP_PAIRS, strict=True)]


class VfmCosine:
    """Cosine of a VFM's patch features of a window (1, 3, S, S) in [0, 1]."""

    def __init__(self, vfm: nn.Module, label: str | None = None) -> None:
        self.vfm = vfm
        self.info = SourceInfo(f"vfm:{vfm.name}", label or f"{vfm.name} features")

    def infos(self) -> list[SourceInfo]:
        return [self.info]

    @torch.no_grad()
    def __call__(self, window01: Tensor) -> list[Affinity]:
        feats = self.vfm(window01).feats  # (1, C, h', w')
        gh, gw = feats.shape[-2:]
        x = F.normalize(feats[0].flatten(1).t().float(), dim=-1)  # (N', C)
        return [Affinity(self.info, x, x, (gh, gw), self._cell(window01.shape[-2:], (gh, gw)))]

    def _cell(self, size: tuple[int, int], grid: tuple[int, int]) -> tuple[float, float]:
        """Patch stride in window pixels: the model's patch size scaled back from its input size
        (a model that resizes the window, e.g. SAM to 1024², MAE to its build size)."""
        input_size = getattr(self.vfm, "input_size", None)
        patch = getattr(self.vfm, "patch_size", None)
        if input_size is None or patch is None:  # no stated geometry: the grid spans the window
            return size[0] / grid[0], size[1] / grid[1]
        ih, iw = input_size(*size)
        if (ih // patch, iw // patch) != tuple(grid):  # a grid not of patch-size strides: it spans the window
            return size[0] / grid[0], size[1] / grid[1]
        return patch * size[0] / ih, patch * size[1] / iw
