"""A new method is one module: a head, a strategy, a refiner and a plug-in registered from *outside*
the package (here, this test file) are validated by the config, built by the segmenter with what they
declare, and run in a preset-based config file, with no edit anywhere in ``dapseg``.

Each toy component has its own naive expectation, checked on the segmenter's output.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field
from skimage import data

from dapseg.heads.base import Attention, Head, HeadContext, qkv
from dapseg.inference.strategies import whole
from dapseg.postprocess import class_probs, labels_from_probs
from dapseg.refine import Refined
from dapseg.registry import HEADS, PLUGINS, REFINERS, STRATEGIES
from dapseg.text import ClassSet

CLASSES = ["cup", "table", "wall"]


class ToyMixParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight: float = Field(0.5, ge=0, le=1)  # share of the uniform attention


class ToyMixHead(Head):
    """Attn = w·uniform + (1 − w)·I over the CLIP patches (CLS dropped)."""

    name = "toy_mix"

    def __init__(self, params: ToyMixParams) -> None:
        super().__init__()
        self.params = params

    def attention(self, ctx: HeadContext) -> Attention:
        _, _, v = qkv(ctx.block, ctx.x)
        v = v[:, :, 1:]  # (B, heads, N, d)
        n = v.shape[2]
        w = self.params.weight
        attn = torch.full((n, n), w / n) + (1 - w) * torch.eye(n)
        return Attention(attn=attn.expand(v.shape[0], 1, n, n), v=v, grid=ctx.grid, has_cls=False)


def toy_flip(engine, image01, text, cfg):
    """The mean of the image's logits and the mirrored image's logits mirrored back."""
    return 0.5 * (whole(engine, image01, text, cfg) + whole(engine, image01.flip(-1), text, cfg).flip(-1))


def toy_swap(inp):
    """Classes 0 and 1 swap their probabilities."""
    probs = inp.probs.clone()
    probs[[0, 1]] = probs[[1, 0]]
    return Refined(probs=probs)


class ToyCount:
    """Counts the head runs it wraps; leaves the output as it is."""

    calls = 0

    def __call__(self, head, ctx, text, to_embed):
        ToyCount.calls += 1
        return head(ctx)


@pytest.fixture
def toys():
    HEADS.register("toy_mix", params=ToyMixParams)(ToyMixHead)
    STRATEGIES.register("toy_flip")(lambda: toy_flip)
    REFINERS.register("toy_swap")(lambda: toy_swap)
    PLUGINS.register("toy_count")(ToyCount)
    yield
    for registry, name in ((HEADS, "toy_mix"), (STRATEGIES, "toy_flip"), (REFINERS, "toy_swap"),
                           (PLUGINS, "toy_count")):
        registry.unregister(name)


CONFIG = """
base: naclip
description: toy components registered from outside the package
head: {name: toy_mix, params: {weight: 0.25}}
plugins: [{name: toy_count}]
inference: {mode: toy_flip, short_side: 48}
refine: {name: toy_swap}
"""


def test_outside_components_run_in_a_config(toys, tmp_path):
    from dapseg.api import Segmenter
    from dapseg.config import load_config_file
    from dapseg.demo.backend import plugin_choices, refiner_choices

    path = tmp_path / "toy.yaml"
    path.write_text(CONFIG, encoding="utf-8")
    config = load_config_file(path)
    assert config.head.params == {"weight": 0.25}  # naclip's sigma is not carried over to another head
    assert "toy_count" in plugin_choices() and "toy_swap" in refiner_choices()
    with pytest.raises(ValueError, match="weight"):
        load_config_file(path, {"head.params.weight": 2.0})  # the outside Params model validates

    seg = Segmenter(config, random_weights=True, tiny=True, device="cpu")
    image = np.ascontiguousarray(data.coffee()[::10, ::10])  # (40, 60, 3)
    ToyCount.calls = 0
    out = seg.predict(image, CLASSES)
    assert ToyCount.calls == 2  # the plug-in wrapped the head in both passes of the strategy

    # head: the engine's window embeddings equal the naive formula out_proj(Attn · v)
    windows = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    seen = []
    inner = seg.engine.plugin
    seg.engine.plugin = lambda head, ctx, text, to_embed: (seen.append(ctx), inner(head, ctx, text, to_embed))[1]
    seg_classes = ClassSet.coerce(CLASSES)
    text = seg.text_embeddings(seg_classes)
    got = seg.engine.head_output(windows, text).tokens
    seg.engine.plugin = inner
    ctx = seen[0]
    block = ctx.block
    h = block.ln_1(ctx.x)
    v = torch.nn.functional.linear(h, block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, -1)[2][:, 1:]
    n = v.shape[1]
    attn = 0.25 * torch.full((n, n), 1 / n) + 0.75 * torch.eye(n)
    torch.testing.assert_close(got, block.attn.out_proj(attn @ v), atol=1e-5, rtol=1e-5)

    # strategy: the coarse logits are the mean of the image's and the mirrored image's whole-image logits
    plain = Segmenter(config.with_overrides({"inference.mode": "whole", "refine.name": "none",
                                             "plugins": []}),
                      random_weights=True, tiny=True, device="cpu")
    a = plain.coarse_logits(image, seg_classes)
    b = plain.coarse_logits(np.ascontiguousarray(image[:, ::-1]), seg_classes).flip(-1)
    torch.testing.assert_close(out.coarse_logits, 0.5 * (a + b), atol=1e-5, rtol=1e-5)

    # refiner: probabilities of classes 0 and 1 swapped, labels follow from them
    want = class_probs(out.logits, seg.config.postprocess.logit_scale, seg_classes.query_to_class)
    want[[0, 1]] = want[[1, 0]]
    torch.testing.assert_close(out.probs, want)
    assert torch.equal(out.labels, labels_from_probs(want, seg.config.postprocess.prob_thd))


def test_unregistered_names_fail_when_the_config_loads(tmp_path):
    from dapseg.config import load_config_file

    path = tmp_path / "toy.yaml"
    path.write_text(CONFIG, encoding="utf-8")
    with pytest.raises(ValueError, match=r"unknown head 'toy_mix'; known: .*dap"):
        load_config_file(path)
