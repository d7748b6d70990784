"""Matmul FLOPs of a call, counted by ``torch.utils.flop_counter.FlopCounterMode``.

The counter sees every aten matmul-like op (mm, bmm, addmm, baddbmm, convolution, scaled dot-product
attention, einsum through its bmm) and counts 2·m·n·k per product; element-wise work (softmax,
normalisation, interpolation) is not counted. That is the quantity a matmul rate can be compared to.

Two ops it does not know, which would otherwise count as zero: ``aten._native_multi_head_attention``,
the fused path that ``nn.MultiheadAttention`` (open_clip's CLIP blocks) takes in inference, and
``aten._scaled_dot_product_flash_attention_for_cpu``, CPU's kernel behind
``F.scaled_dot_product_attention`` (timm's DINO/DINOv2 blocks, SAM's global blocks). ``mha_flop``
and ``sdpa_cpu_flop`` supply them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode


def mha_flop(query: torch.Size, key: torch.Size, value: torch.Size, embed_dim: int, num_head: int,
             *args: Any, **kwargs: Any) -> int:
    """FLOPs of ``_native_multi_head_attention`` on query (B, T, E), key/value (B, S, E).

    In-projections (q: T·E·E, k and v: S·E·E each), scores q·kᵀ and attn·v (T·S·E each, all heads
    together) and the output projection (T·E·E), 2 FLOPs per multiply-add.
    """
    b, t, e = query
    s = key[-2]
    macs = b * (t * e * e + 2 * s * e * e + 2 * t * s * e + t * e * e)
    return 2 * macs


def sdpa_cpu_flop(query: torch.Size, key: torch.Size, value: torch.Size, *args: Any, **kwargs: Any) -> int:
    """FLOPs of CPU's fused attention on query (B, H, T, d), key (B, H, S, d), value (B, H, S, d_v):
    q·kᵀ (T·S·d) and attn·v (T·S·d_v) per batch and head, 2 FLOPs per multiply-add."""
    *batch, t, d = query
    s, dv = key[-2], value[-1]
    n = 1
    for x in batch:
        n *= x
    return 2 * n * t * s * (d + dv)


CUSTOM_FLOPS = {
    torch.ops.aten._native_multi_head_attention: mha_flop,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa_cpu_flop,
}


def count_flops(fn: Callable[[], Any]) -> tuple[int, Any]:
    """Run ``fn()`` once under the counter: (matmul FLOPs, what ``fn`` returned)."""
    with FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS) as counter:
        result = fn()
    return int(counter.get_total_flops()), result
