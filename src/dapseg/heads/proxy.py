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
from torch import Tensor, nn

from dapseg.heads.affinity import MEAN_SCOPE_HELP, MeanScope, ProxyAffinity, affinity_mean, patch_values, vfm_grid
from dapseg.heads.base import Attention, Head, HeadContext, merge_heads, register_head
from dapseg.heads.stitched import StitchedTokens, rows_times
from dapseg.registry import Need


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

    @staticmethod
    def declared_needs(params: Params) -> frozenset[Need]:
        """VFM features always (their grid); the VFM's own attention for ``affinity='vfm_attention'``;
        the image-wide mean similarity with ``mean_scope='image'`` (normalised feature affinity)."""
        needs = {Need.VFM_FEATURES}
        if params.affinity == "vfm_attention":
            needs.add(Need.VFM_ATTENTION)
        elif params.mean_scope == "image" and params.normalize:
            needs.add(Need.AFFINITY_MEAN)
        return frozenset(needs)

    def affinity(self, ctx: HeadContext, mean: Tensor | None, chunk: int | None = None) -> ProxyAffinity:
        """The proxy attention of the VFM features of ``ctx``, rows on demand."""
        p = self.params
        return ProxyAffinity(ctx.vfm_feats, beta=p.beta, gamma=p.gamma, normalize=p.normalize, mask=p.mask,
                             mean=mean, chunk=chunk)

    def attention(self, ctx: HeadContext) -> Attention:
        p = self.params
        grid = vfm_grid(ctx, self.name)
        if p.affinity == "vfm_attention":
            attn = mean_vfm_attention(ctx, grid[0] * grid[1])
        else:
            attn = self.affinity(ctx, affinity_mean(ctx, self.name, p.mean_scope) if p.normalize else None).matrix()
        # One attention for all CLIP heads: (B, 1, N', N') broadcasts against v (B, heads, N', d).
        return Attention(attn=attn.unsqueeze(1), v=patch_values(ctx, grid), grid=grid, has_cls=False)

    def stitched(self, block: nn.Module, st: StitchedTokens, chunk: int) -> tuple[Tensor, tuple[int, int]]:
        """Over all stitched VFM patches, mean(S) over the image (now the one window): (N', D) on (gh', gw')."""
        if self.params.affinity != "features":
            raise ValueError("inference.mode=stitch needs head.params.affinity=features: the VFM's own "
                             "attention exists per window only")
        ctx = st.context(block)
        grid = vfm_grid(ctx, self.name)
        rows = self.affinity(ctx, None, chunk).rows  # (1, n, N')
        z = rows_times(rows, patch_values(ctx, grid)[0], chunk)  # (heads, N', d)
        return block.attn.out_proj(merge_heads(z[None]))[0], grid
