"""The last-block head interface.

A head replaces CLIP's last transformer block for dense prediction. Most heads are an attention
matrix applied to the block's value tokens followed by the block's output projection (the
"reduced block"); splitting a head into ``attention`` (what attends to what) and ``aggregate``
(how the attention moves the values) lets plug-ins such as FSA rework the attention of any head
without the head knowing about it.

Shapes: B windows, D CLIP width, ``heads`` attention heads of width d = D / heads, N = h·w CLIP
patches, M tokens the attention runs over (N or 1 + N with CLS, or N' = h'·w' VFM patches).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel
from torch import Tensor, nn

from dapseg.registry import HEADS, Need

if TYPE_CHECKING:
    from dapseg.heads.stitched import StitchedForm


@dataclass
class HeadContext:
    """Everything a head may look at for a batch of windows."""

    x: Tensor  # (B, 1 + N, D) tokens entering the last CLIP block, CLS first
    grid: tuple[int, int]  # (h, w) CLIP patch grid of the windows
    block: nn.Module  # open_clip ResidualAttentionBlock: ln_1, attn (nn.MultiheadAttention), ln_2, mlp, ls_*
    vfm_feats: Tensor | None = None  # (B, C', h', w') VFM patch features of the same windows
    vfm_attn: Tensor | None = None  # (B, heads', N', N') VFM last-layer attention over its patch tokens
    images: Tensor | None = None  # (B, 3, H, W) window pixels in [0, 1], unnormalised (e.g. for SLIC)
    # mean(S) of the VFM patch similarity over every window of the image, a scalar: given by the
    # strategy to heads with mean_scope="image" (Trident); None for per-window means.
    affinity_mean: Tensor | None = None
    # The tokens entering every CLIP block, batch first: layers[i] (B, 1 + N, D) enters blocks[i];
    # layers[-1] is ``x``. Given to heads that declare Need.CLIP_LAYERS (multi-level features,
    # re-running blocks with other tokens); None otherwise. ``blocks`` are open_clip's residual blocks
    # (batch first: open_clip >= 2.24 runs its transformer batch first).
    layers: tuple[Tensor, ...] | None = None
    blocks: nn.ModuleList | None = None
    # (B, H, W) int64 region map of each window at its (padded) pixel size: the image's map from the
    # mask generator, resized (nearest) to the processed image and cropped like the pixels; padded
    # pixels hold dapseg.masks.base.PAD_SENTINEL (10000). Given to heads that declare
    # Need.REGION_MASKS; None otherwise.
    region_masks: Tensor | None = None


@dataclass
class Attention:
    """A head's attention and the values it moves."""

    attn: Tensor  # (B, H, M, M) row-stochastic; H = heads, or 1 when shared by all heads
    v: Tensor  # (B, heads, M, d) value tokens per head, on the same M tokens
    grid: tuple[int, int]  # grid of the patch tokens among the M (h·w or h'·w')
    has_cls: bool  # token 0 is CLS (dropped from the head's output)


@dataclass
class HeadOutput:
    tokens: Tensor  # (B, n, D) patch tokens before LN_post / proj, n = grid[0] * grid[1]
    grid: tuple[int, int]
    attention: Attention | None = None  # what produced the tokens, for plug-ins and inspection
    # Further branches fused after LN_post: (weight, tokens (B, n, D)) each; the embeddings are
    # proj(LN_post(tokens) + Σ weight · LN_post(branch tokens)) (CorrCLIP). Empty for most heads.
    branches: tuple[tuple[float, Tensor], ...] = ()


def split_heads(t: Tensor, num_heads: int) -> Tensor:
    """(B, M, D) -> (B, heads, M, d)."""
    b, m, dim = t.shape
    return t.reshape(b, m, num_heads, dim // num_heads).transpose(1, 2)


def merge_heads(t: Tensor) -> Tensor:
    """(B, heads, M, d) -> (B, M, D)."""
    b, h, m, d = t.shape
    return t.transpose(1, 2).reshape(b, m, h * d)


def attend(attn: Tensor, v: Tensor) -> Tensor:
    """attn (B, H|1, n, M) · v (B, heads, M, d) -> (B, heads, n, d).

    An attention shared by all heads (H = 1, e.g. the proxy attention) multiplies all heads' values
    at once, (B, n, M) · (B, M, heads·d): a broadcast matmul would first copy the (n, M) matrix
    once per head, which costs more than the product itself for VFM-sized grids.
    """
    attn = attn.to(v.dtype)
    heads = v.shape[1]
    if attn.shape[1] == 1 and heads > 1:
        return split_heads(torch.matmul(attn[:, 0], merge_heads(v)), heads)
    return torch.matmul(attn, v)


def qkv(block: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The last block's q, k, v of LN_1(x), each (B, heads, M, d)."""
    attn: nn.MultiheadAttention = block.attn
    h = block.ln_1(x)
    q, k, v = nn.functional.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    return tuple(split_heads(t, attn.num_heads) for t in (q, k, v))  # type: ignore[return-value]


class Head(nn.Module):
    """Base class: reduced block out_proj(Attn · v) over whatever ``attention`` returns.

    Subclasses implement ``attention``; a head that is not of that shape (the full vanilla block)
    overrides ``forward`` as well but still offers ``attention`` for plug-ins.
    """

    name: str = ""
    # The head over the stitched tokens of a whole image (``inference.mode: stitch``): a method
    # ``stitched(block, tokens, chunk)`` computed by the same code as ``attention``, rows in chunks
    # (``heads/stitched.py``); None: the head does not run in stitch mode.
    stitched: StitchedForm | None = None

    @staticmethod
    def declared_needs(params: Any) -> frozenset[Need]:
        """What the head needs from the pipeline with ``params`` (its Params object or None)."""
        return frozenset()

    def attention(self, ctx: HeadContext) -> Attention:
        raise NotImplementedError

    def aggregate(self, a: Attention) -> Tensor:
        """Attn · v with heads merged: (B, M, D)."""
        return merge_heads(attend(a.attn, a.v))

    def project(self, ctx: HeadContext, a: Attention, z: Tensor) -> HeadOutput:
        """out_proj of the aggregated values, CLS dropped: the reduced block's output."""
        out = ctx.block.attn.out_proj(z)
        if a.has_cls:
            out = out[:, 1:]
        return HeadOutput(tokens=out, grid=a.grid, attention=a)

    def forward(self, ctx: HeadContext) -> HeadOutput:
        a = self.attention(ctx)
        return self.project(ctx, a, self.aggregate(a))


def register_head(cls: type[Head]) -> type[Head]:
    """Class decorator: register a head in ``dapseg.registry.HEADS`` under its ``name``, with its
    ``Params`` model and its ``declared_needs`` (see ``Head.declared_needs``)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    params = getattr(cls, "Params", None)
    doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip().splitlines()  # class, else module
    HEADS.register(cls.name, params=params, needs=cls.declared_needs, description=doc[0] if doc else "")(cls)
    return cls


def build_head(name: str, params: dict[str, Any] | BaseModel | None = None, **provided: Any) -> Head:
    """Build head ``name`` with its validated params; ``provided`` holds the models it may need
    (e.g. ``sam_decoder``), of which it receives only those it declared."""
    return HEADS.build(name, params, **provided)
