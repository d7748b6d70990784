"""vanilla: CLIP's last block as trained (the CLIP baseline)."""

from __future__ import annotations

import torch

from dapseg.heads.base import Attention, Head, HeadContext, HeadOutput, qkv, register_head


def full_block(ctx: HeadContext, attn_out: torch.Tensor) -> torch.Tensor:
    """The last block with a given attention output (B, 1 + N, D): residual, LayerScale, FFN."""
    block = ctx.block
    x = ctx.x + block.ls_1(attn_out)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


@register_head
class VanillaHead(Head):
    """Full last block; its q-k attention is exposed for plug-ins."""

    name = "vanilla"

    def attention(self, ctx: HeadContext) -> Attention:
        q, k, v = qkv(ctx.block, ctx.x)  # (B, heads, 1 + N, d)
        attn = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        return Attention(attn=attn, v=v, grid=ctx.grid, has_cls=True)

    def forward(self, ctx: HeadContext) -> HeadOutput:
        a = self.attention(ctx)
        out = full_block(ctx, ctx.block.attn.out_proj(self.aggregate(a)))
        return HeadOutput(tokens=out[:, 1:], grid=ctx.grid, attention=a)
