"""Each last-block head against a naive formula written here (docs/design.md, "How we know it is right")."""

from __future__ import annotations

import math

import pytest
import torch
from open_clip.transformer import ResidualAttentionBlock

from dapseg.heads.base import HeadContext, build_head

D, HEADS = 32, 4


def make_block(seed: int = 0) -> ResidualAttentionBlock:
    torch.manual_seed(seed)
    block = ResidualAttentionBlock(d_model=D, n_head=HEADS, batch_first=True).eval()
    for p in block.parameters():  # default init leaves biases at 0: randomise everything
        torch.nn.init.normal_(p, std=0.3)
    return block


def make_ctx(grid: tuple[int, int], batch: int = 2, seed: int = 1) -> HeadContext:
    torch.manual_seed(seed)
    x = torch.randn(batch, 1 + grid[0] * grid[1], D)
    return HeadContext(x=x, grid=grid, block=make_block())


def naive_qkv_per_head(block: ResidualAttentionBlock, x: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """[(q_h, k_h, v_h)] for each head, each (B, M, d), from the raw in-projection weights."""
    h = torch.nn.functional.layer_norm(x, (D,), block.ln_1.weight, block.ln_1.bias, block.ln_1.eps)
    w, b = block.attn.in_proj_weight, block.attn.in_proj_bias
    q = h @ w[:D].T + b[:D]
    k = h @ w[D : 2 * D].T + b[D : 2 * D]
    v = h @ w[2 * D :].T + b[2 * D :]
    d = D // HEADS
    return [tuple(t[..., i * d : (i + 1) * d] for t in (q, k, v)) for i in range(HEADS)]


def out_proj(block: ResidualAttentionBlock, z: torch.Tensor) -> torch.Tensor:
    return z @ block.attn.out_proj.weight.T + block.attn.out_proj.bias


def ffn_residual(block: ResidualAttentionBlock, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    y = x + attn_out
    return y + block.mlp(block.ln_2(y))


GRIDS = [(3, 5), (4, 4), (1, 1), (2, 1)]


@pytest.mark.parametrize("grid", GRIDS)
def test_vanilla_is_the_trained_block(grid: tuple[int, int]) -> None:
    ctx = make_ctx(grid)
    out = build_head("vanilla")(ctx)
    expected = ctx.block(ctx.x)[:, 1:]  # open_clip's own block forward
    assert out.tokens.shape == (2, grid[0] * grid[1], D)
    torch.testing.assert_close(out.tokens, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grid", GRIDS)
def test_maskclip_is_value_projection(grid: tuple[int, int]) -> None:
    ctx = make_ctx(grid)
    out = build_head("maskclip")(ctx)
    heads = naive_qkv_per_head(ctx.block, ctx.x)
    v = torch.cat([vh for _, _, vh in heads], dim=-1)[:, 1:]
    torch.testing.assert_close(out.tokens, out_proj(ctx.block, v), atol=1e-5, rtol=1e-5)
    # its attention, for plug-ins, is the identity over patches
    a = build_head("maskclip").attention(ctx)
    torch.testing.assert_close(a.attn[0, 0], torch.eye(grid[0] * grid[1]))


@pytest.mark.parametrize("grid", GRIDS)
def test_sclip_correlative_attention(grid: tuple[int, int]) -> None:
    ctx = make_ctx(grid)
    out = build_head("sclip")(ctx)
    outs = []
    for q, k, v in naive_qkv_per_head(ctx.block, ctx.x):
        s = 1 / math.sqrt(q.shape[-1])
        attn = torch.softmax(q @ q.transpose(1, 2) * s, -1) + torch.softmax(k @ k.transpose(1, 2) * s, -1)
        outs.append(attn @ v)
    expected = ffn_residual(ctx.block, ctx.x, out_proj(ctx.block, torch.cat(outs, -1)))[:, 1:]
    torch.testing.assert_close(out.tokens, expected, atol=1e-5, rtol=1e-5)


def naive_gaussian(grid: tuple[int, int], sigma: float) -> torch.Tensor:
    """(1 + N, 1 + N): CLS row/column 0, else exp(-dist² / 2σ²) by explicit loops."""
    h, w = grid
    n = h * w
    omega = torch.zeros(1 + n, 1 + n)
    for i in range(n):
        for j in range(n):
            dy, dx = i // w - j // w, i % w - j % w
            omega[1 + i, 1 + j] = math.exp(-(dy * dy + dx * dx) / (2 * sigma * sigma))
    return omega


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("sigma", [5.0, 0.7])
def test_naclip_neighbourhood_attention(grid: tuple[int, int], sigma: float) -> None:
    ctx = make_ctx(grid)
    out = build_head("naclip", {"sigma": sigma})(ctx)
    omega = naive_gaussian(grid, sigma)
    outs = []
    for _, k, v in naive_qkv_per_head(ctx.block, ctx.x):
        attn = torch.softmax(k @ k.transpose(1, 2) / math.sqrt(k.shape[-1]) + omega, -1)
        outs.append(attn @ v)
    expected = out_proj(ctx.block, torch.cat(outs, -1))[:, 1:]  # reduced block: no residual, no FFN
    torch.testing.assert_close(out.tokens, expected, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out.tokens).all()


@pytest.mark.parametrize("name", ["vanilla", "maskclip", "sclip", "naclip"])
def test_windows_are_independent_in_a_batch(name: str) -> None:
    ctx = make_ctx((3, 4), batch=3)
    head = build_head(name)
    together = head(ctx).tokens
    for b in range(3):
        alone = head(HeadContext(x=ctx.x[b : b + 1], grid=ctx.grid, block=ctx.block)).tokens
        torch.testing.assert_close(together[b : b + 1], alone, atol=1e-5, rtol=1e-5)


def test_unknown_head_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown head 'nope'.*naclip.*vanilla"):
        build_head("nope")


def test_head_params_are_validated() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        build_head("naclip", {"sigma": -1})
    with pytest.raises(ValueError, match="takes no params"):
        build_head("vanilla", {"sigma": 1})
