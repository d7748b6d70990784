"""sclip: correlative self-attention softmax(q qᵀ·s) + softmax(k kᵀ·s) in the full last block (SCLIP)."""

from __future__ import annotations

import torch

from dapseg.heads.base import Attention, Head, HeadContext, HeadOutput, qkv, register_head
from dapseg.heads.vanilla import full_block


@register_head
class SclipHead(Head):
    name = "sclip"

    def attention(self, ctx: HeadContext) -> Attention:
        q, k, v = qkv(ctx.block, ctx.x)  # (B, heads, 1 + N, d), CLS included as in SCLIP
        s = q.shape[-1] ** -0.5
        attn = torch.softmax(q @ q.transpose(-1, -2) * s, dim=-1) + torch.softmax(
            k @ k.transpose(-1, -2) * s, dim=-1
        )  # rows sum to 2, as in SCLIP
        return Attention(attn=attn, v=v, grid=ctx.grid, has_cls=True)

    def forward(self, ctx: HeadContext) -> HeadOutput:
        # SCLIP keeps the residual and FFN of the last block around its attention.
        a = self.attention(ctx)
        out = full_block(ctx, ctx.block.attn.out_proj(self.aggregate(a)))
        return HeadOutput(tokens=out[:, 1:], grid=ctx.grid, attention=a)
