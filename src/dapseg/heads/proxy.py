"""ProxyCLIP's proxy attention head (Lan et al., ECCV 2024, eqs. 4–8).

The last CLIP block is replaced by a reduced block whose attention comes from a vision foundation
model: Attn = softmax(A + M) over the VFM patches (see ``affinity.py``), shared by all CLIP heads,
applied to CLIP's patch value tokens resized to the VFM grid; out = out_proj(Attn · v). The output
lives on the VFM grid (h', w'), not on the CLIP grid.

Ablations (ProxyCLIP Table 4): ``normalize=False`` uses the raw cosine similarity S in place of
A = γ(S − β·mean S) (masking then drops S < 0); ``mask=False`` drops the −∞ masking (plain softmax);
``affinity="vfm_attention"`` uses the VFM's own last-layer attention, averaged over its heads, as
Attn (β, γ, normalize and mask do not apply to it).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from dapseg.heads.affinity import proxy_attention, values_on_grid
from dapseg.heads.base import Attention, Head, HeadContext, qkv, register_head


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


def mean_vfm_attention(ctx: HeadContext, n: int) -> Tensor:
    """The VFM's last-layer attention over its patches, averaged over heads: (B, N', N').

    Rows are renormalised to sum to 1 because the VFM's softmax also ran over tokens that are not
    patches (CLS, registers) which the attention handed to heads has dropped.
    """
    if ctx.vfm_attn is None:
        raise ValueError(
            "affinity='vfm_attention' needs the VFM's last-layer attention (HeadContext.vfm_attn); "
            "the pipeline must run the VFM with return_attn=True"
        )
    attn = ctx.vfm_attn.float().mean(dim=1)  # (B, N', N')
    if attn.shape[-2:] != (n, n):
        raise ValueError(f"vfm_attn covers {attn.shape[-1]} tokens, the VFM grid has {n} patches")
    return attn / attn.sum(dim=-1, keepdim=True).clamp_min(1e-12)


@register_head
class ProxyHead(Head):
    """Proxy attention from VFM features (ProxyCLIP)."""

    name = "proxy"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        beta: float = Field(1.2, ge=0, description="shift β: A = γ(S − β·mean(S))")
        gamma: float = Field(3.0, gt=0, description="scale γ of the adaptive normalisation")
        normalize: bool = Field(True, description="False: use the raw similarity S (ablation)")
        mask: bool = Field(True, description="False: no −∞ masking of A < 0 (ablation)")
        affinity: Literal["features", "vfm_attention"] = Field(
            "features", description="vfm_attention: the VFM's own last-layer attention (ablation)"
        )
        mean_scope: MeanScope = Field("window", description=MEAN_SCOPE_HELP)

    def __init__(self, params: Params | None = None) -> None:
        super().__init__()
        self.params = params or self.Params()

    @property
    def needs_vfm_attention(self) -> bool:
        """Whether the pipeline must ask the VFM for its last-layer attention."""
        return self.params.affinity == "vfm_attention"

    @property
    def needs_image_mean(self) -> bool:
        """Whether the strategy must supply mean(S) over all windows (HeadContext.affinity_mean)."""
        p = self.params
        return p.mean_scope == "image" and p.affinity == "features" and p.normalize

    def attention(self, ctx: HeadContext) -> Attention:
        p = self.params
        grid = vfm_grid(ctx, self.name)
        if p.affinity == "vfm_attention":
            attn = mean_vfm_attention(ctx, grid[0] * grid[1])
        else:
            mean = affinity_mean(ctx, self.name, p.mean_scope) if self.needs_image_mean else None
            attn = proxy_attention(
                ctx.vfm_feats, beta=p.beta, gamma=p.gamma, normalize=p.normalize, mask=p.mask, mean=mean
            )
        # One attention for all CLIP heads: (B, 1, N', N') broadcasts against v (B, heads, N', d).
        return Attention(attn=attn.unsqueeze(1), v=patch_values(ctx, grid), grid=grid, has_cls=False)
