"""Global affinity from SAM's last encoder block, for splice-then-segment (Trident).

SAM's image encoder sees the whole image at 1024 (long side; the rest is padding). Its last block is
a global-attention block; from it we take, per head h, the attention W^h (softmax over all G = 64·64
grid tokens, relative positions included) and the value tokens v^h. Restricted to the N tokens that
cover the image (the "valid" grid, vh × vw), Trident builds an N × N affinity from them and moves the
spliced CLIP features with it (public reference YuHengsss/Trident, ``get_sam_sim``):

    C^h_ij = cos(v^h_i, v^h_j)                            per-head cosine of the value tokens
    ε_i    = cos_fac · mean_{h,j} C^h_ij                  a per-row threshold, then
             ε_i = 0.6 where ε_i < 0 (only if refine_neg_cos is False), and ε_i ≤ 0.9
    aff:   A_ij ∝ mean_h W^h_ij · [C^h_ij > ε_i]          (W + M), M = −W where C ≤ ε, L1 row-normalised
    attn:  A_ij ∝ mean_h W^h_ij                           the attention alone (paper's Table 3 ablation)
    cos:   A_ij ∝ exp(s · C̄_ij) · [C̄_ij > ε_i]           masked softmax of the head-mean cosine C̄ (ablation)

W^h_ij is the attention restricted to valid columns (not re-softmaxed: the L1 row normalisation does
it). Where every entry of a row is masked the reference divides 0 by 0; we keep the row's largest
unmasked weight(s) instead (ties, up to 1e-5·(1 + |max|), share equally), so the result equals the
reference wherever that is finite and is never NaN.

Nothing here materialises an N × N (let alone G × G per head) matrix: attention rows are recomputed
from q, k in chunks of rows, so memory grows as heads · chunk · G.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from dapseg.models.sam.encoder import SamLastAttention

AffinityKind = Literal["cos", "attn", "aff"]


class AffinityParams(BaseModel):
    """Settings of the SAM global affinity (``inference.params`` of the splice strategy)."""

    model_config = ConfigDict(extra="forbid")

    kind: AffinityKind = "aff"
    cos_fac: float = 1.2  # ε_i = cos_fac · mean cosine of row i (reference; VOC20 0.0, Cityscapes 3.0)
    refine_neg_cos: bool = True  # False: a negative ε becomes 0.6 (reference: ADE20K, Cityscapes)
    neg_thresh: float = 0.6  # the ε used for negative thresholds when refine_neg_cos is False
    max_thresh: float = 0.9  # ε is clamped to at most this (the diagonal, cos = 1, always survives)
    cos_scale: float = 1.0  # s of the `cos` kind (softmax temperature 1/s)
    chunk: int = Field(default=512, ge=1)  # query rows per chunk (memory ∝ heads · chunk · G)


def _threshold(c_mean_row: Tensor, p: AffinityParams) -> Tensor:
    """ε_i from mean_{h,j} C^h_ij: (n,) -> (n,)."""
    eps = p.cos_fac * c_mean_row
    if not p.refine_neg_cos:
        eps = torch.where(eps < 0, torch.full_like(eps, p.neg_thresh), eps)
    return eps.clamp(max=p.max_thresh)


def _normalise_rows(a: Tensor, fallback: Tensor) -> Tensor:
    """L1-normalise rows of a (n, N); rows of zero mass keep the largest entries of ``fallback``."""
    mass = a.sum(-1, keepdim=True)
    empty = mass <= 0
    if bool(empty.any()):
        peak = fallback.amax(-1, keepdim=True)
        # Tie rule as for the heads' empty rows: within 1e-5·(1 + |max|) of the maximum counts as
        # the maximum (float rounding must not single out one of equal entries); ties share equally.
        top = fallback >= peak - 1e-5 * (1 + peak.abs())
        a = torch.where(empty, top.to(a.dtype), a)
        mass = a.sum(-1, keepdim=True)
    return a / mass


def affinity_rows(w: Tensor | None, c: Tensor, p: AffinityParams) -> Tensor:
    """Affinity rows from per-head attention and cosine rows.

    w: (heads, n, N) attention rows restricted to the N valid columns (None for kind ``cos``);
    c: (heads, n, N) cosine of value tokens of the same rows/columns. Returns (n, N), rows sum to 1.
    Each row sees all N columns, so its threshold ε_i is computed from the row itself.
    """
    if p.kind == "attn":
        if w is None:
            raise ValueError("affinity kind 'attn' needs the attention rows")
        wm = w.mean(0)
        return _normalise_rows(wm, wm)
    eps = _threshold(c.mean(dim=(0, 2)), p)[:, None]  # (n, 1)
    if p.kind == "cos":
        cm = c.mean(0)  # (n, N)
        logits = (p.cos_scale * cm).masked_fill(~(cm > eps), float("-inf"))
        keep_any = (cm > eps).any(-1, keepdim=True)
        # A masked softmax with a max-shift; rows with nothing kept fall back below.
        shifted = logits - torch.where(keep_any, logits.amax(-1, keepdim=True), torch.zeros_like(eps))
        return _normalise_rows(torch.exp(shifted), cm)
    if p.kind == "aff":
        if w is None:
            raise ValueError("affinity kind 'aff' needs the attention rows")
        kept = torch.where(c > eps[None], w, torch.zeros_like(w)).mean(0)  # (n, N)
        return _normalise_rows(kept, w.mean(0))
    raise ValueError(f"unknown affinity kind {p.kind!r}; valid kinds: cos, attn, aff")


def valid_grid(input_size: tuple[int, int], patch: int = 16) -> tuple[int, int]:
    """The SAM grid cells covering the resized image (the rest of 1024 × 1024 is padding).

    The reference floors: a last partial patch row/column is dropped.
    """
    return max(1, input_size[0] // patch), max(1, input_size[1] // patch)


class GlobalAffinity:
    """The N × N affinity over the valid SAM grid (vh, vw), applied in chunks of rows."""

    def __init__(self, last: SamLastAttention, valid: tuple[int, int], params: AffinityParams | None = None):
        gh, gw = last.grid
        vh, vw = valid
        if not (1 <= vh <= gh and 1 <= vw <= gw):
            raise ValueError(f"valid grid {valid} does not fit in the SAM grid {last.grid}")
        self.last = last
        self.valid = (vh, vw)
        self.params = params or AffinityParams()
        ys, xs = torch.meshgrid(torch.arange(vh), torch.arange(vw), indexing="ij")
        self.index = (ys * gw + xs).reshape(-1).to(last.q.device)  # (N,) grid index of each valid token
        self.v_hat = F.normalize(last.v[:, self.index].float(), dim=-1)  # (heads, N, d)

    @property
    def n(self) -> int:
        return int(self.index.numel())

    def rows(self, start: int, end: int) -> Tensor:
        """Affinity rows start..end of the valid tokens: (end − start, N)."""
        sel = self.index[start:end]
        c = self.v_hat[:, start:end] @ self.v_hat.transpose(-2, -1)  # (heads, n, N)
        w = None
        if self.params.kind != "cos":
            w = self.last.attention_rows(sel)[:, :, self.index]  # (heads, n, N) valid columns only
        return affinity_rows(w, c, self.params)

    def dense(self) -> Tensor:
        """The whole (N, N) matrix, for inspection and tests only."""
        return self.rows(0, self.n)

    def aggregate(self, feats: Tensor, chunk: int | None = None) -> Tensor:
        """A · f for f (N, D) on the valid grid (row-major), in chunks of rows: (N, D)."""
        if feats.shape[0] != self.n:
            raise ValueError(f"features have {feats.shape[0]} tokens, the affinity {self.n}")
        chunk = chunk or self.params.chunk
        f = feats.float()
        out = torch.empty_like(f)
        for s in range(0, self.n, chunk):
            e = min(s + chunk, self.n)
            out[s:e] = self.rows(s, e) @ f
        return out.to(feats.dtype)


def aggregate_map(feats: Tensor, affinity: GlobalAffinity, chunk: int | None = None) -> Tensor:
    """Resize a feature map (D, h, w) onto the valid SAM grid and aggregate it: (D, vh, vw).

    Bilinear, align_corners=False, as the reference resizes the spliced map to SAM's grid; any aspect
    ratio works because the valid grid follows the image's.
    """
    vh, vw = affinity.valid
    d = feats.shape[0]
    f = feats[None].float()
    if f.shape[-2:] != (vh, vw):
        f = F.interpolate(f, size=(vh, vw), mode="bilinear", align_corners=False)
    out = affinity.aggregate(f[0].reshape(d, -1).T, chunk)  # (N, D)
    return out.T.reshape(d, vh, vw).to(feats.dtype)
