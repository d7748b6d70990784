"""pearl: Procrustes-aligned attention in a reduced last block (PEARL, public code PGSmall/PEARL).

Per window and attention head, with q, k (M = 1 + N tokens, CLS first, width d):

1. weights w_i = ‖q_i‖ (0 for CLS), normalised to sum 1 (+1e-6);
2. weighted means q̄ = Σ w_i q_i, k̄ = Σ w_i k_i; centred q_c = q − q̄, k_c = k − k̄ (every token,
   CLS included: only the means are weighted);
3. cross-covariance M = k_cᵀ q_c (d × d, an unweighted sum over the M tokens);
4. R ≈ the orthogonal polar factor of M, M (MᵀM)^(-1/2), with (MᵀM)^(-1/2) from ``polar_steps``
   coupled Newton–Schulz steps on MᵀM / ‖MᵀM‖_F + 1e-6·I (or exactly U Vᵀ from an SVD);
5. logits = q (k R)ᵀ / √d + kk_weight · k_c k_cᵀ / √d (q and k uncentred in the first term);
6. Attn = softmax(logits) over all M tokens, applied to v; out_proj, no residual, no FFN.

Everything is computed in float32 whatever the autocast dtype, as the reference does (a polar
iteration in bf16 would not converge to an orthogonal matrix). Five steps leave R close to, not
exactly, orthogonal when MᵀM is ill-conditioned; the reference uses that R as it is, and so do we.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, field_validator
from torch import Tensor

from dapseg.heads.base import Attention, Head, HeadContext, qkv, register_head

_EPS = 1e-6  # the reference's guard in the weights' normaliser, ‖MᵀM‖ and the identity shift


def polar_newton_schulz(m: Tensor, steps: int, eps: float = _EPS) -> Tensor:
    """(..., d, d) -> M (MᵀM)^(-1/2): the orthogonal polar factor of M after ``steps`` coupled
    Newton–Schulz steps for the inverse square root of A = MᵀM / ‖MᵀM‖_F + eps·I.

    Y₀ = A, Z₀ = I; T = (3I − Z Y)/2, Y ← Y T, Z ← T Z; Z → A^(-1/2). With M = U Σ Vᵀ the exact
    factor is U Vᵀ (``polar_svd``).
    """
    d = m.shape[-1]
    eye = torch.eye(d, dtype=m.dtype, device=m.device).expand_as(m)
    a = m.transpose(-1, -2) @ m
    norm = a.flatten(-2).norm(dim=-1).clamp_min(eps)[..., None, None]  # Frobenius norm per matrix
    y = a / norm + eps * eye
    z = eye
    for _ in range(steps):
        t = 0.5 * (3.0 * eye - z @ y)
        y = y @ t
        z = t @ z
    return m @ (z / norm.sqrt())


def polar_svd(m: Tensor) -> Tensor:
    """(..., d, d) -> U Vᵀ for M = U Σ Vᵀ: the exact orthogonal polar factor."""
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    return u @ vh


def procrustes_logits(
    q: Tensor, k: Tensor, *, kk_weight: float, polar_steps: int, solver: str = "polar", exclude_cls: bool = True
) -> Tensor:
    """q, k (..., M, d) float32, token 0 = CLS -> attention logits (..., M, M) (module docstring)."""
    scale = q.shape[-1] ** -0.5
    w = q.norm(dim=-1, keepdim=True)  # (..., M, 1)
    if exclude_cls:
        w = torch.cat([torch.zeros_like(w[..., :1, :]), w[..., 1:, :]], dim=-2)
    w = w / (w.sum(dim=-2, keepdim=True) + _EPS)
    q_c = q - (w * q).sum(dim=-2, keepdim=True)
    k_c = k - (w * k).sum(dim=-2, keepdim=True)
    m = k_c.transpose(-1, -2) @ q_c  # (..., d, d)
    r = polar_newton_schulz(m, polar_steps) if solver == "polar" else polar_svd(m)
    logits = (q * scale) @ (k @ r).transpose(-1, -2)
    if kk_weight:
        logits = logits + kk_weight * (k_c @ k_c.transpose(-1, -2) * scale)
    return logits


@register_head
class PearlHead(Head):
    """pearl: keys rotated toward the queries (Procrustes, polar Newton–Schulz) + k-k term, reduced block"""

    name = "pearl"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        kk_weight: float = 0.08  # weight of the centred k-k logits (PEARL: 0.08; 0.3 on ADE20K, Cityscapes)
        polar_steps: int = 5  # Newton–Schulz steps of the polar factor (PEARL: 5)
        solver: Literal["polar", "svd"] = "polar"  # svd: the exact polar factor U Vᵀ (the reference's option)
        exclude_cls: bool = True  # CLS gets weight 0 in the q-norm weighted means (PEARL: detach_cls)

        @field_validator("kk_weight")
        @classmethod
        def _non_negative(cls, v: float) -> float:
            if v < 0:
                raise ValueError("kk_weight must be >= 0")
            return v

        @field_validator("polar_steps")
        @classmethod
        def _steps(cls, v: int) -> int:
            if v < 1:
                raise ValueError("polar_steps must be >= 1")
            return v

    def __init__(self, params: Params | None = None) -> None:
        super().__init__()
        self.params = params or self.Params()

    def attention(self, ctx: HeadContext) -> Attention:
        q, k, v = qkv(ctx.block, ctx.x)  # (B, heads, 1 + N, d)
        p = self.params
        with torch.autocast(q.device.type, enabled=False):  # float32, as the reference
            logits = procrustes_logits(q.float(), k.float(), kk_weight=p.kk_weight, polar_steps=p.polar_steps,
                                       solver=p.solver, exclude_cls=p.exclude_cls)
            attn = torch.softmax(logits, dim=-1)
        return Attention(attn=attn, v=v, grid=ctx.grid, has_cls=True)
