"""SC-CLIP: the outlier scores against scikit-learn, the neighbour replacement, every step of the head
against naive formulas written here, batching, presets and the command line on tiny random weights."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from open_clip.transformer import ResidualAttentionBlock
from PIL import Image
from pydantic import ValidationError
from skimage import data
from sklearn.neighbors import LocalOutlierFactor, NearestNeighbors

from dapseg.config import load_preset
from dapseg.data.spec import load_dataset_spec
from dapseg.heads.base import HeadContext, build_head
from dapseg.heads.outliers import outlier_mask, outlier_scores, replace_by_neighbour_mean
from dapseg.heads.scclip import ScclipHead
from dapseg.registry import HEADS, Need

# ----------------------------------------------------------------------------- outlier scores


def points(seed: int, n: int = 60, dim: int = 6, planted: int = 3) -> np.ndarray:
    """Gaussian points with ``planted`` far ones (float64, tie-free)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim))
    x[:planted] += rng.normal(6.0, 1.0, size=(planted, dim))
    return x


def sklearn_lof(x: np.ndarray, k: int, contamination: float) -> tuple[np.ndarray, np.ndarray]:
    """(outlier mask, LOF scores) of scikit-learn's LocalOutlierFactor."""
    lof = LocalOutlierFactor(n_neighbors=k, contamination=contamination, algorithm="brute")
    labels = lof.fit_predict(x)
    return labels == -1, -lof.negative_outlier_factor_


def naive_kdist_ratio(x: np.ndarray, k: int) -> np.ndarray:
    """score(i) = mean over the k nearest o of kd(i)² / kd(o)², neighbours from scikit-learn."""
    dist, idx = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(x).kneighbors()  # self excluded
    kd2 = dist[:, -1] ** 2
    return np.array([np.mean([kd2[i] / kd2[o] for o in idx[i]]) for i in range(len(x))])


def above_quantile(scores: np.ndarray, contamination: float) -> np.ndarray:
    return scores > np.quantile(scores, 1.0 - contamination)  # numpy's linear interpolation


def with_duplicates(seed: int, copies: int) -> np.ndarray:
    """Points where ``copies`` rows are one point (degenerate: distance 0, equal neighbours)."""
    x = points(seed)
    x[10 : 10 + copies] = x[10]
    return x


CASES = [(points(0), 10, 0.05), (points(1), 30, 0.05), (points(2), 5, 0.1), (points(3, planted=0), 12, 0.2),
         (with_duplicates(4, 4), 10, 0.05), (with_duplicates(5, 25), 10, 0.1)]


# scikit-learn warns that duplicates make LOF "incorrect"; they are part of what is compared here.
DUPLICATES_WARNING = "ignore:Duplicate values are leading to incorrect results"


@pytest.mark.filterwarnings(DUPLICATES_WARNING)
@pytest.mark.parametrize(("x", "k", "c"), CASES)
def test_lof_is_scikit_learns_local_outlier_factor(x, k, c):
    want_mask, want_scores = sklearn_lof(x, k, c)
    t = torch.from_numpy(x)[None]
    scores = outlier_scores(t, k, "lof")[0].numpy()
    np.testing.assert_allclose(scores, want_scores, rtol=1e-9)
    assert np.array_equal(outlier_mask(t, k, c, "lof")[0].numpy(), want_mask)
    assert want_mask.any()


@pytest.mark.filterwarnings(DUPLICATES_WARNING)
def test_lof_with_more_duplicates_than_neighbours_and_few_points():
    """k-distance 0 (lrd = 1 / 1e-10) and n_neighbors >= N (clamped to N − 1, as scikit-learn does)."""
    x = with_duplicates(6, 25)
    want_mask, want_scores = sklearn_lof(x, 10, 0.05)
    assert np.isclose(want_scores[10:35], 1.0).all()  # the duplicates are each other's neighbours
    t = torch.from_numpy(x)[None]
    np.testing.assert_allclose(outlier_scores(t, 10, "lof")[0].numpy(), want_scores, rtol=1e-9)
    assert np.array_equal(outlier_mask(t, 10, 0.05, "lof")[0].numpy(), want_mask)
    small = points(7, n=12)
    with pytest.warns(UserWarning, match="n_neighbors"):
        want_mask, want_scores = sklearn_lof(small, 30, 0.1)
    t = torch.from_numpy(small)[None]
    np.testing.assert_allclose(outlier_scores(t, 30, "lof")[0].numpy(), want_scores, rtol=1e-9)
    assert np.array_equal(outlier_mask(t, 30, 0.1, "lof")[0].numpy(), want_mask)


@pytest.mark.parametrize(("x", "k", "c"), CASES[:5])
def test_kdist_ratio_is_the_official_score(x, k, c):
    """The official code's score (squared distances, own k-distance as reach distance) on the
    neighbours scikit-learn finds; the same quantile rule."""
    want = naive_kdist_ratio(x, k)
    t = torch.from_numpy(x)[None]
    got = outlier_scores(t, k, "kdist_ratio")[0].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-9)
    assert np.array_equal(outlier_mask(t, k, c, "kdist_ratio")[0].numpy(), above_quantile(want, c))


def test_kdist_ratio_window_with_zero_k_distance_has_no_outliers():
    """More than k duplicates: 0/0 scores, so (as in the official code) that window keeps every
    token; the other windows of the batch are unaffected."""
    x = torch.from_numpy(np.stack([with_duplicates(8, 25), points(9)]))
    mask = outlier_mask(x, 10, 0.05, "kdist_ratio")
    assert not mask[0].any()
    assert np.array_equal(mask[1].numpy(), above_quantile(naive_kdist_ratio(points(9), 10), 0.05))


@pytest.mark.parametrize("score", ["kdist_ratio", "lof"])
def test_outliers_of_a_batch_are_those_of_each_window(score):
    x = torch.from_numpy(np.stack([points(s) for s in range(4)])).float()
    together = outlier_mask(x, 10, 0.05, score)
    for b in range(4):
        assert torch.equal(together[b], outlier_mask(x[b : b + 1], 10, 0.05, score)[0])
    assert outlier_scores(x.bfloat16(), 10, score).dtype == torch.float32  # never scored in half precision


def test_outlier_settings_are_checked():
    x = torch.randn(1, 20, 4)
    with pytest.raises(ValueError, match="contamination"):
        outlier_mask(x, 5, 0.6)
    with pytest.raises(ValueError, match="n_neighbors"):
        outlier_scores(x, 0)
    assert not outlier_mask(x, 5, 0.0).any()  # contamination 0: nothing is above the maximum


# ----------------------------------------------------------------------------- neighbour replacement


def naive_replace(tokens: torch.Tensor, mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    h, w = grid
    out = tokens.clone()
    for b in range(tokens.shape[0]):
        for i in range(h):
            for j in range(w):
                if not mask[b, i * w + j]:
                    continue
                near = [tokens[b, y * w + x] for y in range(i - 1, i + 2) for x in range(j - 1, j + 2)
                        if (y, x) != (i, j) and 0 <= y < h and 0 <= x < w and not mask[b, y * w + x]]
                if near:
                    out[b, i * w + j] = torch.stack(near).mean(0)
    return out


@pytest.mark.parametrize("grid", [(4, 5), (1, 6), (3, 3), (1, 1)])
def test_replacement_is_the_mean_of_unmasked_grid_neighbours(grid):
    g = torch.Generator().manual_seed(sum(grid))
    n = grid[0] * grid[1]
    tokens = torch.randn(3, n, 7, generator=g, dtype=torch.float64)
    mask = torch.rand(3, n, generator=g) < 0.3
    mask[0, 0] = True  # a corner
    mask[1] = True  # every token masked: nothing to average, all keep their values
    got = replace_by_neighbour_mean(tokens, mask, grid)
    torch.testing.assert_close(got, naive_replace(tokens, mask, grid), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], tokens[1])
    torch.testing.assert_close(got[~mask], tokens[~mask])


# ----------------------------------------------------------------------------- the head, step by step

D, HEADS_N = 32, 4
GRID = (6, 7)
PARAMS = dict(n_neighbors=8, contamination=0.1, pre_adjust_layer=3, post_adjust_layer=1, fusion_start=1,
              fusion_end=4, cls_residual=0.3)


def make_ctx(batch: int = 2, grid: tuple[int, int] = GRID, n_blocks: int = 6, seed: int = 0) -> HeadContext:
    """float64 tokens entering ``n_blocks`` open_clip blocks, chained as the CLIP tower chains them."""
    torch.manual_seed(seed)
    blocks = torch.nn.ModuleList(
        [ResidualAttentionBlock(d_model=D, n_head=HEADS_N, batch_first=True).eval().double() for _ in range(n_blocks)])
    x = torch.randn(batch, 1 + grid[0] * grid[1], D, dtype=torch.float64)
    layers = [x]
    with torch.no_grad():
        for block in blocks[:-1]:
            layers.append(block(layers[-1]))
    return HeadContext(x=layers[-1], grid=grid, block=blocks[-1], layers=tuple(layers), blocks=blocks)


def one(ctx: HeadContext, b: int) -> HeadContext:
    return HeadContext(x=ctx.x[b : b + 1], grid=ctx.grid, block=ctx.block, blocks=ctx.blocks,
                       layers=tuple(t[b : b + 1] for t in ctx.layers))


def naive_cos(t: torch.Tensor) -> torch.Tensor:
    n = t / t.norm(dim=-1, keepdim=True)
    return n @ n.T


def naive_weights(s: torch.Tensor, beta: float) -> torch.Tensor:
    t = torch.where(s >= beta, s, torch.zeros_like(s))
    return t / (t.sum(dim=1, keepdim=True) + 1e-6)


def naive_reduced_block(block, patches: torch.Tensor, sim_attn: torch.Tensor) -> tuple[list, torch.Tensor]:
    """Per head: (softmax over {A ≥ 0} + softmax(k kᵀ/√d)) / 2 applied to v; out_proj of the heads."""
    h = block.ln_1(patches)
    w, bias = block.attn.in_proj_weight, block.attn.in_proj_bias
    k = h @ w[D : 2 * D].T + bias[D : 2 * D]
    v = h @ w[2 * D :].T + bias[2 * D :]
    dh = D // HEADS_N
    attns, outs = [], []
    for i in range(HEADS_N):
        kh, vh = k[:, i * dh : (i + 1) * dh], v[:, i * dh : (i + 1) * dh]
        attn = (sim_attn + torch.softmax(kh @ kh.T / math.sqrt(dh), dim=-1)) / 2
        attns.append(attn)
        outs.append(attn @ vh)
    return attns, block.attn.out_proj(torch.cat(outs, dim=-1))


def naive_scclip(ctx: HeadContext, b: int, p: dict) -> dict[str, torch.Tensor]:
    """SC-CLIP for window ``b``, written out (official layer numbers: layer i = layers[i + 1])."""
    feats = [t[b] for t in ctx.layers[1:]]
    x = feats[-1]
    cls, patches = x[0], x[1:]
    mask = torch.from_numpy(above_quantile(naive_kdist_ratio(patches.numpy(), p["n_neighbors"]), p["contamination"]))
    patches = naive_replace(patches[None], mask[None], ctx.grid)[0]
    pre = naive_replace(feats[p["pre_adjust_layer"]][1:][None], mask[None], ctx.grid)[0]
    s = naive_cos(pre)
    patches = naive_weights(s, 0.4) @ patches
    a = 3.0 * (s - s.mean())
    keep = a >= 0
    sim_attn = torch.where(keep, torch.exp(a), torch.zeros_like(a))
    sim_attn = sim_attn / sim_attn.sum(dim=1, keepdim=True)
    attns, out = naive_reduced_block(ctx.block, patches, sim_attn)
    with_cls = out + p["cls_residual"] * cls
    post = naive_weights(naive_cos(feats[p["post_adjust_layer"]][1:]), 0.4)
    fused_in = sum(feats[i] for i in range(p["fusion_start"], p["fusion_end"]))
    _, fused = naive_reduced_block(ctx.block, fused_in[1:], sim_attn)
    fused = post @ (fused + p["cls_residual"] * fused_in[0])
    return {"mask": mask, "attn": torch.stack(attns), "fused": fused, "cls": cls,
            "tokens": post @ with_cls + fused, "post": post}


def test_each_step_matches_the_naive_formula():
    ctx = make_ctx()
    head = build_head("scclip", PARAMS)
    with torch.no_grad():
        out = head(ctx)
    a = out.attention
    assert out.grid == GRID and out.tokens.shape == (2, GRID[0] * GRID[1], D) and not a.has_cls
    for b in range(2):
        want = naive_scclip(ctx, b, PARAMS)
        assert want["mask"].sum() >= 3  # outliers were found and replaced
        assert torch.equal(head.outliers(ctx.x[b : b + 1, 1:])[0], want["mask"])
        torch.testing.assert_close(a.attn[b], want["attn"], rtol=1e-10, atol=1e-12)  # the adjusted attention
        torch.testing.assert_close(a.fused[b], want["fused"], rtol=1e-10, atol=1e-12)  # multi-level fusion
        torch.testing.assert_close(a.post_weights[b], want["post"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out.tokens[b], want["tokens"], rtol=1e-10, atol=1e-12)


def test_cls_residual_adds_the_post_adjusted_cls_tokens():
    """tokens(r) − tokens(0) = r · W(S')·1·(c + c_R): the CLS of the last input and of the fused layers."""
    ctx = make_ctx()
    with torch.no_grad():
        base = build_head("scclip", {**PARAMS, "cls_residual": 0.0})(ctx).tokens
        out = build_head("scclip", {**PARAMS, "cls_residual": 0.7})(ctx)
    for b in range(2):
        post = naive_weights(naive_cos(ctx.layers[1 + PARAMS["post_adjust_layer"]][b, 1:]), 0.4)
        cls_sum = ctx.x[b, 0] + sum(ctx.layers[1 + i][b, 0] for i in range(1, 4))
        want = 0.7 * post.sum(dim=1, keepdim=True) * cls_sum
        torch.testing.assert_close(out.tokens[b] - base[b], want, rtol=1e-9, atol=1e-10)


def test_outlier_step_changes_the_result_and_no_outliers_is_contamination_zero():
    ctx = make_ctx()
    with torch.no_grad():
        on = build_head("scclip", PARAMS)(ctx).tokens
        off = build_head("scclip", {**PARAMS, "contamination": 0.0})(ctx).tokens
    assert not torch.allclose(on, off)
    p0 = {**PARAMS, "contamination": 0.0}
    torch.testing.assert_close(off[0], naive_scclip(ctx, 0, p0)["tokens"], rtol=1e-10, atol=1e-12)


def test_batched_windows_equal_one_by_one():
    ctx = make_ctx(batch=3)
    head = build_head("scclip", PARAMS)
    with torch.no_grad():
        together = head(ctx).tokens
        for b in range(3):
            torch.testing.assert_close(head(one(ctx, b)).tokens, together[b : b + 1], rtol=1e-10, atol=1e-12)


def test_duplicate_tokens_give_finite_tokens():
    """Every patch token equal (k-distance 0, NaN scores, S = 1): no replacement, nothing NaN."""
    ctx = make_ctx(batch=1)
    flat = tuple(torch.cat([t[:, :1], t[:, 1:2].expand(-1, t.shape[1] - 1, -1)], dim=1) for t in ctx.layers)
    ctx = HeadContext(x=flat[-1], grid=ctx.grid, block=ctx.block, layers=flat, blocks=ctx.blocks)
    with torch.no_grad():
        out = build_head("scclip", PARAMS)(ctx)
    assert torch.isfinite(out.tokens).all()


def test_shallow_clip_clamps_the_layer_numbers_with_a_warning(caplog):
    ctx = make_ctx(n_blocks=3)  # feature layers 0 and 1
    with caplog.at_level(logging.WARNING, logger="dapseg.heads.scclip"), torch.no_grad():
        got = build_head("scclip")(ctx).tokens  # the defaults: 8, 3, 3..9
    assert "clamped" in caplog.text
    clamped = {"pre_adjust_layer": 1, "post_adjust_layer": 1, "fusion_start": 1, "fusion_end": 2}
    with torch.no_grad():
        want = build_head("scclip", clamped)(ctx).tokens
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_needs_the_clip_layers_and_says_so():
    assert HEADS.get("scclip").needs_for({}) == {Need.CLIP_LAYERS}
    ctx = make_ctx()
    with pytest.raises(ValueError, match="CLIP_LAYERS"):
        build_head("scclip")(HeadContext(x=ctx.x, grid=ctx.grid, block=ctx.block))


@pytest.mark.parametrize("bad", [{"fusion_start": 5, "fusion_end": 5}, {"contamination": 0.6},
                                 {"outlier_score": "iforest"}, {"n_neighbors": 0}, {"pre_adjust_layer": -1}])
def test_params_are_validated(bad):
    with pytest.raises(ValidationError):
        build_head("scclip", bad)


# ----------------------------------------------------------------------------- presets, datasets, CLI


def test_presets_carry_the_official_constants():
    b16, l14 = load_preset("scclip"), load_preset("scclip-l14")
    assert b16.clip.model == "ViT-B-16" and l14.clip.model == "ViT-L-14"
    assert b16.head.params == {**ScclipHead.Params().model_dump(), "pre_adjust_layer": 8, "post_adjust_layer": 3,
                               "fusion_start": 3, "fusion_end": 10, "cls_residual": 0.3}
    assert l14.head.params == {**b16.head.params, "pre_adjust_layer": 16, "post_adjust_layer": 6,
                               "fusion_start": 8, "fusion_end": 19, "cls_residual": 0.1}
    for cfg in (b16, l14):
        assert (cfg.inference.mode, cfg.inference.crop, cfg.inference.stride) == ("slide", 224, 112)
        assert cfg.postprocess.logit_scale == 40 and cfg.refine.name == "none" and not cfg.plugins
    assert load_preset("scclip-fsa").plugin("fsa") is not None


@pytest.mark.parametrize(("dataset", "b16", "l14"), [
    ("voc21", {"postprocess.logit_scale": 50, "postprocess.prob_thd": 0.15}, {"postprocess.prob_thd": 0.2}),
    ("coco_object", {"postprocess.logit_scale": 55, "postprocess.prob_thd": 0.35}, {"postprocess.prob_thd": 0.25}),
    ("cityscapes", {"inference.short_side": 560}, {"inference.short_side": 560}),
    ("ade20k", {"inference.short_side": 336}, {"inference.short_side": 336}),
    ("context60", {"inference.short_side": 336, "postprocess.prob_thd": 0.15}, {"postprocess.prob_thd": 0.15}),
])
def test_dataset_settings_are_the_official_configs(dataset, b16, l14):
    spec = load_dataset_spec(dataset)
    for preset, want in (("scclip", b16), ("scclip-fsa", b16), ("scclip-l14", l14), ("scclip-l14-fsa", l14)):
        got = spec.overrides_for(preset)
        assert {k: got.get(k, 40.0 if k == "postprocess.logit_scale" else None) for k in want} == want
        assert got.get("postprocess.logit_scale", 40) == want.get("postprocess.logit_scale", 40)


@pytest.mark.parametrize("preset", ["scclip", "scclip-l14"])
def test_segment_runs_end_to_end_on_tiny_random_weights(preset, tmp_path, capsys):
    from dapseg.cli import main

    photo = tmp_path / "coffee.png"
    Image.fromarray(np.ascontiguousarray(data.coffee()[::4, ::4])).save(photo)  # (100, 150)
    rc = main(["segment", str(photo), "--classes", "cup, table, wall", "--preset", preset, "--random-weights",
               "--tiny", "--device", "cpu", "--set", "inference.short_side=112", "--out", str(tmp_path / "out")])
    assert rc == 0, capsys.readouterr().err
    with Image.open(tmp_path / "out" / "coffee_labels.png") as labels:
        assert labels.size == (150, 100) and np.asarray(labels).max() < 3
