"""Contract tests over every registered component (after timm's ``tests/test_models.py``): a head,
strategy, refiner or plug-in registered anywhere is picked up here without editing this file.

Each component is built with its default parameters and exactly the models it declares it needs,
then run; the checks are what the rest of the pipeline relies on (shapes, finiteness, per-window
independence, honest needs). The formulas themselves are checked against naive ones in the
component's own test file.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from open_clip.transformer import ResidualAttentionBlock

from dapseg.heads.base import HeadContext, HeadOutput
from dapseg.refine import Refined, RefineInput
from dapseg.registry import (
    BUILDER_NEEDS,
    HEADS,
    MASK_GENERATORS,
    PLUGINS,
    REFINERS,
    STRATEGIES,
    VFM_FAMILIES,
    Backbone,
    Need,
    all_registries,
)

D, N_HEADS, E = 32, 4, 16


@pytest.fixture(scope="module")
def sam():
    from dapseg.models.sam.build import tiny_sam

    torch.manual_seed(0)
    return tiny_sam()


def provided_for(needs: frozenset[Need], sam) -> dict:
    """The builder keywords of ``needs``, as the segmenter's model bundle gives them."""
    out = {}
    if Need.SAM_ENCODER in needs or Need.SAM_DECODER in needs:
        out[Need.SAM_ENCODER.value] = sam.image_encoder
        out[Need.SAM_DECODER.value] = sam
    if Need.BACKBONE in needs:
        out[Need.BACKBONE.value] = Backbone("ViT-B-16", "dino_vitb16", "dino")
    return out


def make_ctx(needs: frozenset[Need], batch: int = 2, seed: int = 0) -> HeadContext:
    """A context holding only what ``needs`` asks for: an undeclared need is absent (None)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    blocks = torch.nn.ModuleList(ResidualAttentionBlock(d_model=D, n_head=N_HEADS, batch_first=True).eval()
                                 for _ in range(3))
    grid, vgrid = (3, 4), (5, 6)
    layers = [torch.randn(batch, 1 + grid[0] * grid[1], D, generator=g)]
    with torch.no_grad():
        for blk in blocks[:-1]:
            layers.append(blk(layers[-1]))
    return HeadContext(
        x=layers[-1],
        grid=grid,
        block=blocks[-1],
        vfm_feats=torch.randn(batch, 8, *vgrid, generator=g) if Need.VFM_FEATURES in needs else None,
        vfm_attn=(torch.rand(batch, 2, vgrid[0] * vgrid[1], vgrid[0] * vgrid[1], generator=g).softmax(-1)
                  if Need.VFM_ATTENTION in needs else None),
        images=torch.rand(batch, 3, 48, 64, generator=g) if Need.WINDOW_PIXELS in needs else None,
        layers=tuple(layers) if Need.CLIP_LAYERS in needs else None,
        blocks=blocks if Need.CLIP_LAYERS in needs else None,
        # region maps at the windows' pixel size, lowest value 0 = no mask, a padded border (sentinel)
        region_masks=(torch.nn.functional.pad(torch.randint(0, 4, (batch, 44, 60), generator=g), (2, 2, 2, 2),
                                              value=10000) if Need.REGION_MASKS in needs else None),
    )


def _one(ctx: HeadContext, b: int) -> HeadContext:
    pick = (lambda t: None if t is None else t[b : b + 1])
    return HeadContext(x=ctx.x[b : b + 1], grid=ctx.grid, block=ctx.block, vfm_feats=pick(ctx.vfm_feats),
                       vfm_attn=pick(ctx.vfm_attn), images=pick(ctx.images),
                       layers=None if ctx.layers is None else tuple(t[b : b + 1] for t in ctx.layers),
                       blocks=ctx.blocks, region_masks=pick(ctx.region_masks))


# ----------------------------------------------------------------------------- every registry


@pytest.mark.parametrize("kind", sorted(all_registries()))
def test_registry_lists_builtins_and_names_the_known_ones_on_a_typo(kind):
    registry = all_registries()[kind]
    names = registry.names()
    assert names and names == sorted(names)
    with pytest.raises(ValueError, match=rf"unknown .*'no_such_thing'; known: .*{names[0]}"):
        registry.get("no_such_thing")


def _entries():
    return [(kind, name) for kind, reg in all_registries().items() if kind != "vfm_family" for name in reg.names()]


@pytest.mark.parametrize(("kind", "name"), _entries())
def test_params_have_defaults_and_refuse_unknown_keys(kind, name):
    registry = all_registries()[kind]
    entry = registry.get(name)
    defaults = registry.validate(name, {})
    if entry.params is None:
        assert defaults == {}
    else:
        assert defaults == entry.params().model_dump()
        assert registry.validate(name, defaults) == defaults  # a dumped config validates again
    with pytest.raises(ValueError, match="bogus_key"):
        registry.validate(name, {"bogus_key": 1})
    assert entry.needs_for(defaults) <= set(Need)


# ----------------------------------------------------------------------------- heads


@pytest.mark.parametrize("name", HEADS.names())
def test_head_runs_on_exactly_what_it_declares(name, sam):
    entry = HEADS.get(name)
    needs = entry.needs_for({})
    head = HEADS.build(name, {}, **provided_for(needs, sam))
    ctx = make_ctx(needs)
    out = head(ctx)
    assert isinstance(out, HeadOutput)
    grid = ctx.vfm_feats.shape[-2:] if Need.VFM_FEATURES in needs else ctx.grid
    assert tuple(out.grid) == tuple(grid)
    assert out.tokens.shape == (2, grid[0] * grid[1], D) and torch.isfinite(out.tokens).all()
    # every head works per window: a window's tokens do not depend on the others in its batch
    for b in range(2):
        torch.testing.assert_close(head(_one(ctx, b)).tokens, out.tokens[b : b + 1], atol=1e-5, rtol=1e-5)
    # plug-ins rework a head through its attention: every head offers one, over its value tokens
    a = out.attention if out.attention is not None else head.attention(ctx)
    m = a.v.shape[2]
    assert a.attn.shape[0] == 2 and a.attn.shape[-2:] == (m, m) and torch.isfinite(a.attn).all()
    assert m == grid[0] * grid[1] + int(a.has_cls)


@pytest.mark.parametrize("name", HEADS.names())
def test_head_needs_are_declared_honestly(name, sam):
    """Without what it declared, a head fails with a message that names the missing input."""
    needs = HEADS.get(name).needs_for({})
    head = HEADS.build(name, {}, **provided_for(needs, sam))
    for need in needs - set(BUILDER_NEEDS):
        with pytest.raises(ValueError, match=r"vfm|VFM|images|pixels|layers|mask"):
            head(make_ctx(needs - {need}))


# ----------------------------------------------------------------------------- strategies


@pytest.fixture(scope="module")
def engine():
    from dapseg.config import ClipConfig
    from dapseg.inference.engine import DenseEngine
    from dapseg.models.clip import build_clip

    torch.manual_seed(0)
    clip = build_clip(ClipConfig(), random_weights=True, tiny=True)
    return DenseEngine(clip, HEADS.build("naclip"))  # a head every strategy supports


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_strategy_gives_logits_covering_the_image(name, engine, sam):
    from dapseg.config import InferenceConfig

    entry = STRATEGIES.get(name)
    strategy = STRATEGIES.build(name, {}, **provided_for(entry.needs_for({}), sam))
    cfg = InferenceConfig(mode=name, short_side=None, crop=48, stride=32, max_batch=2)
    text = torch.nn.functional.normalize(torch.randn(3, engine.clip.visual.output_dim), dim=-1)
    image = torch.rand(3, 56, 80, generator=torch.Generator().manual_seed(3))
    logits = strategy(engine, image, text, cfg)
    assert logits.shape == (3, 56, 80) and torch.isfinite(logits).all()
    assert logits.abs().max() <= 1.0 + 1e-4  # cosine logits


# ----------------------------------------------------------------------------- refiners


@pytest.mark.parametrize("name", REFINERS.names())
def test_refiner_returns_what_it_decides_in_the_right_shapes(name, sam):
    entry = REFINERS.get(name)
    refiner = REFINERS.build(name, {}, **provided_for(entry.needs_for({}), sam))
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    q2c = [0, 1, 1, 2]
    logits = torch.from_numpy(rng.normal(0, 0.05, (4, 40, 56))).float()
    text = (torch.nn.functional.normalize(torch.randn(4, E, generator=torch.Generator().manual_seed(0)), dim=-1)
            if Need.CLASS_TEXT in entry.needs_for({}) else None)  # the query embeddings, when declared
    regions = torch.randint(0, 5, (40, 56)) if Need.REGION_MASKS in entry.needs_for({}) else None
    out = refiner(RefineInput(image, logits, q2c, logit_scale=40.0, prob_thd=0.0, text=text, region_masks=regions))
    assert isinstance(out, Refined) and (out.logits is not None or out.probs is not None)
    if out.logits is not None:
        assert out.logits.shape == logits.shape and torch.isfinite(out.logits).all()
    if out.probs is not None:
        assert out.probs.shape == (3, 40, 56) and (out.probs >= 0).all()
        torch.testing.assert_close(out.probs.sum(0), torch.ones(40, 56))
    if out.labels is not None:
        assert out.labels.shape == (40, 56) and out.labels.dtype == torch.int64
        assert int(out.labels.min()) >= 0 and int(out.labels.max()) < 3


# ----------------------------------------------------------------------------- plug-ins


@pytest.mark.parametrize("name", PLUGINS.names())
@pytest.mark.parametrize("head_name", ["maskclip", "proxy"])
def test_plugin_keeps_the_heads_output_shape(name, head_name, sam):
    entry = PLUGINS.get(name)
    plugin = PLUGINS.build(name, {}, **provided_for(entry.needs_for({}), sam))
    head_needs = HEADS.get(head_name).needs_for({})
    head = HEADS.build(head_name, {})
    ctx = make_ctx(head_needs | entry.needs_for({}))
    to_embed = torch.nn.Linear(D, E)
    text = torch.nn.functional.normalize(torch.randn(3, E), dim=-1)
    out = plugin(head, ctx, text, to_embed)
    own = head(ctx)
    assert out.tokens.shape == own.tokens.shape and tuple(out.grid) == tuple(own.grid)
    assert torch.isfinite(out.tokens).all()


# ----------------------------------------------------------------------------- mask generators


@pytest.mark.parametrize("name", MASK_GENERATORS.names())
def test_mask_generator_gives_an_integer_map_of_the_image_size(name, tmp_path):
    """Every generator's tiny random build returns an (H, W) int64 map below the padding sentinel."""
    from dapseg.masks.base import PAD_SENTINEL, MaskBuild, build_mask_generator

    image = np.random.default_rng(0).integers(0, 256, (37, 52, 3), dtype=np.uint8)
    params: dict = {}
    if name == "folder":  # reads precomputed masks: one for this image
        np.savez_compressed(tmp_path / "img.npz", instance_mask=np.arange(37 * 52).reshape(37, 52) % 5)
        params = {"root": str(tmp_path)}
    if name == "sam2":
        from test_masks_generators import require

        require("sam2")
    fields = MASK_GENERATORS.get(name).params.model_fields
    if "points_per_side" in fields:  # automatic mask generators: a 2x2 grid of prompts keeps this fast
        params["points_per_side"] = 2
    torch.manual_seed(0)
    generator = build_mask_generator(name, params, MaskBuild(random_weights=True, tiny=True))
    out = generator(image, name="img")
    assert out.shape == (37, 52) and out.dtype == torch.int64
    assert int(out.max()) < PAD_SENTINEL


# ----------------------------------------------------------------------------- VFM families


@pytest.mark.parametrize("family", VFM_FAMILIES.names())
def test_vfm_family_contributes_specs_of_its_own(family):
    from dapseg.models.vfm import list_vfms, vfm_spec

    fam = VFM_FAMILIES.build(family)
    assert fam.name == family and fam.specs
    for spec in fam.specs:
        assert spec.family == family and spec.name in list_vfms() and vfm_spec(spec.name) == spec


@pytest.mark.parametrize("family", VFM_FAMILIES.names())
def test_vfm_family_contract(family):
    """Every family's tiny build: the declared normalisation, traits, params model and weights source,
    features (B, C, h', w') on the grid it announces, attention rows summing to 1 where it has any."""
    from dapseg.config import VfmConfig
    from dapseg.models.vfm import FamilyTraits, build_vfm

    fam = VFM_FAMILIES.build(family)
    spec = fam.specs[0]
    assert isinstance(fam.traits, FamilyTraits) and isinstance(fam.weights.folder, bool)
    assert VFM_FAMILIES.get(family).params is fam.params
    cfg = VfmConfig(name=spec.name)
    assert cfg.params == (fam.params().model_dump() if fam.params is not None else {})
    torch.manual_seed(0)
    model = build_vfm(cfg, random_weights=True, tiny=True, window_size=64, device="cpu")
    assert model.traits == fam.traits and model.family == family
    assert model.mean.flatten().tolist() == pytest.approx(spec.mean)
    assert model.std.flatten().tolist() == pytest.approx(spec.std)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    images = torch.rand(2, 3, 64, 80, generator=torch.Generator().manual_seed(0))
    gh, gw = model.grid(64, 80)
    out = model(images, return_attn=model.num_heads > 0)
    assert tuple(out.feats.shape) == (2, model.embed_dim, gh, gw) and torch.isfinite(out.feats).all()
    if model.num_heads > 0:
        assert tuple(out.attn.shape) == (2, model.num_heads, gh * gw, gh * gw)
        torch.testing.assert_close(out.attn.sum(-1), torch.ones(2, model.num_heads, gh * gw))


def test_config_names_the_setting_of_an_unknown_component():
    from pydantic import ValidationError

    from dapseg.config import SegmenterConfig

    for key, value, where in (("inference.mode", "diagonal", "inference.mode"), ("head.name", "nope", "head.name"),
                              ("refine.name", "crf", "refine.name")):
        with pytest.raises(ValidationError) as err:
            SegmenterConfig().with_overrides({key: value})
        assert where in str(err.value) and "known:" in str(err.value)
    # "no refiner" drops the parameters of the one switched off (a sweep over refine.name needs this)
    off = SegmenterConfig().with_overrides({"refine.name": "none", "refine.params": {"steps": 3}})
    assert off.refine.params == {}
