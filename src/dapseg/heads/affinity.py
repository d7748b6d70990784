"""Proxy affinity: attention over VFM patches from their feature similarity (ProxyCLIP eqs. 4–8).

Shared by the ``proxy`` and ``dap`` heads so that both compute the affinity, the −∞ masking and the
empty-row rule in exactly one place, and take the VFM grid and CLIP's values on it the same way
(``vfm_grid``, ``patch_values``).

Shapes: B windows, C' VFM channels, (h', w') VFM grid, N' = h'·w' VFM patches.

    x̂ = ℓ2-normalise(VFM features)          (B, N', C')
    S = x̂ x̂ᵀ                                 (B, N', N')  cosine similarity
    A = γ (S − β · mean(S))                  mean over all N'² entries of each window, or, with
                                             mean_scope="image", over every window of the image
                                             (Trident: the reference runs all windows as one batch)
    keep_ij = A_ij ≥ 0  [∧ mutual kNN]       masked entries get −∞ before the softmax
    Attn = row-softmax(A over kept entries)

A row with no kept entry (it happens when β·mean(S) > 1, e.g. nearly parallel features) would be
all −∞, which the reference turns into NaN; such a row keeps the entries equal to its maximum
instead (usually just the diagonal; ties up to float32 rounding, see ``TIE_RTOL``), so it stays
finite and every finite row is unchanged.

``ProxyAffinity`` is the one implementation: it makes any block of rows of Attn, so the windowed
heads take all rows of each window at once and their stitched forms (the whole image as one
window) take ``chunk`` rows at a time, by the same code.

Everything is computed in float32 whatever the input dtype: under fp16/bf16 autocast the sign of
A near 0 (which decides the mask) would otherwise depend on the precision.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from dapseg.heads.base import HeadContext, qkv


def normalized_patches(feats: Tensor) -> Tensor:
    """VFM features (B, C', h', w') -> x̂ (B, N', C'), ℓ2-normalised per patch, float32.

    An all-zero feature vector stays zero (its similarities are 0), never NaN.
    """
    return F.normalize(feats.float().flatten(2), dim=1).transpose(1, 2)


def patch_similarity(feats: Tensor) -> Tensor:
    """S = x̂ x̂ᵀ: (B, C', h', w') -> (B, N', N') cosine similarities of the VFM patches."""
    x = normalized_patches(feats)
    with torch.autocast(x.device.type, enabled=False):  # float32 under autocast too (module docstring)
        return torch.bmm(x, x.transpose(1, 2))


def adaptive_normalize(s: Tensor, beta: float, gamma: float, mean: Tensor | None = None) -> Tensor:
    """A = γ (S − β·mean(S)): (B, N', N') -> (B, N', N').

    mean: None takes the mean per window (batching never mixes windows); a tensor is a mean computed
    elsewhere: one per window (B,), or a scalar, e.g. over every window of the image
    (``image_similarity_mean``).
    """
    if mean is None:
        mean = s.mean(dim=(-2, -1), keepdim=True)  # (B, 1, 1)
    else:
        mean = mean.to(device=s.device, dtype=s.dtype).reshape(-1, 1, 1)  # (1, 1, 1)
    return (s - mean * beta) * gamma


def similarity_sum(feats: Tensor) -> tuple[Tensor, int]:
    """(Σ S over all entries of all windows, number of entries) for VFM features (B, C', h', w').

    Summed in float64 so that a mean over many batches of windows does not depend on how the
    windows were batched (beyond float64 rounding).
    """
    s = patch_similarity(feats)  # (B, N', N')
    return s.double().sum(), s.numel()


def image_similarity_mean(feats_batches: list[Tensor]) -> Tensor:
    """mean(S) over every entry of every window: a list of (B_k, C', h', w') batches -> scalar.

    Equals ``patch_similarity(torch.cat(feats_batches)).mean()`` (the reference's mean over one
    batch holding all windows of the image) whatever the batching.
    """
    if not feats_batches:
        raise ValueError("image_similarity_mean needs the VFM features of at least one window")
    total, count = torch.zeros((), dtype=torch.float64), 0
    for feats in feats_batches:
        s, n = similarity_sum(feats)
        total, count = total + s.cpu(), count + n
    return (total / count).float()


# Tie tolerance of every selection here: entries within TIE_RTOL·(1 + |v|) of a row's k-th largest
# value (mutual k-NN) or of its maximum (empty rows) count as equal to it. Float32 matrix products
# of identical feature vectors differ in the last bits, and depending on the summation order (thread
# count, device, batch) one of them comes out on top; ties must not single out arbitrary patches.
TIE_RTOL = 1e-5


def tied_with(values: Tensor, ref: Tensor) -> Tensor:
    """values >= ref up to the tie tolerance: values >= ref − TIE_RTOL·(1 + |ref|) (broadcasting)."""
    return values >= ref - TIE_RTOL * (1 + ref.abs())


def kth_largest(s: Tensor, k: int) -> Tensor:
    """The k-th largest entry of each row of S (..., n, N'): (..., n); ``k`` > N' is clamped to N'."""
    if k < 1:
        raise ValueError(f"knn must be >= 1 here, got {k}")
    return s.topk(min(k, s.shape[-1]), dim=-1).values[..., -1]


def mutual_neighbours(s: Tensor, kth_rows: Tensor, kth_cols: Tensor) -> Tensor:
    """keep_ij = j ∈ kNN(i) ∧ i ∈ kNN(j) for rows of S: s (..., n, N'), kth_rows (..., n, 1) the k-th
    largest entry of those rows, kth_cols (..., 1, N') that of every row -> bool (..., n, N').

    Tie rule: kNN(i) = the entries of row i at least as large as its k-th largest value v, up to
    TIE_RTOL·(1 + |v|); every entry tied with the k-th is in (deterministic, no arbitrary tie-break, so
    a row may have more than k neighbours). i ∈ kNN(j) reads S_ji as S_ij: S is symmetric up to float
    rounding, which the tolerance absorbs, so a block of rows decides without the other rows of S.
    """
    return tied_with(s, kth_rows) & tied_with(s, kth_cols)


def keep_row_maxima_where_empty(a: Tensor, keep: Tensor) -> Tensor:
    """Rows of ``keep`` with no True entry keep the entries equal to that row's maximum of ``a``.

    Tie rule: "equal" up to float32 rounding, within TIE_RTOL·(1 + |max|) of the maximum.
    a: (B, N', N') float, keep: (B, N', N') bool. Returns a new mask; every row has >= 1 entry.
    """
    empty = ~keep.any(dim=-1, keepdim=True)  # (B, N', 1)
    if not empty.any():
        return keep
    top = a.amax(dim=-1, keepdim=True)
    return keep | (empty & tied_with(a, top))


def masked_softmax(a: Tensor, keep: Tensor) -> Tensor:
    """Row softmax of ``a`` over the kept entries (the others are −∞): (B, N', N')."""
    return a.masked_fill(~keep, float("-inf")).softmax(dim=-1)


def proxy_softmax(a: Tensor, *, mask: bool = True, neighbours: Tensor | None = None) -> Tensor:
    """Attn from A (..., n, N'): row softmax over the entries with A ≥ 0 [∧ ``neighbours``], a row
    left empty keeping its maxima; ``mask`` False: plain softmax over every entry."""
    if not mask:
        return a.softmax(dim=-1)
    keep = a >= 0
    if neighbours is not None:
        keep &= neighbours
    return masked_softmax(a, keep_row_maxima_where_empty(a, keep))


class ProxyAffinity:
    """The row-stochastic proxy attention over the VFM patches of B windows, rows made on demand.

    feats (B, C', h', w'). ``rows(start, end)`` gives attention rows start..end, (B, n, N'); the
    windowed heads take all rows at once (``matrix``), the stitched heads (the image as one window)
    ``chunk`` rows at a time, so S never exists whole there.

    normalize: False uses the plain similarity S instead of A (ProxyCLIP ablation, "w/o
        normalisation"); the mask then drops S < 0.
    mask: False keeps every entry (plain softmax, ProxyCLIP ablation "w/o masking"); ``knn`` is
        then ignored as well.
    knn: > 0 additionally keeps only mutual k-nearest neighbours under S (DAP step 2): the k-th
        largest entry of every row is found first, one pass over the rows in chunks of ``chunk``.
    mean: mean(S) given from outside (a scalar, e.g. over all windows of the image); None: per window,
        over its N'² entries: S.mean() when S is made in one piece (``chunk`` None or ≥ N', the
        windowed heads), else (Σ_i x̂_i)·(Σ_j x̂_j) / N'², the same number without S.
    """

    def __init__(self, feats: Tensor, *, beta: float, gamma: float, normalize: bool = True, mask: bool = True,
                 knn: int = 0, mean: Tensor | None = None, chunk: int | None = None) -> None:
        self.x = normalized_patches(feats)  # (B, N', C') float32
        self.n = self.x.shape[1]
        self.beta, self.gamma, self.normalize, self.mask = beta, gamma, normalize, mask
        chunk = self.n if chunk is None else chunk
        self._whole: Tensor | None = None  # S made in one piece, handed to the first ``rows(0, N')``
        if chunk >= self.n:
            self._whole = self.similarity(0, self.n)  # (B, N', N')
            if normalize and mean is None:
                mean = self._whole.mean(dim=(-2, -1))  # (B,)
        elif normalize and mean is None:
            total = self.x.sum(1)  # (B, C')
            mean = (total * total).sum(-1) / self.n**2  # (B,)
        self.mean = mean
        self.kth: Tensor | None = None  # (B, N') k-th largest entry of every row of S
        if mask and knn > 0:
            if self._whole is not None:
                self.kth = kth_largest(self._whole, knn)
            else:
                self.kth = torch.cat([kth_largest(self.similarity(s, min(s + chunk, self.n)), knn)
                                      for s in range(0, self.n, chunk)], dim=1)

    def similarity(self, start: int, end: int) -> Tensor:
        """Rows start..end of S = x̂ x̂ᵀ: (B, n, N'), float32 under autocast too (module docstring)."""
        if self._whole is not None and (start, end) == (0, self.n):
            s, self._whole = self._whole, None  # made once, handed over once
            return s
        with torch.autocast(self.x.device.type, enabled=False):
            return torch.bmm(self.x[:, start:end], self.x.transpose(1, 2))

    def rows(self, start: int, end: int) -> Tensor:
        """Attention rows start..end: (B, n, N'), each summing to 1."""
        s = self.similarity(start, end)
        a = adaptive_normalize(s, self.beta, self.gamma, self.mean) if self.normalize else s
        neighbours = None
        if self.kth is not None:
            neighbours = mutual_neighbours(s, self.kth[:, start:end, None], self.kth[:, None, :])
        del s
        return proxy_softmax(a, mask=self.mask, neighbours=neighbours)

    def matrix(self) -> Tensor:
        """All rows: (B, N', N')."""
        return self.rows(0, self.n)


def values_on_grid(v: Tensor, grid: tuple[int, int], out_grid: tuple[int, int]) -> Tensor:
    """CLIP patch values (B, heads, h·w, d) -> (B, heads, h'·w', d), bilinear, align_corners=False.

    The CLIP grid (h, w) and the VFM grid (h', w') cover the same window; values are resized as
    images (one channel per head dimension), as the ProxyCLIP reference does.
    """
    b, heads, n, d = v.shape
    (h, w), (oh, ow) = grid, out_grid
    if n != h * w:
        raise ValueError(f"{n} value tokens do not fill the CLIP grid {h}x{w}")
    if (h, w) == (oh, ow):
        return v
    img = v.reshape(b * heads, h, w, d).permute(0, 3, 1, 2)  # (B·heads, d, h, w)
    img = F.interpolate(img, size=(oh, ow), mode="bilinear", align_corners=False)
    return img.permute(0, 2, 3, 1).reshape(b, heads, oh * ow, d)


def vfm_grid(ctx: HeadContext, head: str) -> tuple[int, int]:
    """(h', w') of the VFM features; a clear error when the pipeline gave none."""
    if ctx.vfm_feats is None:
        raise ValueError(
            f"head {head!r} needs VFM features (HeadContext.vfm_feats); configure a `vfm:` section"
        )
    if ctx.vfm_feats.dim() != 4 or ctx.vfm_feats.shape[0] != ctx.x.shape[0]:
        raise ValueError(
            f"head {head!r}: vfm_feats must be (B, C, h, w) with B = {ctx.x.shape[0]} windows, "
            f"got {tuple(ctx.vfm_feats.shape)}"
        )
    return int(ctx.vfm_feats.shape[-2]), int(ctx.vfm_feats.shape[-1])


def patch_values(ctx: HeadContext, out_grid: tuple[int, int]) -> Tensor:
    """The last block's value tokens of the CLIP patches (CLS dropped) on ``out_grid``.

    Returns (B, heads, h'·w', d).
    """
    _, _, v = qkv(ctx.block, ctx.x)  # (B, heads, 1 + N, d)
    return values_on_grid(v[:, :, 1:], ctx.grid, out_grid)


MeanScope = Literal["window", "image"]
MEAN_SCOPE_HELP = (
    "where mean(S) of A = γ(S − β·mean(S)) is taken: per window (ProxyCLIP, one window at a time) "
    "or over all windows of the image (Trident, which runs them as one batch)"
)


def affinity_mean(ctx: HeadContext, head: str, scope: MeanScope) -> Tensor | None:
    """The image-wide mean(S) the strategy computed (scope "image"), or None (scope "window")."""
    if scope == "window":
        return None
    if ctx.affinity_mean is None:
        raise ValueError(
            f"head {head!r} with mean_scope='image' needs the mean similarity over all windows of the "
            "image (HeadContext.affinity_mean), which the inference strategy computes; "
            "use mean_scope='window' when calling the head directly"
        )
    return ctx.affinity_mean
