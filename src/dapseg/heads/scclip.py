"""scclip: SC-CLIP's self-calibrated last block (anomaly tokens, mid-layer similarity, multi-level fusion).

Facts from the public code (SuleBai/SC-CLIP, ``clip/model.py`` ``VisionTransformer.forward``). Layer
numbers are the official ones: layer i is the output of block i (0-based), ``HeadContext.layers[i + 1]``;
the last of them (layer L − 2) is ``ctx.x``, the tokens entering the last block. Per window:

1. anomaly tokens: the ``contamination`` fraction of the patch tokens of ctx.x with the highest
   outlier score (``dapseg.heads.outliers``) are replaced by the mean of their non-outlier 3×3 grid
   neighbours; the CLS token is set aside (c) and the block runs on patch tokens only;
2. pre-adjustment: S = cosine similarity of the patch tokens of layer ``pre_adjust_layer`` (their
   anomaly tokens replaced at the same positions); x ← W(S)·x with W(S) = S·[S ≥ β] normalised per
   row (+1e-6);
3. the last block, reduced: h = LN_1(x), Attn = (softmax over {A ≥ 0} of A = γ(S − mean(S)) +
   softmax(k kᵀ/√d)) / 2 per head, out = out_proj(Attn·v) + ``cls_residual``·c;
4. post-adjustment: out ← W(S')·out, S' = cosine similarity of the patch tokens of layer
   ``post_adjust_layer`` (anomaly tokens not replaced);
5. multi-level fusion: R = Σ layers ``fusion_start`` .. ``fusion_end`` − 1 (CLS included, no
   anomaly replacement), r = the reduced block of step 3 on R's patch tokens (its own k, v; the same
   S) + ``cls_residual``·R's CLS, r ← W(S')·r; the head's tokens are out + r.

FSA reworks the attention of step 3 (the one the head reports); the CLS residual, step 4 and the
multi-level branch (its own attention) are applied to FSA's output as to the plain one.

On a CLIP with fewer blocks than a layer number names (the 2-block test model) the number is clamped
to the deepest layer, with a warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from dapseg.heads.affinity import adaptive_normalize, proxy_softmax
from dapseg.heads.base import Attention, Head, HeadContext, HeadOutput, merge_heads, register_head, split_heads
from dapseg.heads.outliers import OutlierScore, outlier_mask, replace_by_neighbour_mean
from dapseg.registry import HEADS, Need

log = logging.getLogger(__name__)

# Added to each row sum of the thresholded similarity before normalising it (official code).
ROW_SUM_EPS = 1e-6


@dataclass
class ScclipAttention(Attention):
    """The main branch's attention (what plug-ins rework) and what ``project`` adds after it."""

    cls: Tensor  # (B, 1, D) the CLS token entering the last block, before the anomaly fix
    post_weights: Tensor  # (B, N, N) W(S') of the post-adjustment layer
    fused: Tensor  # (B, N, D) the multi-level branch, post-adjusted


def cosine_similarity_matrix(tokens: Tensor) -> Tensor:
    """(B, N, C) -> (B, N, N) cosine similarities, at least float32 (autocast off); a zero token gives 0."""
    t = F.normalize(tokens.to(torch.promote_types(tokens.dtype, torch.float32)), dim=-1)
    with torch.autocast(t.device.type, enabled=False):
        return torch.bmm(t, t.transpose(1, 2))


def thresholded_weights(s: Tensor, threshold: float) -> Tensor:
    """W(S) = S·[S ≥ threshold] / (row sum + 1e-6): (B, N, N) -> (B, N, N)."""
    t = s.masked_fill(s < threshold, 0.0)
    return t / (t.sum(dim=-1, keepdim=True) + ROW_SUM_EPS)


def mix(weights: Tensor, tokens: Tensor) -> Tensor:
    """weights (B, N, N) · tokens (B, N, D) -> (B, N, D), in the tokens' dtype."""
    return torch.matmul(weights.to(tokens.dtype), tokens)


@register_head
class ScclipHead(Head):
    name = "scclip"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        n_neighbors: int = Field(30, ge=1)  # k of the outlier score
        contamination: float = Field(0.05, ge=0.0, le=0.5)  # fraction of patch tokens replaced per window
        outlier_score: OutlierScore = "kdist_ratio"  # the official code's score, or scikit-learn's "lof"
        pre_adjust_layer: int = Field(8, ge=0)  # layer whose similarity adjusts x and guides the attention
        post_adjust_layer: int = Field(3, ge=0)  # layer whose similarity adjusts the block's output
        fusion_start: int = Field(3, ge=0)  # multi-level fusion sums layers fusion_start .. fusion_end - 1
        fusion_end: int = Field(10, ge=1)
        cls_residual: float = 0.3  # weight of the CLS token added to every patch token
        similarity_threshold: float = 0.4  # β: similarities below it do not adjust (W(S))
        attention_scale: float = Field(3.0, gt=0.0)  # γ of the similarity attention softmax(γ(S − mean S))

        @model_validator(mode="after")
        def _fusion_range(self) -> ScclipHead.Params:
            if self.fusion_end <= self.fusion_start:
                raise ValueError(f"fusion_end ({self.fusion_end}) must be > fusion_start ({self.fusion_start})")
            return self

    @staticmethod
    def declared_needs(params: Params | None) -> frozenset[Need]:
        return frozenset({Need.CLIP_LAYERS})

    def __init__(self, params: Params | None = None) -> None:
        super().__init__()
        self.params = params or self.Params()
        self._warned_depths: set[int] = set()

    # ------------------------------------------------------------------ steps

    def outliers(self, patches: Tensor) -> Tensor:
        """Anomaly tokens of each window: (B, N, D) -> bool (B, N) (its own bench stage)."""
        p = self.params
        return outlier_mask(patches, p.n_neighbors, p.contamination, p.outlier_score)

    def _feature_layers(self, ctx: HeadContext) -> tuple[Tensor, ...]:
        """The outputs of blocks 0 .. L − 2 (official layer numbers), each (B, 1 + N, D)."""
        if ctx.layers is None:
            raise ValueError(
                "head 'scclip' needs the tokens entering every CLIP block (HeadContext.layers, "
                "Need.CLIP_LAYERS); the engine gives them to heads that declare that need"
            )
        feats = ctx.layers[1:]
        if not feats:
            raise ValueError("head 'scclip' needs a CLIP with at least 2 blocks (HeadContext.layers has 1 entry)")
        return feats

    def _layer_numbers(self, depth: int) -> tuple[int, int, range]:
        """(pre, post, fusion range) clamped to ``depth`` feature layers."""
        p = self.params
        last = depth - 1
        pre, post = min(p.pre_adjust_layer, last), min(p.post_adjust_layer, last)
        start = min(p.fusion_start, last)
        fusion = range(start, max(min(p.fusion_end, depth), start + 1))
        wanted = (p.pre_adjust_layer, p.post_adjust_layer, p.fusion_end - 1)
        if max(wanted) > last and depth not in self._warned_depths:
            self._warned_depths.add(depth)
            log.warning("scclip: this CLIP has %d feature layers (0..%d); layers %s clamped to pre %d, post %d, "
                        "fusion %d..%d", depth, last, wanted, pre, post, fusion.start, fusion.stop - 1)
        return pre, post, fusion

    def reduced_block(self, ctx: HeadContext, patches: Tensor, sim_attn: Tensor) -> tuple[Tensor, Tensor]:
        """Step 3's attention over ``patches`` (B, N, D): ((B, heads, N, N) attention, (B, heads, N, d) v)."""
        attn = ctx.block.attn
        d = attn.embed_dim  # k and v only: q is not used (a third of the in-projection saved)
        kv = F.linear(ctx.block.ln_1(patches), attn.in_proj_weight[d:], attn.in_proj_bias[d:])
        k, v = (split_heads(t, attn.num_heads) for t in kv.chunk(2, dim=-1))
        kk = torch.softmax(k @ k.transpose(-1, -2) * k.shape[-1] ** -0.5, dim=-1)
        return (sim_attn.to(kk.dtype) + kk) / 2, v

    # ------------------------------------------------------------------ head

    def attention(self, ctx: HeadContext) -> ScclipAttention:
        p = self.params
        feats = self._feature_layers(ctx)
        pre_layer, post_layer, fusion = self._layer_numbers(len(feats))
        x = ctx.x  # (B, 1 + N, D) = feats[-1]
        cls, patches = x[:, :1], x[:, 1:]

        outliers = self.outliers(patches)  # (B, N)
        patches = replace_by_neighbour_mean(patches, outliers, ctx.grid)
        pre = replace_by_neighbour_mean(feats[pre_layer][:, 1:], outliers, ctx.grid)
        s_pre = cosine_similarity_matrix(pre)  # (B, N, N)
        patches = mix(thresholded_weights(s_pre, p.similarity_threshold), patches)
        # softmax over {A ≥ 0} of A = γ(S − mean S), mean per window; shared by every head: (B, 1, N, N)
        sim_attn = proxy_softmax(adaptive_normalize(s_pre, 1.0, p.attention_scale)).unsqueeze(1)
        attn, v = self.reduced_block(ctx, patches, sim_attn)

        post_weights = thresholded_weights(cosine_similarity_matrix(feats[post_layer][:, 1:]), p.similarity_threshold)
        fused_in = torch.zeros_like(feats[0])  # (B, 1 + N, D), summed in layer order as the official code does
        for i in fusion:
            fused_in = fused_in + feats[i]
        attn_f, v_f = self.reduced_block(ctx, fused_in[:, 1:], sim_attn)
        fused = ctx.block.attn.out_proj(merge_heads(attn_f @ v_f)) + p.cls_residual * fused_in[:, :1]
        fused = mix(post_weights, fused)
        return ScclipAttention(attn=attn, v=v, grid=ctx.grid, has_cls=False, cls=cls, post_weights=post_weights,
                               fused=fused)

    def project(self, ctx: HeadContext, a: Attention, z: Tensor) -> HeadOutput:
        """out_proj(z) + CLS residual, post-adjusted, plus the multi-level branch: (B, N, D)."""
        if not isinstance(a, ScclipAttention):
            raise TypeError("the scclip head projects only the attention it made (ScclipAttention)")
        out = ctx.block.attn.out_proj(z) + self.params.cls_residual * a.cls
        out = mix(a.post_weights, out) + a.fused
        return HeadOutput(tokens=out, grid=a.grid, attention=a)


# the outlier score over each window's patch tokens (its anomaly tokens), timed by `dapseg bench` as its own stage
HEADS.attach("scclip", stages={"outliers": ("ScclipHead.outliers",)})
