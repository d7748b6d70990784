"""FSA: feedback self-adaptive attention, a plug-in for any last-block head.

A head gives its attention ``Attn`` and its output tokens ``o``. FSA feeds the head's own class
predictions back into the attention:

1. class distributions per patch, isolated from what every patch shares:
   P = scale_p·cos(proj(LN_post(o)), T), U = scale_u·cos(proj(LN_post(out_proj(Ū·v))), T) with Ū the
   uniform attention over the head's M tokens (so U is one vector per window), d = softmax(P − U);
2. patch similarity s_ij = 1 / (1 + max(KL(d_i ‖ d_j), 0));
3. confidence top-p pruning per row (softmax of the sorted row, cumulative sum <= p kept, the
   largest entry always kept; ties, up to rounding, keep the lower index: see ``top_p_mask``),
   s' = s·exp(λ·s) on the kept entries, W = row-softmax(s');
4. ensemble Attn_ens = (W·Attn + Attn·W + W) / 3 and out = out_proj(Attn_ens·v).

Facts from the public reference (chi-chi-zx/FSA): logit scales 20 (head output) and 35 (uniform
attention), no softmax before the difference, text embeddings per query (synonyms separate),
log(d + 1e-10) inside the KL, KL clamped at 0, p = 0.45, W shared by all attention heads, λ = 3.0
for ViT-B/L, 2.3 for ViT-H and 4.5 whenever the VFM is MAE. The reference only plugs FSA into
ProxyCLIP, whose attention has no CLS token; how we treat CLS is our choice (see ``_apply_w``).

Memory: the reference builds the N×N×C tensor of pairwise KL terms (2.1 GB for N = 1764, C = 171).
Here KL(d_i ‖ d_j) = Σ_c d_ic log d_ic − Σ_c d_ic log d_jc, one (N×C)·(C×N) product, so the step
holds O(N² + N·C) numbers; and Attn_ens·v is computed as W·(Attn·v) + Attn·(W·v) + W·v, never
forming the M×M×M products W·Attn and Attn·W.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from dapseg.heads.base import Attention, Head, HeadContext, HeadOutput, attend, merge_heads
from dapseg.registry import PLUGINS, Backbone, Need

# Added to the probabilities inside the log, as the reference does: it bounds the penalty for a
# class that patch j deems impossible, and keeps log finite where a probability underflows to 0.
LOG_EPS = 1e-10

ToEmbed = Callable[[Tensor], Tensor]  # (B, n, D) tokens -> (B, n, E) embeddings (LN_post then proj)


class FsaParams(BaseModel):
    """FSA settings (the ``params`` of the ``fsa`` plug-in in a config)."""

    model_config = ConfigDict(extra="forbid")

    lam: float | None = None  # λ of s·exp(λ·s); None: the reference's value for the backbone
    top_p: float = Field(0.45, gt=0.0, le=1.0)  # cumulative probability kept per row
    scale_p: float = Field(20.0, gt=0.0)  # logit scale of the head's own patch logits
    scale_u: float = Field(35.0, gt=0.0)  # logit scale of the uniform-attention logits


def default_lambda(clip_model: str, vfm_lambda: float | None = None) -> float:
    """The reference's λ: the one the VFM's family asks for (``vfm_lambda``: 4.5 for MAE, see
    ``FamilyTraits.fsa_lambda``); else 2.3 for ViT-H, 3.0 for ViT-B / ViT-L.

    Backbones the reference does not cover (ViT-g, bigG, SO400M, ...) get 3.0; set
    ``plugins: [{name: fsa, params: {lam: ...}}]`` for them.
    """
    if vfm_lambda is not None:
        return vfm_lambda
    size_tokens = set(clip_model.replace("/", "-").split("-"))
    return 2.3 if "H" in size_tokens else 3.0


# ----------------------------------------------------------------------------- the pure steps


def class_distributions(
    patch_emb: Tensor, uniform_emb: Tensor, text_emb: Tensor, scale_p: float, scale_u: float
) -> Tensor:
    """d = softmax(scale_p·cos(patch, T) − scale_u·cos(uniform, T)) over queries.

    patch_emb (B, n, E), uniform_emb (B, 1, E), text_emb (Q, E) -> d (B, n, Q), at least float32
    (half-precision logits would round the KL of confident patches to ties).
    Zero embeddings give cosine 0 (not NaN).
    """
    dtype = torch.promote_types(patch_emb.dtype, torch.float32)
    t = F.normalize(text_emb.to(dtype), dim=-1)
    p = F.normalize(patch_emb.to(dtype), dim=-1) @ t.T * scale_p  # (B, n, Q)
    u = F.normalize(uniform_emb.to(dtype), dim=-1) @ t.T * scale_u  # (B, 1, Q)
    return torch.softmax(p - u, dim=-1)


def kl_matrix(d: Tensor, eps: float = LOG_EPS) -> Tensor:
    """K_ij = max(KL(d_i ‖ d_j), 0) for class distributions d (B, n, C) -> (B, n, n).

    Σ_c d_ic log d_ic − Σ_c d_ic log d_jc: a row term and one (n×C)·(C×n) product; never n×n×C.
    """
    log_d = torch.log(d + eps)  # (B, n, C)
    self_term = (d * log_d).sum(-1, keepdim=True)  # (B, n, 1)
    cross = torch.bmm(d, log_d.transpose(1, 2))  # (B, n, n): Σ_c d_ic log d_jc
    # Rounding (and the eps) can push KL(d_i ‖ d_i) a hair below 0; the reference clamps too.
    return (self_term - cross).clamp_min_(0.0)


# Top-p ranks entries by their value rounded to a multiple of this. Entries that differ only by
# rounding (identical patches whose KL terms come out 1e-16 apart, depending on the summation order
# of the matrix product) are then exact ties and keep the lower index first, so which entries a row
# keeps does not depend on the sort or matmul implementation, the thread count or the device.
TOP_P_QUANTUM = 2.0**-40


def top_p_rank_key(s: Tensor) -> Tensor:
    """The value top-p ranks by: s (..., n) rounded to a multiple of ``TOP_P_QUANTUM``, float64."""
    return torch.round(s.double() / TOP_P_QUANTUM)


def top_p_mask(s: Tensor, p: float) -> Tensor:
    """Confidence pruning of each row of s (..., n): True where an entry is kept.

    Tie rule: entries are ranked by ``top_p_rank_key(s)`` (s rounded to a multiple of 2^-40), largest
    first, equal keys in index order (a stable sort), so exact and rounding-level ties keep the lower
    index. An entry is kept while the cumulative softmax(s) mass of the ranked row, itself included,
    is <= p; the largest is always kept; p = 1 keeps every entry.
    """
    if p >= 1.0:  # everything; the cumulative sum may round to a hair above 1
        return torch.ones_like(s, dtype=torch.bool)
    order = torch.sort(top_p_rank_key(s), dim=-1, descending=True, stable=True).indices
    ranked = torch.gather(s, -1, order)
    keep_ranked = torch.cumsum(torch.softmax(ranked, dim=-1), dim=-1) <= p
    keep_ranked[..., 0] = True
    return torch.zeros_like(keep_ranked).scatter_(-1, order, keep_ranked)


def feedback_weights(d: Tensor, lam: float, top_p: float) -> Tensor:
    """W (B, n, n) from class distributions d (B, n, C): row-softmax of s·exp(λs) over kept entries."""
    s = kl_matrix(d).add_(1.0).reciprocal_()  # s = 1 / (1 + K), in (0, 1]
    keep = top_p_mask(s, top_p)
    logits = (s * torch.exp(lam * s)).masked_fill_(~keep, float("-inf"))
    return torch.softmax(logits, dim=-1)  # every row keeps at least one finite entry


def _apply_w(w: Tensor, x: Tensor, has_cls: bool) -> Tensor:
    """W_ext · x for x (B, heads, M, d) and W (B, 1, n, n) shared by all heads.

    With a CLS token W_ext = diag(1, W): CLS keeps its own value and patches mix only with
    patches, so the ensemble keeps the head's attention to CLS and stays row-stochastic.
    """
    if not has_cls:
        return attend(w, x)
    return torch.cat([x[:, :, :1], attend(w, x[:, :, 1:])], dim=2)


def ensemble_values(attn: Tensor, v: Tensor, w: Tensor, has_cls: bool) -> Tensor:
    """Attn_ens · v with Attn_ens = (W·Attn + Attn·W + W) / 3, as (W(Attn v) + Attn(W v) + W v) / 3.

    attn (B, H|1, M, M), v (B, heads, M, d), w (B, n, n) with n = M − has_cls -> (B, heads, M, d).
    """
    attn = attn.to(v.dtype)
    w = w.to(v.dtype).unsqueeze(1)  # (B, 1, n, n)
    wv = _apply_w(w, v, has_cls)
    return (_apply_w(w, attend(attn, v), has_cls) + attend(attn, wv) + wv) / 3.0


def fsa_values(
    a: Attention,
    head_tokens: Tensor,
    out_proj: nn.Module,
    to_embed: ToEmbed,
    text_emb: Tensor,
    params: FsaParams,
) -> Tensor:
    """Attn_ens · v with heads merged, (B, M, D): what replaces the head's ``aggregate``.

    head_tokens (B, n, D): the head's own output o, before LN_post / proj.
    """
    if params.lam is None:
        raise ValueError("FSA needs params.lam; FsaPlugin derives it from the backbone")
    b, _, m, _ = a.v.shape
    n = m - int(a.has_cls)
    if a.attn.dim() != 4 or a.attn.shape[0] != b or a.attn.shape[-2:] != (m, m):
        raise ValueError(f"FSA: attention {tuple(a.attn.shape)} does not match values {tuple(a.v.shape)}")
    if a.grid[0] * a.grid[1] != n:
        raise ValueError(f"FSA: grid {a.grid} does not have the {n} patch tokens of the attention")
    if head_tokens.shape[:2] != (b, n):
        raise ValueError(f"FSA: head output {tuple(head_tokens.shape)} is not (B={b}, n={n}, D)")

    # Uniform attention: every token gets the mean value, so one token per window suffices.
    uniform = out_proj(merge_heads(a.v.mean(dim=2, keepdim=True)))  # (B, 1, D)
    patch_emb, uniform_emb = to_embed(head_tokens), to_embed(uniform)
    # The feedback weights in float32 even under autocast: fp16 KL terms round confident patches
    # to exact ties, and top-p then prunes by index order instead of by similarity.
    with torch.autocast(patch_emb.device.type, enabled=False):
        d = class_distributions(patch_emb, uniform_emb, text_emb, params.scale_p, params.scale_u)
        w = feedback_weights(d, params.lam, params.top_p)  # (B, n, n)
    return merge_heads(ensemble_values(a.attn, a.v, w, a.has_cls))


def fsa(
    a: Attention,
    out_proj: nn.Module,
    to_embed: ToEmbed,
    text_emb: Tensor,
    params: FsaParams,
    head_tokens: Tensor | None = None,
) -> HeadOutput:
    """FSA over a head's ``Attention`` in the reduced block: out = out_proj(Attn_ens · v), CLS dropped.

    out_proj: the last block's output projection (D -> D); to_embed: tokens -> embeddings
    (LN_post then proj); text_emb (Q, E) query embeddings; head_tokens (B, n, D): the head's own
    output o (default: the reduced block out_proj(Attn · v)). ``params.lam`` must be set
    (``FsaPlugin`` resolves it from the backbone).
    """
    if head_tokens is None:
        o = out_proj(merge_heads(torch.matmul(a.attn.to(a.v.dtype), a.v)))
        head_tokens = o[:, 1:] if a.has_cls else o
    out = out_proj(fsa_values(a, head_tokens, out_proj, to_embed, text_emb, params))
    if a.has_cls:
        out = out[:, 1:]
    return HeadOutput(tokens=out, grid=a.grid, attention=a)


# ----------------------------------------------------------------------------- plug-in and hook


@PLUGINS.register("fsa", params=FsaParams, needs={Need.BACKBONE, Need.CLASS_TEXT},
                  description="FSA: feedback self-adaptive attention for any head",
                  extras={"derived_preset": "FSA feedback attention"})  # every preset gets its `-fsa` twin
class FsaPlugin:
    """FSA with its parameters resolved (λ from the backbone unless given).

    The registered plug-in: ``plugins: [{name: fsa, params: {...}}]`` in a config, ``--fsa`` on the
    command line, or a ``<preset>-fsa`` preset. An instance is the engine's ``HeadPlugin``.
    """

    def __init__(self, params: FsaParams | None = None, *, backbone: Backbone | None = None) -> None:
        params = params or FsaParams()
        backbone = backbone or Backbone(clip_model="ViT-B-16")
        lam = params.lam if params.lam is not None else default_lambda(backbone.clip_model, backbone.vfm_fsa_lambda)
        self.params = params.model_copy(update={"lam": lam})

    def __call__(self, head: Head, ctx: HeadContext, text_emb: Tensor, to_embed: ToEmbed) -> HeadOutput:
        """``head`` on ``ctx`` with FSA (the engine's plug-in signature)."""
        return apply_head(head, ctx, self, text_emb, to_embed)

    def __repr__(self) -> str:
        return f"FsaPlugin({self.params!r})"


def apply_head(
    head: Head, ctx: HeadContext, fsa_plugin: FsaPlugin | None, text_emb: Tensor, to_embed: ToEmbed
) -> HeadOutput:
    """The head's output, reworked by FSA when ``fsa_plugin`` is given (None: exactly ``head(ctx)``).

    The head runs as usual: its output o is FSA's input. FSA takes the head's attention (from the
    output, or ``head.attention(ctx)`` for heads that do not report it), replaces the head's
    ``aggregate`` (Attn·v) by Attn_ens·v and hands that to the head's own ``project``: the reduced
    block out_proj(·) for every head that keeps the base ``project``. Heads that aggregate in
    several steps (DAP, ``steps`` > 1) report their one-step W, and FSA ensembles that W once;
    their multi-step output only enters through o.
    """
    out = head(ctx)
    if fsa_plugin is None:
        return out
    a = out.attention if out.attention is not None else head.attention(ctx)
    z = fsa_values(a, out.tokens, ctx.block.attn.out_proj, to_embed, text_emb, fsa_plugin.params)
    return head.project(ctx, a, z)
