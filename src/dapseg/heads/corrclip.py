"""CorrCLIP (Zhang et al., ICCV 2025): patch correlations reconstructed by region masks and a VFM.

Per window (B windows; CLIP grid (h, w), N = h·w; VFM grid (h', w'), N' = h'·w'; D CLIP width):

1. correlation features f (B, N', C'): the VFM's ``feats`` — for the reference, DINO's last-block
   q + k (``vfm.params.features: qk``) — ℓ2-normalised; S = f fᵀ (B, N', N');
2. the window's region map (``HeadContext.region_masks``) resized (nearest) to the VFM grid and
   merged (``region_merge.merge_regions``: DBSCAN of region-mean features);
3. scope reconstruction: S kept within regions other than the lowest, pairs touching the lowest
   region kept where S > mean(S), the rest −∞; Attn = softmax(τ·S), τ = 4;
4. value reconstruction: CLIP's last-block values v = W_v·LN_1(x) of the patches (CLS dropped),
   bilinear to the VFM grid; main = out_proj(Attn·v);
5. spatial branch: the same for x̄ = the mean of the outputs of the ``spatial_blocks`` blocks before
   the block before the last (5 of 12, 12 of 24, 28 of 32, else depth − 4);
6. semantic branch: one copy of CLS per region of the merged map resized (nearest) to the CLIP grid
   ("mask class tokens") goes through every block, including the last, seeing CLS and its region's
   patches (never another class token; the patches never see them); each VFM patch takes the token
   of its region (that CLIP-grid map resized, nearest, to the VFM grid);
7. fusion after LN_post: LN_post(main) + 1.0·LN_post(spatial) + 0.5·LN_post(semantic), then proj
   (``HeadOutput.branches``).

Facts (constants, orders of operations) are those of the public reference, zdk258/CorrCLIP
``CorrCLIPv1/open_clip/transformer.py`` (``VisionTransformer.forward``). The reference runs one
window at a time (its semantic branch reads batch element 0 only); here a batch of windows gives what
each window gives alone. A row of the scope attention with no kept entry (all of a lowest-region
patch's similarities at or below the mean, e.g. a zero feature vector) is NaN in the reference; it
keeps its maxima here (``affinity.keep_row_maxima_where_empty``), as the proxy head does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from dapseg.heads.affinity import (
    keep_row_maxima_where_empty,
    masked_softmax,
    patch_similarity,
    values_on_grid,
    vfm_grid,
)
from dapseg.heads.base import Attention, Head, HeadContext, HeadOutput, merge_heads, register_head, split_heads
from dapseg.heads.region_merge import merge_regions, resize_nearest, scope_keep
from dapseg.registry import HEADS, Need

# Blocks averaged by the spatial branch, by CLIP depth (the reference's table; else depth − 4).
SPATIAL_BLOCKS = {12: 5, 24: 12, 32: 28}


def spatial_block_count(depth: int) -> int:
    """How many block outputs the spatial branch averages for a CLIP of ``depth`` blocks (at least
    one: the reference has none for fewer than five blocks, and fails; tiny test CLIPs have two)."""
    return max(1, SPATIAL_BLOCKS.get(depth, depth - 4))


def spatial_tokens(layers: tuple[Tensor, ...], count: int) -> Tensor:
    """Mean of the outputs of blocks L−2−count … L−3 (0-based), i.e. ``layers[L−1−count : L−1]``:
    the ``count`` block outputs before the one entering the last block. (B, 1 + N, D)."""
    depth = len(layers)
    if not 1 <= count <= depth - 1:
        raise ValueError(f"spatial_blocks must be in 1..{depth - 1} for a CLIP of {depth} blocks, got {count}")
    return torch.stack(layers[depth - 1 - count : depth - 1]).mean(0)


def value_tokens(block: nn.Module, x: Tensor) -> Tensor:
    """The block's value projection of LN_1(x): (B, 1 + N, D) -> (B, 1 + N, D)."""
    attn: nn.MultiheadAttention = block.attn
    d = attn.embed_dim
    return F.linear(block.ln_1(x), attn.in_proj_weight[2 * d :], attn.in_proj_bias[2 * d :])


def block_on_queries(block: nn.Module, queries: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
    """open_clip's residual block for ``queries`` (B, R, D) attending over ``keys`` (B, M, D) — the
    other tokens of the same layer, which it leaves unchanged — with an additive mask (B·heads, R, M)
    (0 or −∞): q + ls_1(attn(LN_1 q, LN_1 k, LN_1 k)), then + ls_2(mlp(LN_2 ·)).

    The same computation as ``block(cat[queries, keys], attn_mask)`` for the query rows when the keys
    never see the queries; open_clip (3.x) turns a bool ``attn_mask`` into 0/1 floats added to the
    scores, so the mask is handed to the attention module directly, as −∞ entries."""
    attn: nn.MultiheadAttention = block.attn
    q, kv = block.ln_1(queries), block.ln_1(keys)
    if not attn.batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    out = attn(q, kv, kv, need_weights=False, attn_mask=mask.to(q.dtype))[0]
    if not attn.batch_first:
        out = out.transpose(0, 1)
    x = queries + block.ls_1(out)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def class_token_mask(region: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    """The semantic branch's attention mask from region ids on the CLIP grid.

    region (B, N) int64 -> (additive mask (B·heads, R, 1 + N) with 0 where class token r may look — CLS
    and the patches of region r — and −∞ elsewhere; index (B, N) of each patch's region in 0..R−1).
    R is the largest region count of the batch; a window with fewer regions gets spare tokens that
    see CLS only (their output is never read).
    """
    index = torch.stack([torch.unique(r, return_inverse=True)[1] for r in region])  # (B, N)
    count = int(index.max()) + 1
    sees = index[:, None, :] == torch.arange(count, device=region.device)[None, :, None]  # (B, R, N)
    sees = torch.cat([torch.ones_like(sees[:, :, :1]), sees], dim=2)  # CLS first: (B, R, 1 + N)
    mask = torch.zeros(sees.shape, device=region.device).masked_fill(~sees, float("-inf"))
    return mask.repeat_interleave(heads, dim=0), index


def class_tokens(layers: tuple[Tensor, ...], blocks: nn.ModuleList, region: Tensor) -> tuple[Tensor, Tensor]:
    """Mask class tokens after every block: (B, R, D), and each CLIP patch's region index (B, N).

    ``layers[i]`` (B, 1 + N, D) enters ``blocks[i]``; the class tokens start as CLS of ``layers[0]``."""
    mask, index = class_token_mask(region, blocks[0].attn.num_heads)
    tokens = layers[0][:, :1].expand(-1, mask.shape[1], -1)
    for x, block in zip(layers, blocks, strict=True):
        tokens = block_on_queries(block, tokens, x, mask)
    return tokens, index


def scope_attention(feats: Tensor, region: Tensor, temperature: float) -> Tensor:
    """Attn (B, N', N') from VFM features (B, C', h', w') and region ids on their grid (B, N')."""
    s = patch_similarity(feats)  # (B, N', N') float32, features ℓ2-normalised
    keep = keep_row_maxima_where_empty(s, scope_keep(region, s))
    return masked_softmax(s * temperature, keep)


@register_head
class CorrclipHead(Head):
    """CorrCLIP: region-bounded VFM correlations, spatial and semantic branches."""

    name = "corrclip"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        temperature: float = Field(4.0, gt=0, description="τ of Attn = softmax(τ·S) (scope reconstruction)")
        merge_eps: float | None = Field(
            0.2, ge=0, description="DBSCAN eps of mask merging on max(sim) − sim; null: no merging (ablation)")
        spatial_weight: float = Field(1.0, ge=0, description="weight of the spatial branch after LN_post")
        semantic_weight: float = Field(0.5, ge=0, description="weight of the semantic branch after LN_post")
        spatial_blocks: int | None = Field(
            None, ge=1, description="block outputs the spatial branch averages; null: by depth (5 of 12, "
            "12 of 24, 28 of 32, else depth − 4)")

    def __init__(self, params: Params | None = None) -> None:
        super().__init__()
        self.params = params or self.Params()

    @staticmethod
    def declared_needs(params: Params) -> frozenset[Need]:
        """VFM features, the region map of each window, and every CLIP block's input when a branch
        that needs them (spatial, semantic) has a weight."""
        needs = {Need.VFM_FEATURES, Need.REGION_MASKS}
        if params.spatial_weight or params.semantic_weight:
            needs.add(Need.CLIP_LAYERS)
        return frozenset(needs)

    def regions(self, ctx: HeadContext, grid: tuple[int, int]) -> Tensor:
        """The windows' region ids on the VFM grid after mask merging: (B, N') int64."""
        if ctx.region_masks is None:
            raise ValueError(f"head {self.name!r} needs the region masks of each window "
                             "(HeadContext.region_masks); configure a `masks:` generator or --masks-dir")
        b = ctx.x.shape[0]
        if ctx.region_masks.dim() != 3 or ctx.region_masks.shape[0] != b:
            raise ValueError(f"head {self.name!r}: region_masks must be (B, H, W) with B = {b} windows, "
                             f"got {tuple(ctx.region_masks.shape)}")
        region = resize_nearest(ctx.region_masks.long(), grid).flatten(1)  # (B, N')
        if self.params.merge_eps is None:
            return region
        f = F.normalize(ctx.vfm_feats.float().flatten(2), dim=1).transpose(1, 2)  # (B, N', C')
        return torch.stack([merge_regions(region[i], f[i], self.params.merge_eps) for i in range(b)])

    def attention(self, ctx: HeadContext) -> Attention:
        """The scope attention (shared by all CLIP heads) over the main branch's values."""
        grid = vfm_grid(ctx, self.name)
        attn = scope_attention(ctx.vfm_feats, self.regions(ctx, grid), self.params.temperature)
        v = split_heads(value_tokens(ctx.block, ctx.x)[:, 1:], ctx.block.attn.num_heads)
        return Attention(attn=attn.unsqueeze(1), v=values_on_grid(v, ctx.grid, grid), grid=grid, has_cls=False)

    def forward(self, ctx: HeadContext) -> HeadOutput:
        p = self.params
        grid = vfm_grid(ctx, self.name)
        region = self.regions(ctx, grid)  # (B, N') merged ids on the VFM grid
        attn = scope_attention(ctx.vfm_feats, region, p.temperature)  # (B, N', N')
        heads = ctx.block.attn.num_heads
        inputs = [ctx.x]
        if p.spatial_weight:
            layers = self._layers(ctx)
            inputs.append(spatial_tokens(layers, p.spatial_blocks or spatial_block_count(len(layers))))
        values = [values_on_grid(split_heads(value_tokens(ctx.block, x)[:, 1:], heads), ctx.grid, grid)
                  for x in inputs]  # each (B, heads, N', d)
        out = [ctx.block.attn.out_proj(torch.bmm(attn.to(v.dtype), merge_heads(v))) for v in values]  # (B, N', D)
        branches: list[tuple[float, Tensor]] = []
        if p.spatial_weight:
            branches.append((p.spatial_weight, out[1]))
        if p.semantic_weight:
            branches.append((p.semantic_weight, self._semantic(ctx, region, grid)))
        a = Attention(attn=attn.unsqueeze(1), v=values[0], grid=grid, has_cls=False)
        return HeadOutput(tokens=out[0], grid=grid, attention=a, branches=tuple(branches))

    def _layers(self, ctx: HeadContext) -> tuple[Tensor, ...]:
        if ctx.layers is None or ctx.blocks is None:
            raise ValueError(f"head {self.name!r} needs the tokens entering every CLIP block "
                             "(HeadContext.layers and .blocks, Need.CLIP_LAYERS)")
        return ctx.layers

    def _semantic(self, ctx: HeadContext, region: Tensor, grid: tuple[int, int]) -> Tensor:
        """Each VFM patch's mask class token: (B, N', D)."""
        layers = self._layers(ctx)
        b = region.shape[0]
        clip_region = resize_nearest(region.view(b, *grid), ctx.grid)  # (B, h, w)
        tokens, index = class_tokens(layers, ctx.blocks, clip_region.flatten(1))  # (B, R, D), (B, N)
        patch_index = resize_nearest(index.view(b, *ctx.grid), grid).flatten(1)  # (B, N')
        return torch.gather(tokens, 1, patch_index[:, :, None].expand(-1, -1, tokens.shape[-1]))


# FSA reworks one attention over one set of values; CorrCLIP's output fuses three branches after
# LN_post, and FSA's ensemble (W·Attn + Attn·W + W) would re-add the cross-region correlations
# that scope reconstruction removes.
# ``stages``: the region maps with mask merging (DBSCAN), timed by `dapseg bench` as their own stage.
HEADS.attach("corrclip", no_plugins="it fuses three branches after LN_post, and a plug-in's reworked attention "
             "(FSA: W·Attn + Attn·W + W) would re-add the cross-region correlations its scope reconstruction removes",
             stages={"regions": ("CorrclipHead.regions",)})
