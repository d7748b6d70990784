"""maskclip: the reduced block with attention = identity (value tokens only), as MaskCLIP."""

from __future__ import annotations

import torch

from dapseg.heads.base import Attention, Head, HeadContext, HeadOutput, merge_heads, qkv, register_head


@register_head
class MaskClipHead(Head):
    name = "maskclip"

    def attention(self, ctx: HeadContext) -> Attention:
        _, _, v = qkv(ctx.block, ctx.x[:, 1:])  # patch tokens only: (B, heads, N, d)
        n = v.shape[-2]
        eye = torch.eye(n, dtype=v.dtype, device=v.device).expand(v.shape[0], 1, n, n)
        return Attention(attn=eye, v=v, grid=ctx.grid, has_cls=False)

    def forward(self, ctx: HeadContext) -> HeadOutput:
        # Identity attention: skip the N×N product (it would dominate for large whole-image inputs).
        _, _, v = qkv(ctx.block, ctx.x[:, 1:])
        out = ctx.block.attn.out_proj(merge_heads(v))
        return HeadOutput(tokens=out, grid=ctx.grid, attention=None)
