"""The dense CLIP path against open_clip's own forward, local weight files, and offline errors."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch

from dapseg.config import ClipConfig
from dapseg.heads.base import HeadContext, build_head
from dapseg.models.clip import build_clip
from dapseg.weights import WeightsMissingError

TEST_MODEL = "dapseg-test-tiny"


@pytest.fixture(scope="module")
def registered_tiny_config(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny open_clip architecture registered by name, so the by-name loading path is exercised."""
    d = tmp_path_factory.mktemp("cfg")
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 32, "patch_size": 16, "head_width": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
    }
    (d / f"{TEST_MODEL}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(d / f"{TEST_MODEL}.json")
    return TEST_MODEL


def test_dense_path_matches_open_clip_at_native_size() -> None:
    clip = build_clip(ClipConfig(), random_weights=True, tiny=True)
    torch.manual_seed(0)
    images = torch.randn(2, 3, 224, 224)
    x, grid = clip.tokens_before_last_block(images)
    out = build_head("vanilla")(HeadContext(x=x, grid=grid, block=clip.last_block))
    ours = clip.head_tokens_to_embeddings(out.tokens)
    visual = clip.visual
    visual.output_tokens = True
    try:
        _, tokens = visual(images)  # open_clip: tokens after ln_post, before proj
    finally:
        visual.output_tokens = False
    torch.testing.assert_close(ours, tokens @ visual.proj, atol=1e-5, rtol=1e-5)
    assert grid == (14, 14)


def test_positional_embedding_interpolation_for_other_sizes() -> None:
    clip = build_clip(ClipConfig(), random_weights=True, tiny=True)
    pos = clip.visual.positional_embedding
    assert clip.interpolated_pos_embed((14, 14)) is pos
    for grid in [(10, 21), (1, 1), (28, 14)]:
        out = clip.interpolated_pos_embed(grid)
        assert out.shape == (1 + grid[0] * grid[1], pos.shape[1])
        torch.testing.assert_close(out[0], pos[0])  # CLS position untouched
    # a constant positional field stays constant under bicubic interpolation
    with torch.no_grad():
        saved = pos.clone()
        pos[1:] = 0.5
        torch.testing.assert_close(clip.interpolated_pos_embed((9, 17))[1:], torch.full((153, pos.shape[1]), 0.5))
        pos.copy_(saved)


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_local_weight_file_is_loaded(tmp_path: Path, registered_tiny_config: str, suffix: str) -> None:
    source = open_clip.create_model(registered_tiny_config)
    for p in source.parameters():
        torch.nn.init.normal_(p, std=0.05)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)  # wrapped, as trainers save
    clip = build_clip(ClipConfig(model=registered_tiny_config, weights=path))
    for key, value in state.items():
        torch.testing.assert_close(clip.model.state_dict()[key], value)


def test_wrong_weight_file_names_the_file(tmp_path: Path, registered_tiny_config: str) -> None:
    path = tmp_path / "other.bin"
    torch.save({"something.else": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match=r"other\.bin.*does not fit"):
        build_clip(ClipConfig(model=registered_tiny_config, weights=path))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"garbage\.safetensors"):
        build_clip(ClipConfig(model=registered_tiny_config, weights=garbage))


def test_offline_without_cache_fails_fast_naming_the_weights(tmp_path: Path) -> None:
    with pytest.raises(WeightsMissingError, match=r"CLIP ViT-B-16 \(openai\).*dapseg download"):
        build_clip(ClipConfig(), cache_dir=tmp_path)


def test_unknown_model_and_tag() -> None:
    with pytest.raises(ValueError, match="unknown open_clip model"):
        build_clip(ClipConfig(model="ViT-Nope"), random_weights=True)
    with pytest.raises(ValueError, match="valid tags"):
        build_clip(ClipConfig(pretrained="nope"))


def test_random_weights_repeat_and_leave_the_callers_rng_alone() -> None:
    from dapseg.api import Segmenter

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = Segmenter.from_preset("naclip", random_weights=True, tiny=True)
    assert torch.equal(torch.rand(3), expected)  # building did not consume or reseed the global RNG
    second = Segmenter.from_preset("naclip", random_weights=True, tiny=True)
    for p, q in zip(first.clip.parameters(), second.clip.parameters(), strict=True):
        assert torch.equal(p, q)


def test_tokens_entering_blocks_chain_the_blocks_and_reach_the_engine() -> None:
    """layers[i + 1] = blocks[i](layers[i]); layers[-1] is the head's x; a head declaring
    Need.CLIP_LAYERS receives them (and the blocks), a head that does not gets None."""
    from dapseg.heads.base import Head, HeadOutput
    from dapseg.inference.engine import DenseEngine
    from dapseg.registry import Need

    torch.manual_seed(0)
    clip = build_clip(ClipConfig(), random_weights=True, tiny=True)
    images = torch.rand(2, 3, 32, 48)
    layers, grid = clip.tokens_entering_blocks(images)
    assert len(layers) == len(clip.blocks) and grid == (2, 3)
    for i in range(len(layers) - 1):
        torch.testing.assert_close(clip.blocks[i](layers[i]), layers[i + 1], rtol=0, atol=0)
    last, _ = clip.tokens_before_last_block(images)
    torch.testing.assert_close(last, layers[-1], rtol=0, atol=0)

    seen: list[HeadContext] = []

    class Spy(Head):

        def forward(self, ctx: HeadContext) -> HeadOutput:
            seen.append(ctx)
            return HeadOutput(tokens=ctx.x[:, 1:], grid=ctx.grid)

    for needs, expect in (({Need.CLIP_LAYERS}, True), (set(), False)):
        seen.clear()
        engine = DenseEngine(clip, Spy(), needs=needs)
        engine.head_output(images * 0.5 + 0.25, torch.randn(3, clip.embed_dim))
        ctx = seen[0]
        if expect:
            assert ctx.layers is not None and ctx.blocks is clip.blocks and len(ctx.layers) == len(layers)
            torch.testing.assert_close(ctx.layers[-1], ctx.x, rtol=0, atol=0)
        else:
            assert ctx.layers is None and ctx.blocks is None
