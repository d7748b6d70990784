"""PEARL: the Procrustes attention head and the pearl_prop refiner, each step against a naive formula
written here (float64 NumPy loops, an SVD, a dense direct solve), batching, presets end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from PIL import Image
from skimage import data

from dapseg.heads.base import HeadContext, build_head
from dapseg.heads.pearl import polar_newton_schulz, polar_svd, procrustes_logits
from dapseg.refine import RefineInput, build_refiner
from dapseg.refine.pearl_prop import (
    PearlPropParams,
    conjugate_gradient,
    edge_weights,
    grey,
    laplacian,
    pooling_factors,
    propagate,
    text_weights,
)

D, N_HEADS = 32, 4

# ----------------------------------------------------------------------------- naive formulas


def naive_newton_schulz(m: np.ndarray, steps: int, eps: float = 1e-6) -> np.ndarray:
    """PEARL's coupled iteration for M (MᵀM)^(-1/2), one matrix, float64."""
    d = m.shape[0]
    a = m.T @ m
    norm = max(np.sqrt((a * a).sum()), eps)
    y, z = a / norm + eps * np.eye(d), np.eye(d)
    for _ in range(steps):
        t = 0.5 * (3 * np.eye(d) - z @ y)
        y, z = y @ t, t @ z
    return m @ (z / np.sqrt(norm))


def naive_svd_polar(m: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(m)
    return u @ vt


def naive_logits(q: np.ndarray, k: np.ndarray, kk: float, polar, exclude_cls: bool = True) -> np.ndarray:
    """One window and head: q, k (M, d) float64, token 0 = CLS, token by token."""
    m_tok, d = q.shape
    w = np.array([np.sqrt((q[i] ** 2).sum()) for i in range(m_tok)])
    if exclude_cls:
        w[0] = 0.0
    w = w / (w.sum() + 1e-6)
    q_mean = sum(w[i] * q[i] for i in range(m_tok))
    k_mean = sum(w[i] * k[i] for i in range(m_tok))
    cov = sum(np.outer(k[i] - k_mean, q[i] - q_mean) for i in range(m_tok))  # (d, d) = k_cᵀ q_c
    r = polar(cov)
    out = np.zeros((m_tok, m_tok))
    for i in range(m_tok):
        for j in range(m_tok):
            out[i, j] = q[i] @ (k[j] @ r) / np.sqrt(d) + kk * (k[i] - k_mean) @ (k[j] - k_mean) / np.sqrt(d)
    return out


def make_block(seed: int = 0) -> ResidualAttentionBlock:
    torch.manual_seed(seed)
    block = ResidualAttentionBlock(d_model=D, n_head=N_HEADS, batch_first=True).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return block.requires_grad_(False)


def make_ctx(grid: tuple[int, int], batch: int = 2, seed: int = 1) -> HeadContext:
    g = torch.Generator().manual_seed(seed)
    return HeadContext(x=torch.randn(batch, 1 + grid[0] * grid[1], D, generator=g), grid=grid, block=make_block())


def naive_qkv(block: ResidualAttentionBlock, x: torch.Tensor) -> tuple[np.ndarray, ...]:
    """q, k, v (B, heads, M, d) float64 from the raw in-projection weights."""
    h = F.layer_norm(x, (D,), block.ln_1.weight, block.ln_1.bias, block.ln_1.eps).detach().double()
    w, b = block.attn.in_proj_weight.detach().double(), block.attn.in_proj_bias.detach().double()
    out = []
    for i in range(3):
        t = h @ w[i * D : (i + 1) * D].T + b[i * D : (i + 1) * D]  # (B, M, D)
        out.append(t.reshape(*t.shape[:2], N_HEADS, D // N_HEADS).transpose(1, 2).numpy())
    return tuple(out)


# ----------------------------------------------------------------------------- the polar factor


def _conditioned(d: int, low: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.normal(size=(d, d)))
    v, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return u @ np.diag(np.linspace(low, 1.0, d)) @ v.T * 7.0


def test_newton_schulz_is_the_coupled_iteration_and_converges_to_the_svd_polar_factor() -> None:
    m = np.stack([_conditioned(8, 0.3, s) for s in range(3)])
    mt = torch.from_numpy(m)
    for steps in (1, 5):  # exactly PEARL's iteration, step for step
        np.testing.assert_allclose(polar_newton_schulz(mt, steps).numpy(),
                                   np.stack([naive_newton_schulz(x, steps) for x in m]), atol=1e-12)
    exact = np.stack([naive_svd_polar(x) for x in m])
    np.testing.assert_allclose(polar_svd(mt).numpy(), exact, atol=1e-10)
    # singular values in [0.3, 1]·σ_max: 5 steps are within 2e-2 of U Vᵀ, 10 steps within 1e-5 (the
    # +1e-6·I shift keeps it from reaching U Vᵀ exactly)
    assert 1e-3 < np.abs(polar_newton_schulz(mt, 5).numpy() - exact).max() < 2e-2
    np.testing.assert_allclose(polar_newton_schulz(mt, 10).numpy(), exact, atol=1e-5)
    r = polar_newton_schulz(mt, 10).numpy()
    np.testing.assert_allclose(r.transpose(0, 2, 1) @ r, np.broadcast_to(np.eye(8), r.shape), atol=5e-5)


def shifted_fixed_point(m: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """What the iteration converges to: M (A/‖A‖_F + eps·I)^(-1/2) / √‖A‖_F, A = MᵀM (eigendecomposition)."""
    a = m.T @ m
    norm = np.sqrt((a * a).sum())
    vals, vecs = np.linalg.eigh(a / norm + eps * np.eye(len(a)))
    return m @ (vecs @ np.diag(vals ** -0.5) @ vecs.T) / np.sqrt(norm)


def test_five_steps_are_not_orthogonal_on_an_ill_conditioned_matrix() -> None:
    """Why the reference's R is an approximation: singular values down to 1 % of the largest converge slowly."""
    m = _conditioned(8, 0.01, 0)
    r5 = polar_newton_schulz(torch.from_numpy(m), 5).numpy()
    assert np.abs(r5.T @ r5 - np.eye(8)).max() > 0.3
    np.testing.assert_allclose(polar_newton_schulz(torch.from_numpy(m), 40).numpy(), shifted_fixed_point(m),
                               atol=1e-8)
    assert np.abs(shifted_fixed_point(m) - naive_svd_polar(m)).max() < 1e-2  # the shift's own bias


# ----------------------------------------------------------------------------- the attention


@pytest.mark.parametrize("solver", ["polar", "svd"])
@pytest.mark.parametrize("kk", [0.08, 0.3, 0.0])
def test_logits_equal_a_token_by_token_loop(solver: str, kk: float) -> None:
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 7, 5, generator=g, dtype=torch.float64), torch.randn(2, 3, 7, 5, generator=g,
                                                                                    dtype=torch.float64)
    got = procrustes_logits(q, k, kk_weight=kk, polar_steps=5, solver=solver).numpy()
    polar = naive_svd_polar if solver == "svd" else (lambda m: naive_newton_schulz(m, 5))
    for b in range(2):
        for h in range(3):
            np.testing.assert_allclose(got[b, h], naive_logits(q[b, h].numpy(), k[b, h].numpy(), kk, polar),
                                       rtol=1e-9, atol=1e-9)


def test_cls_weight_only_when_asked() -> None:
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 1, 6, 4, generator=g, dtype=torch.float64), torch.randn(1, 1, 6, 4, generator=g,
                                                                                  dtype=torch.float64)
    polar = (lambda m: naive_newton_schulz(m, 5))
    for exclude in (True, False):
        got = procrustes_logits(q, k, kk_weight=0.08, polar_steps=5, exclude_cls=exclude)[0, 0].numpy()
        np.testing.assert_allclose(got, naive_logits(q[0, 0].numpy(), k[0, 0].numpy(), 0.08, polar, exclude),
                                   rtol=1e-9, atol=1e-9)
    assert not torch.allclose(procrustes_logits(q, k, kk_weight=0.08, polar_steps=5, exclude_cls=False),
                              procrustes_logits(q, k, kk_weight=0.08, polar_steps=5, exclude_cls=True))


@pytest.mark.parametrize("grid", [(3, 4), (1, 1), (2, 5)])
def test_head_is_the_reduced_block_over_the_procrustes_attention(grid: tuple[int, int]) -> None:
    ctx = make_ctx(grid)
    head = build_head("pearl", {"kk_weight": 0.3})
    out = head(ctx)
    q, k, v = naive_qkv(ctx.block, ctx.x)
    bsz, m_tok = ctx.x.shape[:2]
    expected = np.zeros((bsz, m_tok, D))
    for b in range(bsz):
        per_head = []
        for h in range(N_HEADS):
            logits = naive_logits(q[b, h], k[b, h], 0.3, lambda m: naive_newton_schulz(m, 5))
            attn = np.exp(logits - logits.max(1, keepdims=True))
            attn /= attn.sum(1, keepdims=True)
            per_head.append(attn @ v[b, h])
        expected[b] = np.concatenate(per_head, axis=1)  # heads merged: (M, D)
    w, bias = ctx.block.attn.out_proj.weight.double().numpy(), ctx.block.attn.out_proj.bias.double().numpy()
    expected = expected @ w.T + bias
    assert out.tokens.shape == (bsz, grid[0] * grid[1], D) and out.grid == grid
    np.testing.assert_allclose(out.tokens.numpy(), expected[:, 1:], atol=2e-5, rtol=1e-4)  # CLS dropped
    # per window: the batch changes nothing
    for b in range(bsz):
        one = HeadContext(x=ctx.x[b : b + 1], grid=grid, block=ctx.block)
        torch.testing.assert_close(head(one).tokens, out.tokens[b : b + 1], atol=1e-6, rtol=1e-6)


def test_head_params_are_validated() -> None:
    from dapseg.registry import HEADS

    for bad in ({"kk_weight": -0.1}, {"polar_steps": 0}, {"solver": "qr"}, {"alpha_kk": 0.3}):
        with pytest.raises(ValueError):
            HEADS.validate("pearl", bad)


# ----------------------------------------------------------------------------- the propagation


def naive_text_diag(text: np.ndarray, tau: float, boost: float) -> np.ndarray:
    t = text / np.linalg.norm(text, axis=1, keepdims=True)
    e = np.exp(t @ t.T / tau)
    s = e / e.sum(1, keepdims=True) + boost * np.eye(len(t))
    s = s / (s.sum(1, keepdims=True) + 1e-6)
    return np.diag(s).copy()  # the reference's einsum('cc,...') reads only the diagonal


def naive_edges(gry: np.ndarray, probs: np.ndarray, s: np.ndarray, k: float) -> dict:
    """{((y, x), (y', x')): w} for every right / down neighbour pair; gry (H, W), probs (Q, H, W)."""
    hh, ww = gry.shape
    gx = [abs(gry[y, x + 1] - gry[y, x]) for y in range(hh) for x in range(ww - 1)]
    gy = [abs(gry[y + 1, x] - gry[y, x]) for y in range(hh - 1) for x in range(ww)]
    mx, my = np.mean(gx) + 1e-6, np.mean(gy) + 1e-6
    edges = {}
    for y in range(hh):
        for x in range(ww):
            for (dy, dx), mean in (((0, 1), mx), ((1, 0), my)):
                y2, x2 = y + dy, x + dx
                if y2 >= hh or x2 >= ww:
                    continue
                g = abs(gry[y2, x2] - gry[y, x]) / mean
                agree = min(max(sum(probs[c, y2, x2] * s[c] * probs[c, y, x] for c in range(len(s))), 0), 1)
                edges[(y, x), (y2, x2)] = min(max(np.exp(-k * g) * (1 + agree), 0), 1)
    return edges


def naive_system(edges: dict, data: np.ndarray, smooth: float) -> np.ndarray:
    """Dense (HW, HW) matrix diag(data) + smooth·Λ."""
    ww = data.shape[1]
    a = np.diag(data.ravel()).astype(np.float64)
    for ((y, x), (y2, x2)), w in edges.items():
        i, j = y * ww + x, y2 * ww + x2
        a[i, i] += smooth * w
        a[j, j] += smooth * w
        a[i, j] -= smooth * w
        a[j, i] -= smooth * w
    return a


def _problem(q: int = 3, h: int = 6, w: int = 7, amp: float = 3.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(1, 3, h, w, generator=g, dtype=torch.float64)
    logits = amp * torch.randn(1, q, h, w, generator=g, dtype=torch.float64)
    text = torch.randn(q, 8, generator=g, dtype=torch.float64)
    return image, logits, text


def test_text_weights_are_the_diagonal_of_the_reference_matrix() -> None:
    _, _, text = _problem(q=5)
    np.testing.assert_allclose(text_weights(text, 0.5, 10.0).numpy(), naive_text_diag(text.numpy(), 0.5, 10.0),
                               rtol=1e-6)
    # what einsum('cc,bcij->bcij', S, p) computes, per torch's own einsum
    s, p = torch.rand(4, 4, dtype=torch.float64), torch.rand(2, 4, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(torch.einsum("cc,bcij->bcij", s, p), s.diagonal().view(1, 4, 1, 1) * p)


def test_edge_weights_equal_a_pixel_loop() -> None:
    image, logits, text = _problem()
    probs = logits.softmax(1)
    s = text_weights(text, 0.5, 10.0)
    w_h, w_v = edge_weights(grey(image), probs, s, 5.0)
    edges = naive_edges(grey(image)[0, 0].numpy(), probs[0].numpy(), s.numpy(), 5.0)
    for y in range(6):
        for x in range(6):
            assert w_h[0, 0, y, x].item() == pytest.approx(edges[(y, x), (y, x + 1)], rel=1e-9)
    for y in range(5):
        for x in range(7):
            assert w_v[0, 0, y, x].item() == pytest.approx(edges[(y, x), (y + 1, x)], rel=1e-9)
    assert w_h.min() >= 0 and w_h.max() <= 1


def test_laplacian_is_the_dense_graph_laplacian() -> None:
    image, logits, text = _problem()
    probs = logits.softmax(1)
    s = text_weights(text, 0.5, 10.0)
    w_h, w_v = edge_weights(grey(image), probs, s, 5.0)
    edges = naive_edges(grey(image)[0, 0].numpy(), probs[0].numpy(), s.numpy(), 5.0)
    lap = naive_system(edges, np.zeros((6, 7)), 1.0)
    got = laplacian(logits, w_h, w_v)[0].reshape(3, -1).numpy()
    np.testing.assert_allclose(got, logits[0].reshape(3, -1).numpy() @ lap.T, atol=1e-12)


def _dense_solution(image, logits, text, smooth=1.0):
    """The reference's linear system on the (unpooled) grid, solved directly per query."""
    probs = logits.softmax(1)[0].numpy()
    s = naive_text_diag(text.numpy(), 0.5, 10.0)
    conf = np.maximum(probs.max(0), 0.05) ** 2
    agree = np.clip((s[:, None, None] * probs * probs).sum(0), 0, 1)
    data_w = conf * (1 + agree)
    a = naive_system(naive_edges(grey(image)[0, 0].numpy(), probs, s, 5.0), data_w, smooth)
    b = (data_w[None] * logits[0].numpy()).reshape(len(s), -1)
    return np.stack([np.linalg.solve(a, b[c]) for c in range(len(s))]).reshape(logits.shape[1:]), a


def test_conjugate_gradient_reaches_the_direct_solve() -> None:
    """A 12×14 grid (no pooling), an edge down the middle, unconfident logits (as CLIP's cosines are)."""
    g = torch.Generator().manual_seed(0)
    step = (torch.arange(14) > 7).double().expand(12, 14)
    image = (2 * step + 0.05 * torch.randn(12, 14, generator=g, dtype=torch.float64)).expand(1, 3, 12, 14)
    logits = 0.05 * torch.randn(1, 5, 12, 14, generator=g, dtype=torch.float64)
    text = torch.randn(5, 8, generator=g, dtype=torch.float64)
    exact, a = _dense_solution(image, logits, text)
    err = {steps: np.abs(propagate(image, logits, text, PearlPropParams(steps=steps))[0].numpy() - exact).max()
           for steps in (5, 25, 60)}
    # κ(A) ≈ 80; the solution moves the logits by up to 0.15. Error after 5 / 25 / 60 steps:
    # 3e-2 / 2e-4 / 1e-6 (the reference's 1e-12 guards in the step sizes stop it near 1e-6)
    assert 30 < np.linalg.cond(a) < 300 and np.abs(exact - logits[0].numpy()).max() > 0.1
    assert err[5] > 1e-2 and err[25] < 1e-3 and err[60] < 1e-5


def test_conjugate_gradient_is_per_batch_item() -> None:
    g = torch.Generator().manual_seed(2)
    mats = [torch.randn(5, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    spd = torch.stack([m @ m.T + 5 * torch.eye(5, dtype=torch.float64) for m in mats])  # (2, 5, 5)
    b = torch.randn(2, 5, 1, generator=g, dtype=torch.float64)
    x = conjugate_gradient(lambda v: spd @ v, b, torch.zeros_like(b), 5)  # n steps solve an n×n SPD system
    torch.testing.assert_close(x, torch.linalg.solve(spd, b), atol=1e-9, rtol=1e-9)


def naive_propagate(image, logits, text, grid: int, steps: int) -> torch.Tensor:
    """Pool by reshaping, the dense system's CG in float64 NumPy (one system for every query), upsample."""
    _, q, hh, ww = logits.shape
    sh, sw = max(1, round(hh / grid)), max(1, round(ww / grid))
    hp, wp = hh // sh, ww // sw
    pool = (lambda t: t[..., : hp * sh, : wp * sw].reshape(*t.shape[:2], hp, sh, wp, sw).mean((3, 5)))
    img_s, log_s = pool(image.double()), pool(logits.double())
    probs = log_s.softmax(1)[0].numpy()
    s = naive_text_diag(text.double().numpy(), 0.5, 10.0)
    data_w = np.maximum(probs.max(0), 0.05) ** 2 * (1 + np.clip((s[:, None, None] * probs ** 2).sum(0), 0, 1))
    a = naive_system(naive_edges(grey(img_s)[0, 0].numpy(), probs, s, 5.0), data_w, 1.0)
    x = log_s[0].numpy().reshape(q, -1).copy()
    b = data_w.reshape(1, -1) * x
    r = b - x @ a.T
    p = r.copy()
    rs = (r * r).sum()
    for _ in range(steps):
        ap = p @ a.T
        alpha = rs / ((p * ap).sum() + 1e-12)
        x, r = x + alpha * p, r - alpha * ap
        rs_new = (r * r).sum()
        p, rs = r + rs_new / (rs + 1e-12) * p, rs_new
    out = torch.from_numpy(x.reshape(1, q, hp, wp))
    if sh > 1 or sw > 1:
        out = F.interpolate(out, size=(hh, ww), mode="bilinear", align_corners=False)
    return out


@pytest.mark.parametrize(("size", "grid"), [((21, 26), 5), ((6, 7), 80), ((17, 9), 4)])
def test_propagate_equals_the_naive_pipeline(size: tuple[int, int], grid: int) -> None:
    """Pooling (with a remainder dropped: 21 = 4·5 + 1), the text terms, CG steps, upsampling."""
    g = torch.Generator().manual_seed(3)
    image = torch.randn(1, 3, *size, generator=g)
    logits = 2 * torch.randn(1, 4, *size, generator=g)
    text = torch.randn(4, 8, generator=g)
    assert pooling_factors(*size, grid) == tuple(max(1, round(s / grid)) for s in size)
    got = propagate(image, logits, text, PearlPropParams(grid=grid, steps=25))
    torch.testing.assert_close(got.double(), naive_propagate(image, logits, text, grid, 25), atol=1e-4, rtol=1e-4)


def test_pooling_rounds_halves_to_even_as_python_does() -> None:
    assert pooling_factors(200, 120, 80) == (2, 2)  # 2.5 -> 2, 1.5 -> 2
    assert pooling_factors(40, 39, 80) == (1, 1)  # 0.5 -> 0 -> at least 1


def test_batched_images_equal_one_by_one() -> None:
    g = torch.Generator().manual_seed(4)
    image, logits = torch.randn(3, 3, 30, 40, generator=g), 3 * torch.randn(3, 5, 30, 40, generator=g)
    image[1] *= 10  # another gradient scale: each image's edges are normalised by its own mean
    text = torch.randn(5, 8, generator=g)
    p = PearlPropParams(grid=10)
    together = propagate(image, logits, text, p)
    for b in range(3):
        torch.testing.assert_close(together[b : b + 1], propagate(image[b : b + 1], logits[b : b + 1], text, p),
                                   atol=1e-5, rtol=1e-5)


def test_refiner_needs_the_text_and_validates_its_params() -> None:
    from dapseg.registry import REFINERS, Need

    assert Need.CLASS_TEXT in REFINERS.get("pearl_prop").needs_for({})
    refine = build_refiner("pearl_prop", {"grid": 8})
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    logits = torch.from_numpy(rng.normal(0, 0.05, (3, 20, 30))).float()
    with pytest.raises(ValueError, match="pearl_prop needs the query text"):
        refine(RefineInput(image, logits, [0, 1, 2], 40.0, 0.0))
    text = F.normalize(torch.randn(3, 8), dim=-1)
    out = refine(RefineInput(image, logits, [0, 1, 2], 40.0, 0.0, text=text))
    from dapseg.inference.preprocess import normalize, to_tensor01
    from dapseg.models.clip import OPENAI_MEAN, OPENAI_STD

    expected = propagate(normalize(to_tensor01(image)[None], OPENAI_MEAN, OPENAI_STD), logits[None], text,
                         PearlPropParams(grid=8))[0]
    torch.testing.assert_close(out.logits, expected)
    for bad in ({"grid": 0}, {"steps": 0}, {"text_temperature": 0}, {"edge_sharpness": -1}, {"tau": 1}):
        with pytest.raises(ValueError):
            REFINERS.validate("pearl_prop", bad)


# ----------------------------------------------------------------------------- presets end to end


def test_segmenter_hands_the_refiner_its_text_and_the_upsampled_logits() -> None:
    from dapseg.api import Segmenter
    from dapseg.inference.preprocess import normalize, to_tensor01
    from dapseg.models.clip import OPENAI_MEAN, OPENAI_STD
    from dapseg.text import ClassSet

    seg = Segmenter.from_preset("pearl", device="cpu", random_weights=True, tiny=True,
                                overrides={"inference.short_side": 112, "inference.crop": 96, "inference.stride": 64})
    img = np.ascontiguousarray(data.coffee()[::8, ::8])  # (50, 75)
    classes = ClassSet.coerce(["cup", "table; desk", "wall"])
    res = seg.predict(img, classes)
    full = F.interpolate(res.coarse_logits[None], size=img.shape[:2], mode="bilinear", align_corners=False)
    expected = propagate(normalize(to_tensor01(img)[None], OPENAI_MEAN, OPENAI_STD), full,
                         seg.text_embeddings(classes), PearlPropParams())[0]
    torch.testing.assert_close(res.logits, expected)
    assert not torch.allclose(res.logits, full[0])


def test_dataset_settings_are_the_official_configs() -> None:
    from dapseg.data.spec import load_dataset_spec

    def ov(ds: str, preset: str = "pearl") -> dict:
        return load_dataset_spec(ds).overrides_for(preset)

    assert ov("voc21")["inference.mode"] == "whole" and ov("voc21")["postprocess.prob_thd"] == 0.1
    assert ov("voc20")["inference.mode"] == "whole"
    assert ov("context60")["postprocess.prob_thd"] == 0.1 and ov("coco_object")["postprocess.prob_thd"] == 0.1
    for ds in ("context59", "coco_stuff171", "ade20k"):
        assert ov(ds)["inference.short_side"] == 336 and "inference.mode" not in ov(ds)
    assert ov("ade20k")["head.params.kk_weight"] == 0.3
    city = ov("cityscapes", "pearl-l14-fsa")
    assert city["inference.short_side"] == 560 and city["head.params.kk_weight"] == 0.3
    assert city["refine.params.grid"] == 224


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "chelsea.png"
    Image.fromarray(np.ascontiguousarray(data.chelsea()[::3, ::3])).save(path)  # (100, 151)
    return path


@pytest.mark.parametrize(("preset", "extra"), [
    ("pearl", []), ("pearl-l14", []), ("pearl-fsa", []), ("naclip", ["--set", "refine.name=pearl_prop"]),
])
def test_segment_runs_end_to_end(preset: str, extra: list[str], photo: Path, tmp_path: Path) -> None:
    from dapseg.cli import main

    out = tmp_path / "out"
    rc = main(["segment", str(photo), "--classes", "cat, wall; floor, sky", "--preset", preset, "--random-weights",
               "--tiny", "--out", str(out), "--workers", "0", "--set", "inference.short_side=112", *extra])
    assert rc == 0
    labels = np.asarray(Image.open(out / "chelsea_labels.png"))
    assert labels.shape == (100, 151) and labels.max() < 3


def test_bench_times_the_propagation_as_its_own_stage() -> None:
    from dapseg.bench.runner import BenchSettings, run_bench

    image = (np.random.default_rng(2).random((48, 80, 3)) * 255).astype(np.uint8)
    settings = BenchSettings(
        device="cpu", random_weights=True, tiny=True, warmup=0, repeats=1, compare_batching=False,
        count_flops=False, overrides={"inference.short_side": 64, "inference.crop": 64, "inference.stride": 32},
    )
    (row,) = run_bench(["pearl"], image, ["cat", "sky", "grass"], settings, probe_size=64)["presets"]
    assert row["stages_s"]["propagation"] > 0 and "refinement" in row["stages_s"]
    assert row["stage_paths_unresolved"] == []
