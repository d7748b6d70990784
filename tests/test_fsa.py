"""FSA plug-in against a naive, slow formula that builds the N×N×C KL tensor and every matrix."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dapseg.api import PrebuiltModels, Segmenter
from dapseg.config import (
    ClipConfig,
    PluginConfig,
    SegmenterConfig,
    VfmConfig,
    head_refuses_plugins,
    list_presets,
    load_preset,
)
from dapseg.heads.base import Attention, Head, HeadContext, HeadOutput
from dapseg.plugins.fsa import (
    FsaParams,
    FsaPlugin,
    apply_head,
    default_lambda,
    feedback_weights,
    fsa,
    kl_matrix,
    top_p_mask,
)
from dapseg.registry import PLUGINS, Backbone

D, HEADS, E = 16, 4, 8

# ----------------------------------------------------------------------------- naive reference


def naive_kl(d: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """(B, n, C) -> (B, n, n) via the (B, n, n, C) tensor of pairwise terms, clamped at 0."""
    log_d = torch.log(d + eps)
    terms = d[:, :, None, :] * (log_d[:, :, None, :] - log_d[:, None, :, :])
    return terms.sum(-1).clamp(min=0.0)


def naive_top_p(s: torch.Tensor, p: float) -> torch.Tensor:
    """Row by row with Python sorting. Tie rule: rank by the value rounded to a multiple of 2^-40
    (largest first), equal rounded values by index (lower first)."""
    keep = torch.zeros(s.shape, dtype=torch.bool)
    flat_s, flat_keep = s.reshape(-1, s.shape[-1]), keep.view(-1, s.shape[-1])
    for r, row in enumerate(flat_s.tolist()):
        order = sorted(range(len(row)), key=lambda j: (-round(row[j] * 2.0**40), j))
        z = sum(math.exp(x) for x in row)
        mass = 0.0
        for rank, j in enumerate(order):
            mass += math.exp(row[j]) / z
            if rank == 0 or mass <= p or p >= 1.0:
                flat_keep[r, j] = True
    return keep


def naive_fsa(a: Attention, out_proj, to_embed, text, lam, p, scale_p=20.0, scale_u=35.0, head_tokens=None):
    """Everything explicit: M×M uniform attention, N×N×C KL, explicit (W_ext·A + A·W_ext + W_ext)/3."""
    attn, v = a.attn.double(), a.v.double()
    b, heads, m, dh = v.shape

    def reduced(att):  # out_proj(att · v) with heads merged, (B, M, D)
        z = torch.matmul(att, v).transpose(1, 2).reshape(b, m, heads * dh)
        return out_proj(z)

    def cos_logits(tokens, scale):
        e = to_embed(tokens)
        e = e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        t = text / text.norm(dim=-1, keepdim=True)
        return scale * e @ t.T

    patches = slice(1, None) if a.has_cls else slice(None)
    o = reduced(attn)[:, patches] if head_tokens is None else head_tokens.double()
    uniform = torch.full((b, 1, m, m), 1.0 / m, dtype=torch.float64)
    u_tokens = reduced(uniform)[:, patches]
    d = torch.softmax(cos_logits(o, scale_p) - cos_logits(u_tokens, scale_u), dim=-1)
    s = 1.0 / (1.0 + naive_kl(d))
    keep = naive_top_p(s, p)
    s2 = torch.where(keep, s * torch.exp(lam * s), torch.tensor(float("-inf"), dtype=s.dtype))
    w = torch.softmax(s2, dim=-1)  # (B, n, n)
    w_ext = torch.zeros(b, 1, m, m, dtype=torch.float64)
    if a.has_cls:
        w_ext[:, :, 0, 0] = 1.0
        w_ext[:, 0, 1:, 1:] = w
    else:
        w_ext[:, 0] = w
    ens = (torch.matmul(w_ext, attn) + torch.matmul(attn, w_ext) + w_ext) / 3.0
    return reduced(ens)[:, patches], w


# ----------------------------------------------------------------------------- fixtures


def tiny_modules(seed: int = 0):
    torch.manual_seed(seed)
    out_proj = nn.Linear(D, D).double()
    ln, proj = nn.LayerNorm(D).double(), torch.randn(D, E, dtype=torch.float64)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.normal_()
    return out_proj, (lambda t: ln(t) @ proj)


def random_attention(b, h, grid, has_cls, seed=0, dtype=torch.float64) -> Attention:
    g = torch.Generator().manual_seed(seed)
    m = grid[0] * grid[1] + int(has_cls)
    attn = torch.softmax(torch.randn(b, h, m, m, generator=g, dtype=dtype) * 2, dim=-1)
    v = torch.randn(b, HEADS, m, D // HEADS, generator=g, dtype=dtype)
    return Attention(attn=attn, v=v, grid=grid, has_cls=has_cls)


# ----------------------------------------------------------------------------- KL and top-p


def test_kl_matrix_matches_naive_tensor_form():
    g = torch.Generator().manual_seed(1)
    d = torch.softmax(torch.randn(2, 9, 5, generator=g) * 6, dim=-1)
    d[0, 3] = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0])  # exact zeros: the eps keeps log finite
    d[1, 4] = d[1, 5]  # identical rows: KL 0 both ways
    k = kl_matrix(d)
    torch.testing.assert_close(k, naive_kl(d.double()).float(), atol=1e-5, rtol=1e-5)
    assert (k >= 0).all()
    assert k[1, 4, 5] == 0 and k[1, 5, 4] == 0
    assert torch.all(torch.diagonal(k, dim1=1, dim2=2) <= 1e-5)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.45, 0.9])
def test_top_p_matches_naive(p):
    g = torch.Generator().manual_seed(2)
    s = torch.rand(2, 7, 11, generator=g, dtype=torch.float64) * 3
    assert torch.equal(top_p_mask(s, p), naive_top_p(s, p))


def test_top_p_one_dominant_entry_keeps_only_it():
    s = torch.zeros(1, 2, 6)
    s[0, 0, 4] = 20.0  # softmax mass ~1 on one entry: above p, kept as the largest
    s[0, 1, 0] = 20.0
    keep = top_p_mask(s, 0.45)
    assert keep.sum() == 2 and keep[0, 0, 4] and keep[0, 1, 0]


def test_top_p_all_equal_keeps_the_first_floor_pn():
    s = torch.full((1, 1, 10), 0.7)
    keep = top_p_mask(s, 0.45)  # cumulative mass k/10 <= 0.45 -> k = 1..4
    assert keep[0, 0].tolist() == [True] * 4 + [False] * 6
    assert top_p_mask(s, 1.0).all()  # p = 1 keeps everything despite rounding of the cumsum


def test_top_p_rounding_level_ties_keep_the_lower_index():
    """Values 1e-15 apart (matmul rounding of identical patches) are ties: lower index first,
    whatever their order by raw value."""
    g = torch.Generator().manual_seed(5)
    s = 0.7 + 1e-15 * torch.randn(3, 10, generator=g, dtype=torch.float64)
    keep = top_p_mask(s, 0.45)
    assert keep.tolist() == [[True] * 4 + [False] * 6] * 3
    assert torch.equal(keep, naive_top_p(s, 0.45))
    flipped = top_p_mask(s.flip(-1), 0.45)  # the same values reversed: still the first four indices
    assert torch.equal(flipped, keep)


def test_top_p_tiny_p_keeps_only_the_largest():
    g = torch.Generator().manual_seed(3)
    s = torch.rand(3, 5, 8, generator=g)
    keep = top_p_mask(s, 1e-6)
    assert torch.equal(keep.sum(-1), torch.ones(3, 5, dtype=torch.long))
    assert torch.equal(keep.float().argmax(-1), s.argmax(-1))


# ----------------------------------------------------------------------------- whole plug-in


@pytest.mark.parametrize(
    ("h", "grid", "has_cls"),
    [(HEADS, (3, 4), True), (HEADS, (4, 3), False), (1, (3, 3), False), (1, (2, 5), True)],
    ids=["per-head+cls", "per-head", "shared", "shared+cls"],
)
def test_fsa_matches_naive(h, grid, has_cls):
    out_proj, to_embed = tiny_modules()
    text = torch.randn(5, E, dtype=torch.float64)
    a = random_attention(2, h, grid, has_cls, seed=4)
    params = FsaParams(lam=3.0)
    got = fsa(a, out_proj, to_embed, text, params)
    want, _ = naive_fsa(a, out_proj, to_embed, text, lam=3.0, p=0.45)
    assert got.tokens.shape == (2, grid[0] * grid[1], D) and got.grid == grid
    torch.testing.assert_close(got.tokens, want, atol=1e-5, rtol=1e-5)


def test_fsa_with_head_tokens_and_other_params_matches_naive():
    out_proj, to_embed = tiny_modules(1)
    text = torch.randn(7, E, dtype=torch.float64)
    a = random_attention(1, HEADS, (3, 3), True, seed=5)
    o = torch.randn(1, 9, D, dtype=torch.float64)  # e.g. the full vanilla block's output
    params = FsaParams(lam=2.3, top_p=0.7, scale_p=10.0, scale_u=50.0)
    got = fsa(a, out_proj, to_embed, text, params, head_tokens=o)
    want, _ = naive_fsa(a, out_proj, to_embed, text, 2.3, 0.7, 10.0, 50.0, head_tokens=o)
    torch.testing.assert_close(got.tokens, want, atol=1e-5, rtol=1e-5)


def test_feedback_weights_match_naive():
    g = torch.Generator().manual_seed(6)
    d = torch.softmax(torch.randn(2, 10, 6, generator=g) * 4, dim=-1)
    w = feedback_weights(d, lam=4.5, top_p=0.45)
    s = 1.0 / (1.0 + naive_kl(d.double()))
    keep = naive_top_p(s, 0.45)
    want = torch.softmax(torch.where(keep, s * torch.exp(4.5 * s), torch.tensor(-math.inf).double()), -1)
    torch.testing.assert_close(w.double(), want, atol=1e-6, rtol=1e-5)


def test_tiny_p_gives_identity_w_and_closed_form():
    """Distinct patches, p -> 0: only s_ii = 1 survives, W = I, Attn_ens = (2·Attn + I) / 3."""
    out_proj, to_embed = tiny_modules(2)
    text = torch.randn(6, E, dtype=torch.float64)
    a = random_attention(1, HEADS, (2, 3), False, seed=7)
    got = fsa(a, out_proj, to_embed, text, FsaParams(lam=3.0, top_p=1e-9))
    eye = torch.eye(6, dtype=torch.float64)
    z = torch.matmul((2 * a.attn + eye) / 3, a.v).transpose(1, 2).reshape(1, 6, D)
    torch.testing.assert_close(got.tokens, out_proj(z), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case", ["same-text", "zero-tokens", "identical-patches", "one-patch"])
def test_degenerate_inputs_never_nan(case):
    out_proj, to_embed = tiny_modules(3)
    text = torch.randn(4, E, dtype=torch.float64)
    grid = (1, 1) if case == "one-patch" else (3, 3)
    a = random_attention(1, HEADS, grid, True, seed=8)
    head_tokens = None
    if case == "same-text":  # every class equally likely for every patch: d uniform, KL 0, s = 1
        text = text[:1].expand(4, E).clone()
    elif case == "zero-tokens":
        head_tokens = torch.zeros(1, 9, D, dtype=torch.float64)
    elif case == "identical-patches":
        a.v[:] = a.v[:, :, :1]
    got = fsa(a, out_proj, to_embed, text, FsaParams(lam=3.0), head_tokens=head_tokens)
    want, w = naive_fsa(a, out_proj, to_embed, text, 3.0, 0.45, head_tokens=head_tokens)
    assert torch.isfinite(got.tokens).all() and torch.isfinite(w).all()
    torch.testing.assert_close(got.tokens, want, atol=1e-5, rtol=1e-5)
    if case == "same-text":  # all s equal: each row keeps its first floor(0.45·9) = 4 patches
        assert torch.equal(w[0] > 0, torch.tensor([[True] * 4 + [False] * 5] * 9))


def test_float32_attention_and_float16_text():
    out_proj, to_embed = tiny_modules(4)
    out_proj = out_proj.float()
    a = random_attention(2, 1, (4, 4), False, seed=9, dtype=torch.float32)
    text = torch.randn(3, E).half()
    got = fsa(a, out_proj, lambda t: to_embed(t.double()).float(), text, FsaParams(lam=3.0))
    want, _ = naive_fsa(a, out_proj.double(), to_embed, text.double(), 3.0, 0.45)
    assert got.tokens.dtype == torch.float32
    torch.testing.assert_close(got.tokens.double(), want, atol=1e-4, rtol=1e-4)


def test_bad_shapes_are_named():
    out_proj, to_embed = tiny_modules()
    text = torch.randn(3, E, dtype=torch.float64)
    a = random_attention(1, 1, (3, 3), False)
    bad = Attention(attn=a.attn, v=a.v, grid=(2, 3), has_cls=False)
    with pytest.raises(ValueError, match="grid"):
        fsa(bad, out_proj, to_embed, text, FsaParams(lam=3.0))
    with pytest.raises(ValueError, match="head output"):
        fsa(a, out_proj, to_embed, text, FsaParams(lam=3.0), head_tokens=torch.zeros(1, 4, D))
    with pytest.raises(ValueError, match="lam"):
        fsa(a, out_proj, to_embed, text, FsaParams())


# ----------------------------------------------------------------------------- config and λ


def build_fsa(config: SegmenterConfig) -> FsaPlugin | None:
    """The FSA plug-in a config asks for, built through the registry as the segmenter builds it (the
    VFM's λ from its family's traits, as ``ModelBundle.backbone`` hands it)."""
    from dapseg.models.vfm import vfm_spec, vfm_traits

    p = config.plugin("fsa")
    if p is None:
        return None
    vfm_name = config.vfm.name if config.vfm is not None else None
    family = vfm_spec(vfm_name).family if vfm_name else None
    lam = vfm_traits(vfm_name).fsa_lambda if vfm_name else None
    backbone = Backbone(config.clip.model, vfm_name, family, vfm_fsa_lambda=lam)
    return PLUGINS.build("fsa", p.params, backbone=backbone)


@pytest.mark.parametrize(
    ("clip", "vfm", "lam"),
    [
        ("ViT-B-16", "dino_vitb8", 3.0),
        ("ViT-L-14-336", "dinov2_vitb14_reg", 3.0),
        ("ViT-H-14", None, 2.3),
        ("ViT-H-14-378-quickgelu", "sam_vitb", 2.3),
        ("ViT-H-14", "mae_vitb16", 4.5),
        ("ViT-B-16", "mae_vitb16", 4.5),
        ("ViT-B-16", "sd15", 3.0),
    ],
)
def test_default_lambda(clip, vfm, lam):
    cfg = SegmenterConfig(clip=ClipConfig(model=clip), vfm=VfmConfig(name=vfm) if vfm else None,
                          plugins=[PluginConfig(name="fsa")])
    plugin = build_fsa(cfg)
    assert plugin is not None and plugin.params.lam == lam
    assert default_lambda(clip, 4.5) == 4.5  # a family's own λ wins over the CLIP-size rule
    for key in ("fsa.params.lam", "plugins.fsa.params.lam", "lam"):
        over = build_fsa(cfg.with_overrides({key: 1.5}))
        assert over is not None and over.params.lam == 1.5


def test_fsa_config_validation_and_disabled():
    assert build_fsa(SegmenterConfig()) is None
    with pytest.raises(ValueError, match="lamda"):
        PluginConfig(name="fsa", params={"lamda": 3.0})
    with pytest.raises(ValueError, match="top_p"):
        PluginConfig(name="fsa", params={"top_p": 0.0})
    with pytest.raises(ValueError, match="unknown plug-in 'fsb'; known: fsa"):
        PluginConfig(name="fsb")
    with pytest.raises(KeyError, match="not enabled"):
        SegmenterConfig().with_overrides({"fsa.params.lam": 2.0})
    # switched on and configured in one go, whatever the order of the keys
    cfg = SegmenterConfig().with_overrides({"fsa.params.lam": 2.0, "fsa.enabled": True})
    assert cfg.plugin("fsa") is not None and cfg.plugin("fsa").params["lam"] == 2.0
    assert cfg.with_overrides({"plugins.fsa.enabled": False}).plugins == []


# ----------------------------------------------------------------------------- the pipeline hook


class _SharedToyHead(Head):
    """A shared-attention (proxy-like) head: softmax of feature similarity over patches only."""

    name = "_toy_shared"

    def attention(self, ctx: HeadContext) -> Attention:
        from dapseg.heads.base import qkv

        _, _, v = qkv(ctx.block, ctx.x)
        f = nn.functional.normalize(ctx.x[:, 1:], dim=-1)
        attn = torch.softmax(3 * f @ f.transpose(1, 2), dim=-1)[:, None]  # (B, 1, N, N)
        return Attention(attn=attn, v=v[:, :, 1:], grid=ctx.grid, has_cls=False)


class _FullBlockToyHead(_SharedToyHead):
    """Like the vanilla head: its output is not the reduced block and carries no attention."""

    name = "_toy_full"

    def forward(self, ctx: HeadContext) -> HeadOutput:
        return HeadOutput(tokens=ctx.x[:, 1:] * 2.0, grid=ctx.grid)


def _toy_ctx(seed=0):
    torch.manual_seed(seed)
    block = nn.Module()
    block.ln_1 = nn.LayerNorm(D)
    block.attn = nn.MultiheadAttention(D, HEADS, batch_first=True)
    return HeadContext(x=torch.randn(2, 1 + 6, D), grid=(2, 3), block=block)


def test_apply_head_off_is_the_head_and_on_is_fsa():
    ctx = _toy_ctx()
    head = _SharedToyHead()
    to_embed = nn.Linear(D, E)
    text = torch.randn(4, E)
    off = apply_head(head, ctx, None, text, to_embed)
    torch.testing.assert_close(off.tokens, head(ctx).tokens, atol=0, rtol=0)

    plugin = FsaPlugin(FsaParams(), backbone=Backbone(clip_model="ViT-B-16"))
    on = apply_head(head, ctx, plugin, text, to_embed)
    a = head.attention(ctx)
    out_proj = ctx.block.attn.out_proj
    want, _ = naive_fsa(a, out_proj.double(), lambda t: to_embed.double()(t), text.double(), 3.0, 0.45)
    torch.testing.assert_close(on.tokens.double(), want, atol=1e-5, rtol=1e-5)


def test_apply_head_uses_the_heads_own_output_when_not_reduced():
    ctx = _toy_ctx(1)
    head = _FullBlockToyHead()
    to_embed = nn.Linear(D, E)
    text = torch.randn(3, E)
    # Small logit scales keep d away from saturation: saturated float32 rows tie exactly, and
    # which tied entries survive top-p then depends on rounding, not on the formula.
    params = FsaParams(lam=2.0, scale_p=2.0, scale_u=3.5)
    on = apply_head(head, ctx, FsaPlugin(params), text, to_embed)
    a = head.attention(ctx)
    want, _ = naive_fsa(a, ctx.block.attn.out_proj.double(), lambda t: to_embed.double()(t),
                        text.double(), 2.0, 0.45, 2.0, 3.5, head_tokens=head(ctx).tokens)
    torch.testing.assert_close(on.tokens.double(), want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- every preset, end to end

# Stitched presets and heads that refuse plug-ins (corrclip) take no plug-in and have no -fsa twin
# (tests/test_stitch.py and tests/test_corrclip.py check both).
BASE_PRESETS = [p for p in list_presets() if not p.endswith("-fsa") and load_preset(p).inference.mode != "stitch"
                and not head_refuses_plugins(load_preset(p).head.name)]


def expected_lambda(config: SegmenterConfig) -> float:
    """The reference's λ table (hyper_param.txt), written out independently of the plug-in (the
    preset names its MAE models mae_*)."""
    if config.vfm is not None and config.vfm.name.lower().startswith("mae"):
        return 4.5
    return 2.3 if config.clip.model.startswith("ViT-H-") else 3.0


def _uses_sam(config: SegmenterConfig) -> bool:
    return config.sam is not None or (config.vfm is not None and config.vfm.name.lower().startswith("sam"))


def _representatives() -> list[str]:
    """One preset per (head, λ); SAM-based ones only for a head that has nothing else, because a tiny
    SAM still encodes at 1024² and the plug-in does not care which VFM made the attention."""
    reps: dict[tuple[str, float], tuple[bool, str]] = {}
    for name in BASE_PRESETS:
        cfg = load_preset(name)
        key, cand = (cfg.head.name, expected_lambda(cfg)), (_uses_sam(cfg), name)
        reps[key] = min(reps.get(key, cand), cand)
    return sorted(name for _, name in reps.values())


RUN_PRESETS = _representatives()
DAP_STEPS_PRESET = next((p for p in RUN_PRESETS if load_preset(p).head.name == "dap"), None)


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    return torch.rand(2, 3, 64, 80, generator=torch.Generator().manual_seed(11))  # tiny CLIP: 4×5 grid


@pytest.fixture(scope="module")
def text() -> torch.Tensor:
    """(Q, E) normalised query embeddings; random ones are as good as encoded ones for FSA."""
    return nn.functional.normalize(torch.randn(5, 32, generator=torch.Generator().manual_seed(12)), dim=-1)


_SEGMENTERS: dict[tuple[str, bool], Segmenter] = {}


def _segmenter(preset: str, fsa_off: bool = False) -> Segmenter:
    """Tiny random segmenters; a preset and its -fsa variant share one set of models (saves time)."""
    key = (preset, fsa_off)
    if key not in _SEGMENTERS:
        config = load_preset(preset, {"plugins.fsa.enabled": False} if fsa_off else None)
        base = _SEGMENTERS.get((preset.removesuffix("-fsa"), False))
        models = None if base is None else PrebuiltModels(clip=base.clip, vfm=base.vfm, sam=base.sam)
        _SEGMENTERS[key] = Segmenter(config, random_weights=True, tiny=True, device="cpu", models=models)
    return _SEGMENTERS[key]


def _record(seg: Segmenter, windows: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, list]:
    """The engine's embeddings with the configured plug-in, and the contexts it ran on."""
    seen: list = []
    inner = seg.engine.plugin

    def recording(head, ctx, text_emb, to_embed):
        seen.append(ctx)
        return inner(head, ctx, text_emb, to_embed) if inner is not None else head(ctx)

    seg.engine.plugin = recording
    try:
        return seg.engine.embed(windows, text), seen
    finally:
        seg.engine.plugin = inner


def _as_map(tokens: torch.Tensor, to_embed, grid) -> torch.Tensor:
    """Head tokens (B, n, D) -> (B, E, h, w) normalised embeddings, as the engine returns them."""
    emb = nn.functional.normalize(to_embed(tokens), dim=-1)
    return emb.transpose(1, 2).reshape(emb.shape[0], -1, *grid)


@pytest.mark.parametrize("preset", BASE_PRESETS)
def test_fsa_preset_is_the_preset_with_fsa_enabled(preset):
    base, derived = load_preset(preset), load_preset(f"{preset}-fsa")
    assert base.plugin("fsa") is None and derived.plugin("fsa") is not None
    assert build_fsa(base) is None
    assert build_fsa(derived).params.lam == expected_lambda(derived)
    skip = {"name", "description", "plugins"}
    assert {k: v for k, v in derived.model_dump().items() if k not in skip} == {
        k: v for k, v in base.model_dump().items() if k not in skip
    }


@pytest.mark.parametrize("preset", RUN_PRESETS)
def test_fsa_off_gives_exactly_the_heads_output(preset, windows, text):
    seg = _segmenter(preset)
    assert seg.engine.plugin is None and build_fsa(seg.config) is None
    got, (ctx,) = _record(seg, windows, text)
    own = seg.head(ctx)
    assert torch.equal(got, _as_map(own.tokens.float(), seg.clip.head_tokens_to_embeddings, own.grid))
    # ... and so do the -fsa preset with FSA switched off again and the hook without a plug-in.
    assert torch.equal(_segmenter(f"{preset}-fsa", fsa_off=True).engine.embed(windows, text), got)
    hooked = apply_head(seg.head, ctx, None, text, seg.clip.head_tokens_to_embeddings)
    assert torch.equal(hooked.tokens, own.tokens)


def _check_fsa_on(preset: str, windows: torch.Tensor, text: torch.Tensor, overrides=None) -> None:
    # In float64 end to end: in float32 a row's cumulative top-p mass can land within rounding of p
    # on one side in the engine and on the other in the naive formula.
    seg = Segmenter.from_preset(f"{preset}-fsa", random_weights=True, tiny=True, device="cpu",
                                overrides=overrides)
    for model in (seg.clip, seg.vfm, seg.sam):
        if model is not None:
            model.double()
    assert seg.engine.plugin is not None
    got, (ctx,) = _record(seg, windows.double(), text.double())
    assert torch.isfinite(got).all()

    own = seg.head(ctx)  # the head's own output o (DAP with steps > 1: W applied `steps` times)
    a = own.attention if own.attention is not None else seg.head.attention(ctx)  # one-step Attn
    to_embed = seg.clip.head_tokens_to_embeddings
    want, _ = naive_fsa(a, ctx.block.attn.out_proj, to_embed, text.double(),
                        lam=expected_lambda(seg.config), p=0.45, head_tokens=own.tokens)
    if seg.config.head.name == "scclip":  # FSA's reduced block, then SC-CLIP's CLS residual, post-adjustment, fusion
        cls = seg.config.head.params["cls_residual"] * a.cls.double()
        want = a.post_weights.double() @ (want + cls) + a.fused.double()
    torch.testing.assert_close(got, _as_map(want, to_embed, own.grid).float(), atol=1e-5, rtol=1e-5)
    # FSA really changes the result.
    plain = Segmenter(load_preset(preset, overrides), random_weights=True, tiny=True, device="cpu",
                      models=PrebuiltModels(clip=seg.clip, vfm=seg.vfm, sam=seg.sam))
    assert not torch.allclose(plain.engine.embed(windows.double(), text.double()), got, atol=1e-4)


@pytest.mark.parametrize("preset", RUN_PRESETS)
def test_fsa_on_matches_naive_for_every_head(preset, windows, text):
    _check_fsa_on(preset, windows, text)
    if preset == DAP_STEPS_PRESET:  # several propagation steps: FSA ensembles the one-step W
        _check_fsa_on(preset, windows, text, {"head.params.steps": 3, "head.params.regions": "none"})


def test_cli_segment_with_fsa_flag(tmp_path, astronaut, monkeypatch):
    from PIL import Image

    from dapseg.cli import main

    monkeypatch.setenv("DAPSEG_CACHE", str(tmp_path / "cache"))
    img = tmp_path / "astronaut.png"
    Image.fromarray(astronaut[::4, ::4]).save(img)
    rc = main(["segment", str(img), "--classes", "person, sky, flag", "--preset", "naclip", "--fsa",
               "--random-weights", "--tiny", "--device", "cpu", "--set", "inference.short_side=128",
               "--out", str(tmp_path / "out")])
    assert rc == 0
    assert (tmp_path / "out" / "astronaut_labels.png").is_file()
