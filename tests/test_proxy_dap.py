"""The proxy and dap heads against naive formulas written out here (loops, explicit matrices).

Every case runs a tiny open_clip block (width 32, 4 heads) on random tokens with random "VFM"
features; the naive side recomputes LN_1, v, the bilinear resize, S, A, the masks, P and the matrix
products in float64 numpy, so it shares no code with the heads.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from open_clip.transformer import ResidualAttentionBlock
from pydantic import ValidationError
from skimage.segmentation import slic

from dapseg.config import HeadConfig, load_preset
from dapseg.heads.base import HeadContext, build_head
from dapseg.heads.dap import DapHead
from dapseg.heads.proxy import ProxyHead
from dapseg.heads.regions import kmeans_labels, pool_labels_to_grid, slic_labels
from dapseg.models.vfm import list_vfms
from dapseg.registry import HEADS as HEAD_REGISTRY
from dapseg.registry import Need

WIDTH, HEADS = 32, 4


# ----------------------------------------------------------------------------- fixtures


def tiny_block(seed: int = 0) -> ResidualAttentionBlock:
    torch.manual_seed(seed)
    block = ResidualAttentionBlock(d_model=WIDTH, n_head=HEADS).eval().requires_grad_(False)
    with torch.no_grad():  # non-trivial biases and LayerNorm affine
        block.attn.in_proj_bias.normal_()
        block.attn.out_proj.bias.normal_()
        block.ln_1.weight.uniform_(0.5, 1.5)
        block.ln_1.bias.normal_(0, 0.1)
    return block


def make_ctx(
    b: int = 2,
    grid: tuple[int, int] = (3, 5),
    vgrid: tuple[int, int] = (6, 10),
    channels: int = 8,
    feats: torch.Tensor | None = None,
    images: torch.Tensor | None = None,
    seed: int = 1,
) -> HeadContext:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 1 + grid[0] * grid[1], WIDTH, generator=g)
    if feats is None:
        feats = torch.randn(b, channels, *vgrid, generator=g)
    if images is None:
        images = torch.rand(b, 3, vgrid[0] * 4, vgrid[1] * 4, generator=g)
    return HeadContext(x=x, grid=grid, block=tiny_block(), vfm_feats=feats, images=images)


def run(head, ctx: HeadContext) -> torch.Tensor:
    with torch.no_grad():
        return head(ctx).tokens


# ----------------------------------------------------------------------------- naive formulas


def naive_layernorm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * weight + bias


def naive_bilinear(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """img (h, w, d) -> (out_h, out_w, d); half-pixel centres, edge clamped (align_corners=False)."""
    h, w, _ = img.shape

    def taps(o: int, n_in: int, n_out: int) -> tuple[int, int, float]:
        src = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(math.floor(src), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    out = np.zeros((out_h, out_w, img.shape[2]))
    for oy in range(out_h):
        y0, y1, ly = taps(oy, h, out_h)
        for ox in range(out_w):
            x0, x1, lx = taps(ox, w, out_w)
            out[oy, ox] = (
                (1 - ly) * (1 - lx) * img[y0, x0]
                + (1 - ly) * lx * img[y0, x1]
                + ly * (1 - lx) * img[y1, x0]
                + ly * lx * img[y1, x1]
            )
    return out


def naive_values(ctx: HeadContext, b: int, vgrid: tuple[int, int]) -> np.ndarray:
    """CLIP patch values of window b on the VFM grid, all heads concatenated: (N', D)."""
    blk = ctx.block
    x = ctx.x[b].double().numpy()
    h = naive_layernorm(x, blk.ln_1.weight.double().numpy(), blk.ln_1.bias.double().numpy(), blk.ln_1.eps)
    wv = blk.attn.in_proj_weight[2 * WIDTH :].double().numpy()
    bv = blk.attn.in_proj_bias[2 * WIDTH :].double().numpy()
    v = h[1:] @ wv.T + bv  # (N, D); the resize acts per channel, so heads need no splitting
    gh, gw = ctx.grid
    return naive_bilinear(v.reshape(gh, gw, WIDTH), *vgrid).reshape(-1, WIDTH)


def naive_out_proj(ctx: HeadContext, z: np.ndarray) -> np.ndarray:
    o = ctx.block.attn.out_proj
    return z @ o.weight.double().numpy().T + o.bias.double().numpy()


def naive_similarity(feats: np.ndarray) -> np.ndarray:
    """feats (C, h', w') -> S (N', N') with S_ij = cos(x_i, x_j), 0 for zero vectors."""
    x = feats.reshape(feats.shape[0], -1).T
    n = x.shape[0]
    s = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            ni, nj = np.linalg.norm(x[i]), np.linalg.norm(x[j])
            s[i, j] = 0.0 if ni == 0 or nj == 0 else float(x[i] @ x[j]) / (ni * nj)
    return s


def naive_attention(
    feats: np.ndarray,
    beta: float = 1.2,
    gamma: float = 3.0,
    normalize: bool = True,
    mask: bool = True,
    knn: int = 0,
) -> np.ndarray:
    """Row softmax of A over the kept entries, rows left empty keep their maxima: (N', N').

    Tie rule (k-NN and empty rows): an entry within 1e-5·(1 + |v|) of the k-th largest value v /
    the maximum v of its row counts as tied with it and is kept.
    """
    s = naive_similarity(feats)
    n = s.shape[0]
    mean = sum(s[i, j] for i in range(n) for j in range(n)) / (n * n)
    a = gamma * (s - beta * mean) if normalize else s
    k = min(knn, n)
    near = np.zeros((n, n), dtype=bool)
    for i in range(n):
        kth = sorted(s[i], reverse=True)[k - 1] if k else -np.inf
        near[i] = s[i] >= kth - 1e-5 * (1 + abs(kth))
    out = np.zeros((n, n))
    for i in range(n):
        kept = [j for j in range(n) if not mask or (a[i, j] >= 0 and (k == 0 or (near[i, j] and near[j, i])))]
        if not kept:
            top = a[i].max()
            kept = [j for j in range(n) if a[i, j] >= top - 1e-5 * (1 + abs(top))]
        e = np.array([math.exp(a[i, j] - max(a[i, kept])) for j in kept])
        out[i, kept] = e / e.sum()
    return out


def naive_region_matrix(labels: np.ndarray) -> np.ndarray:
    """P_ij = 1/|r(i)| where r(i) = r(j), else 0."""
    n = labels.size
    p = np.zeros((n, n))
    for i in range(n):
        members = [j for j in range(n) if labels[j] == labels[i]]
        for j in members:
            p[i, j] = 1.0 / len(members)
    return p


def naive_head(
    ctx: HeadContext,
    attn_of_window,
    steps: int = 1,
) -> np.ndarray:
    """out_proj(W^steps · v) per window, W from ``attn_of_window(b)``: (B, N', D)."""
    vgrid = tuple(ctx.vfm_feats.shape[-2:])
    outs = []
    for b in range(ctx.x.shape[0]):
        w = attn_of_window(b)
        z = np.linalg.matrix_power(w, steps) @ naive_values(ctx, b, vgrid)
        outs.append(naive_out_proj(ctx, z))
    return np.stack(outs)


def assert_matches(got: torch.Tensor, want: np.ndarray, atol: float = 2e-5) -> None:
    assert torch.isfinite(got).all()
    np.testing.assert_allclose(got.double().numpy(), want, atol=atol, rtol=1e-4)


def feats_np(ctx: HeadContext, b: int) -> np.ndarray:
    return ctx.vfm_feats[b].double().numpy()


# ----------------------------------------------------------------------------- proxy


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"beta": 0.5, "gamma": 5.0},
        {"normalize": False},
        {"mask": False},
        {"normalize": False, "mask": False},
    ],
)
def test_proxy_matches_naive_non_square(params):
    ctx = make_ctx(b=2, grid=(3, 5), vgrid=(6, 10))
    head = build_head("proxy", params)
    p = ProxyHead.Params(**params)
    want = naive_head(
        ctx,
        lambda b: naive_attention(feats_np(ctx, b), p.beta, p.gamma, p.normalize, p.mask),
    )
    with torch.no_grad():
        out = head(ctx)
    assert out.grid == (6, 10) and out.attention.grid == (6, 10) and not out.attention.has_cls
    assert_matches(out.tokens.detach(), want)


def test_proxy_same_grid_and_coarser_vfm_grid():
    for grid, vgrid in [((4, 4), (4, 4)), ((6, 4), (3, 2))]:
        ctx = make_ctx(b=1, grid=grid, vgrid=vgrid)
        want = naive_head(ctx, lambda b, c=ctx: naive_attention(feats_np(c, b)))
        assert_matches(run(ProxyHead(), ctx), want)


def test_proxy_vfm_attention_ablation():
    ctx = make_ctx(b=2, grid=(3, 5), vgrid=(4, 6))
    g = torch.Generator().manual_seed(5)
    # a softmax over CLS + patches with the CLS column dropped: rows sum to < 1
    full = torch.randn(2, 3, 25, 25, generator=g).softmax(-1)
    ctx.vfm_attn = full[:, :, 1:, 1:]
    head = ProxyHead(ProxyHead.Params(affinity="vfm_attention"))
    assert Need.VFM_ATTENTION in HEAD_REGISTRY.get("proxy").needs_for({"affinity": "vfm_attention"})
    assert Need.VFM_ATTENTION not in HEAD_REGISTRY.get("proxy").needs_for({})

    def attn(b):
        mean = sum(ctx.vfm_attn[b, h].double().numpy() for h in range(3)) / 3
        return mean / mean.sum(1, keepdims=True)

    assert_matches(run(head, ctx), naive_head(ctx, attn))
    ctx.vfm_attn = None
    with pytest.raises(ValueError, match="vfm_attn"):
        run(head, ctx)


def test_proxy_equals_reference_wherever_reference_is_finite():
    """The reference masks whole rows to −∞ (NaN after softmax) for zero-feature patches when
    mean(S) > 0; our rows must equal it everywhere else and be finite there."""
    ctx = make_ctx(b=1, grid=(3, 3), vgrid=(4, 4), channels=4)
    ctx.vfm_feats += 1.0  # mean(S) > 0, so zero-feature rows are all negative
    ctx.vfm_feats[0, :, 0, :2] = 0  # two patches with all-zero features
    feats = ctx.vfm_feats
    # the reference's formula, transcribed: global mean (batch 1), -inf where A < 0, softmax
    q = torch.nn.functional.normalize(feats.flatten(2), dim=1)
    sim = torch.einsum("bcm,bcn->bmn", q, q)
    sim = (sim - torch.mean(sim) * 1.2) * 3.0
    sim[sim < 0.0] = float("-inf")
    ref = sim.softmax(-1)
    ours = ProxyHead().attention(ctx).attn[:, 0]
    finite = torch.isfinite(ref).all(-1)
    assert (~finite).sum() == 2 and finite.sum() == 14
    torch.testing.assert_close(ours[finite], ref[finite])
    assert torch.isfinite(ours).all()
    # a zero patch is equally (dis)similar to all: it keeps all its (equal) maxima
    torch.testing.assert_close(ours[0, 0], torch.full((16,), 1 / 16))


# ----------------------------------------------------------------------------- batching


@pytest.mark.parametrize(
    "name, params",
    [
        ("proxy", {}),
        ("dap", {"knn": 5, "regions": "kmeans", "n_regions": 4, "steps": 2}),
        ("dap", {"knn": 3, "regions": "slic", "n_segments": 6, "rho": 0.7}),
    ],
)
def test_batched_windows_equal_one_at_a_time(name, params):
    ctx = make_ctx(b=3, grid=(3, 5), vgrid=(6, 10))
    # very different feature scales per window: a batch-wide mean would change the result
    ctx.vfm_feats[1] += 3.0
    head = build_head(name, params)
    batched = run(head, ctx)
    for b in range(3):
        one = HeadContext(
            x=ctx.x[b : b + 1],
            grid=ctx.grid,
            block=ctx.block,
            vfm_feats=ctx.vfm_feats[b : b + 1],
            images=ctx.images[b : b + 1],
        )
        torch.testing.assert_close(batched[b : b + 1], run(head, one), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- dap


def test_dap_minimal_equals_proxy():
    ctx = make_ctx(b=2, grid=(3, 5), vgrid=(6, 10))
    dap = build_head("dap", {"knn": 0, "regions": "none", "steps": 1})
    torch.testing.assert_close(run(dap, ctx), run(ProxyHead(), ctx), atol=1e-6, rtol=1e-6)


def test_dap_rho_zero_and_knn_clamped_equal_proxy():
    ctx = make_ctx(b=2, grid=(3, 5), vgrid=(6, 10))
    proxy = run(ProxyHead(), ctx)
    n = 60
    for params in (
        {"regions": "slic", "rho": 0.0},
        {"regions": "none", "knn": n},
        {"regions": "none", "knn": 10**6},
    ):
        torch.testing.assert_close(run(build_head("dap", params), ctx), proxy, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("knn", [1, 4, 17])
@pytest.mark.parametrize("steps", [1, 3])
def test_dap_knn_and_steps_match_naive(knn, steps):
    ctx = make_ctx(b=2, grid=(3, 5), vgrid=(6, 10))
    head = build_head("dap", {"knn": knn, "regions": "none", "steps": steps})
    want = naive_head(ctx, lambda b: naive_attention(feats_np(ctx, b), knn=knn), steps=steps)
    assert_matches(run(head, ctx), want, atol=5e-5)


def pixel_cells(b: int, vgrid: tuple[int, int], scale: int) -> torch.Tensor:
    """Pixel label map whose label is the VFM cell of the pixel: every patch its own region."""
    cells = torch.arange(vgrid[0] * vgrid[1]).view(vgrid)
    return cells.repeat_interleave(scale, 0).repeat_interleave(scale, 1).expand(b, -1, -1)


@pytest.mark.parametrize("case", ["random", "one_region", "own_region"])
@pytest.mark.parametrize("rho, steps, knn", [(0.5, 1, 0), (0.3, 2, 6), (1.0, 1, 0)])
def test_dap_regions_match_explicit_p(case, rho, steps, knn):
    vgrid = (6, 10)
    ctx = make_ctx(b=2, grid=(3, 5), vgrid=vgrid)  # images are 24 x 40: 4 px per VFM cell
    g = torch.Generator().manual_seed(3)
    if case == "random":
        # coarse random blocks (2 x 2 cells) so pooling is unambiguous, plus "no region" (-1) blocks
        blocks = torch.randint(-1, 4, (2, 3, 5), generator=g)
        pixels = blocks.repeat_interleave(8, 1).repeat_interleave(8, 2)
        grid_labels = blocks.repeat_interleave(2, 1).repeat_interleave(2, 2).flatten(1).numpy()
        # a -1 patch is a region of its own
        for b in range(2):
            for i in np.flatnonzero(grid_labels[b] < 0):
                grid_labels[b, i] = 1000 + i
    elif case == "one_region":
        pixels = torch.zeros(2, 24, 40, dtype=torch.int64)
        grid_labels = np.zeros((2, 60), dtype=np.int64)
    else:
        pixels = pixel_cells(2, vgrid, 4)
        grid_labels = np.tile(np.arange(60), (2, 1))
    calls = []

    def provider(images):
        calls.append(images.shape)
        return pixels

    head = DapHead(DapHead.Params(regions="sam", rho=rho, steps=steps, knn=knn), region_provider=provider)

    def attn(b):
        w = naive_attention(feats_np(ctx, b), knn=knn)
        return (1 - rho) * w + rho * naive_region_matrix(grid_labels[b]) @ w

    got = run(head, ctx)
    assert calls == [(2, 3, 24, 40)]
    assert_matches(got, naive_head(ctx, attn, steps=steps), atol=5e-5)
    if case == "own_region":  # P = I: no change
        plain = DapHead(DapHead.Params(regions="none", steps=steps, knn=knn))
        torch.testing.assert_close(got, run(plain, ctx), atol=1e-5, rtol=1e-5)


def naive_majority(labels: np.ndarray, gh: int, gw: int) -> np.ndarray:
    """Majority label of each cell (smallest label wins ties), -1 majority -> unique new label."""
    height, width = labels.shape
    out = np.zeros(gh * gw, dtype=np.int64)
    for cy in range(gh):
        for cx in range(gw):
            votes: dict[int, int] = {}
            for y in range(height):
                for x in range(width):
                    if y * gh // height == cy and x * gw // width == cx:
                        votes[int(labels[y, x])] = votes.get(int(labels[y, x]), 0) + 1
            best = min(votes, key=lambda lab: (-votes[lab], lab))
            out[cy * gw + cx] = best if best >= 0 else 10**6 + cy * gw + cx
    return out


def test_pool_labels_to_grid_matches_naive_majority():
    g = torch.Generator().manual_seed(7)
    labels = torch.randint(-1, 3, (2, 13, 17), generator=g)  # not a multiple of the grid
    pooled = pool_labels_to_grid(labels, (4, 5)).flatten(1).numpy()
    for b in range(2):
        want = naive_majority(labels[b].numpy(), 4, 5)
        # same partition: equal labels exactly where the naive labels are equal
        assert ((pooled[b][:, None] == pooled[b][None]) == (want[:, None] == want[None])).all()
        keep = want < 10**6
        np.testing.assert_array_equal(pooled[b][keep], want[keep])


@pytest.mark.parametrize("regions", ["slic", "slic_skimage"])
def test_dap_slic_regions_match_explicit_p(regions):
    """The head's P·W uses the SLIC map of each window: the torch SLIC (its quality against
    scikit-image's is tested in test_slic.py) or scikit-image's, called here directly."""
    vgrid = (6, 10)
    ctx = make_ctx(b=2, grid=(3, 5), vgrid=vgrid)
    params = {"regions": regions, "n_segments": 8, "compactness": 5.0, "rho": 0.6}
    head = build_head("dap", params)

    def attn(b):
        if regions == "slic":
            pix = slic_labels(ctx.images[b : b + 1], 8, 5.0)[0].numpy()
        else:
            img = ctx.images[b].permute(1, 2, 0).double().numpy()
            pix = slic(img, n_segments=8, compactness=5.0, start_label=0, channel_axis=-1)
        w = naive_attention(feats_np(ctx, b))
        return 0.4 * w + 0.6 * naive_region_matrix(naive_majority(pix, *vgrid)) @ w

    assert_matches(run(head, ctx), naive_head(ctx, attn))


def naive_kmeans(x: np.ndarray, k: int, iters: int) -> np.ndarray:
    n = x.shape[0]
    k = min(k, n)
    centres = [x[(c * n) // k].copy() for c in range(k)]
    for step in range(iters + 1):
        labels = np.array(
            [min(range(k), key=lambda c: (((x[i] - centres[c]) ** 2).sum(), c)) for i in range(n)]
        )
        if step == iters:
            return labels
        for c in range(k):
            members = x[labels == c]
            if len(members):
                centres[c] = members.mean(0)
    raise AssertionError("unreachable")


def test_kmeans_labels_match_naive_lloyd():
    g = torch.Generator().manual_seed(11)
    # well separated blobs so float rounding cannot flip an assignment
    centres = torch.randn(4, 6, generator=g) * 5
    x = centres[torch.randint(0, 4, (2, 40), generator=g)] + 0.1 * torch.randn(2, 40, 6, generator=g)
    got = kmeans_labels(x, 5, 4)
    for b in range(2):
        np.testing.assert_array_equal(got[b].numpy(), naive_kmeans(x[b].double().numpy(), 5, 4))
    assert kmeans_labels(x, 1000, 2).max() < 40  # clamped to N'


def test_dap_kmeans_regions_match_explicit_p():
    ctx = make_ctx(b=2, grid=(3, 5), vgrid=(6, 10))
    head = build_head("dap", {"regions": "kmeans", "n_regions": 5, "kmeans_iters": 3, "rho": 0.5})

    def attn(b):
        f = feats_np(ctx, b).reshape(8, -1).T
        xhat = f / np.linalg.norm(f, axis=1, keepdims=True)
        w = naive_attention(feats_np(ctx, b))
        return 0.5 * w + 0.5 * naive_region_matrix(naive_kmeans(xhat, 5, 3)) @ w

    assert_matches(run(head, ctx), naive_head(ctx, attn))


# ----------------------------------------------------------------------------- degenerate inputs


DEGENERATE_HEADS = [
    ("proxy", {}),
    ("proxy", {"normalize": False}),
    ("dap", {"regions": "none"}),
    ("dap", {"knn": 3, "regions": "kmeans", "steps": 2}),
    ("dap", {"knn": 2, "regions": "slic", "n_segments": 4}),
]


@pytest.mark.parametrize("kind", ["identical", "zero", "one_patch"])
@pytest.mark.parametrize("name, params", DEGENERATE_HEADS)
def test_degenerate_features_finite_and_naive(kind, name, params):
    if kind == "one_patch":
        ctx = make_ctx(b=2, grid=(1, 1), vgrid=(1, 1))
    else:
        ctx = make_ctx(b=2, grid=(3, 5), vgrid=(6, 10))
        if kind == "identical":
            ctx.vfm_feats = ctx.vfm_feats[:, :, :1, :1].expand_as(ctx.vfm_feats).clone()
        else:
            ctx.vfm_feats.zero_()
    head = build_head(name, params)
    got = run(head, ctx)
    assert torch.isfinite(got).all()
    attn = head.attention(ctx).attn
    assert torch.isfinite(attn).all()
    torch.testing.assert_close(attn.sum(-1), torch.ones_like(attn.sum(-1)))
    # identical / zero features / one patch: every affinity in a row is equal, so every kept set,
    # region average and k-NN set gives the uniform row; z is then the mean of v
    n = ctx.vfm_feats.shape[-2] * ctx.vfm_feats.shape[-1]
    steps = params.get("steps", 1)
    want = naive_head(ctx, lambda b: np.full((n, n), 1.0 / n), steps=steps)
    assert_matches(got, want)


def test_knn_ties_up_to_rounding_are_all_neighbours():
    """Identical features with float32-rounding noise: every patch ties at the k-th value, so
    mutual k-NN keeps every pair (no arbitrary tie-break), as the naive formula does."""
    from dapseg.heads.affinity import kth_largest, mutual_neighbours

    def mutual_knn(s: torch.Tensor, k: int) -> torch.Tensor:  # all rows of S at once
        kth = kth_largest(s, k)
        return mutual_neighbours(s, kth[..., :, None], kth[..., None, :])

    g = torch.Generator().manual_seed(4)
    s = 0.9 + 1e-7 * torch.randn(2, 6, 6, generator=g)
    assert mutual_knn(s, 2).all()
    s[:, :, 5] = 0.2  # a clearly smaller column is nobody's neighbour (except its own row's ties)
    near = mutual_knn(s, 2)
    assert not near[:, :5, 5].any() and near[:, :5, :5].all()


def test_rows_that_would_be_empty_keep_their_maxima():
    """Nearly parallel features: β·mean(S) > 1, every A < 0; each row keeps its diagonal."""
    ctx = make_ctx(b=1, grid=(2, 2), vgrid=(3, 3), channels=4)
    base = torch.tensor([1.0, 2.0, 3.0, 4.0])
    ctx.vfm_feats = base[None, :, None, None] + 0.1 * torch.randn(
        1, 4, 3, 3, generator=torch.Generator().manual_seed(2)
    )
    for head in (ProxyHead(), DapHead(DapHead.Params(regions="none", knn=2))):
        attn = head.attention(ctx).attn[0, 0]
        a = naive_attention(ctx.vfm_feats[0].double().numpy(), knn=getattr(head.params, "knn", 0))
        np.testing.assert_allclose(attn.double().numpy(), a, atol=1e-6)
        assert torch.isfinite(attn).all()


# ----------------------------------------------------------------------------- sam regions


def tiny_sam():
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    torch.manual_seed(0)
    dim, size = 32, 64
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=size, patch_size=16, embed_dim=dim, depth=1, num_heads=2, out_chans=dim
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(size // 16, size // 16),
            input_image_size=(size, size),
            mask_in_chans=4,
        ),
        mask_decoder=MaskDecoder(
            transformer_dim=dim,
            transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=64, num_heads=2),
            iou_head_depth=1,
            iou_head_hidden_dim=16,
        ),
    )
    return sam.eval()


def test_dap_sam_regions_run_with_random_sam():
    from dapseg.heads.regions import SamRegions

    ctx = make_ctx(b=1, grid=(3, 5), vgrid=(6, 10))
    provider = SamRegions(tiny_sam(), points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    labels = provider(ctx.images)
    assert labels.shape == (1, 24, 40) and labels.dtype == torch.int64 and labels.min() >= -1
    head = DapHead(
        DapHead.Params(
            regions="sam", sam_points_per_side=4, sam_pred_iou_thresh=0.0, sam_stability_thresh=0.0
        )
    )
    params = {"regions": "sam", "sam_points_per_side": 4, "sam_pred_iou_thresh": 0.0, "sam_stability_thresh": 0.0}
    assert {Need.SAM_DECODER, Need.WINDOW_PIXELS} <= HEAD_REGISTRY.get("dap").needs_for(params)
    assert Need.SAM_DECODER not in HEAD_REGISTRY.get("dap").needs_for({**params, "rho": 0.0})
    with pytest.raises(ValueError, match="SAM"):
        run(head, ctx)
    head = build_head("dap", params, sam_decoder=tiny_sam())  # the model it declared, handed over
    assert isinstance(head.region_provider, SamRegions)
    out = run(head, ctx)
    assert out.shape == (1, 60, WIDTH) and torch.isfinite(out).all()
    with pytest.raises(TypeError, match="Sam"):
        SamRegions(torch.nn.Linear(2, 2))


def test_dap_needs_images_for_slic():
    assert Need.WINDOW_PIXELS in HEAD_REGISTRY.get("dap").needs_for({"regions": "slic"})
    assert Need.WINDOW_PIXELS not in HEAD_REGISTRY.get("dap").needs_for({"regions": "kmeans"})
    ctx = make_ctx(b=1)
    ctx.images = None
    with pytest.raises(ValueError, match="images"):
        run(build_head("dap", {"regions": "slic"}), ctx)
    ctx.vfm_feats = None
    with pytest.raises(ValueError, match="vfm"):
        run(ProxyHead(), ctx)


# ----------------------------------------------------------------------------- config


def test_dap_params_validated_at_config_time():
    for bad in (
        {"rho": 1.5},
        {"rho": -0.1},
        {"steps": 0},
        {"knn": -1},
        {"n_regions": 0},
        {"regions": "felz"},
        {"rhoo": 0.5},
    ):
        with pytest.raises(ValidationError):
            HeadConfig(name="dap", params=bad)
    with pytest.raises(ValidationError):
        HeadConfig(name="proxy", params={"affinity": "q"})
    cfg = HeadConfig(name="dap", params={"rho": 0.25})
    assert cfg.params["rho"] == 0.25 and cfg.params["steps"] == 1 and cfg.params["regions"] == "slic"


def test_presets_validate_overrides():
    with pytest.raises(ValidationError):
        load_preset("dap", {"rho": 1.5})
    with pytest.raises(ValidationError):
        load_preset("dap", {"head.params.steps": 0})
    cfg = load_preset("dap", {"rho": 0.2, "knn": 8})
    assert cfg.head.params["rho"] == 0.2 and cfg.head.params["knn"] == 8




def test_presets():
    p = load_preset("proxyclip")
    assert (p.clip.model, p.clip.pretrained, p.vfm.name) == ("ViT-B-16", "openai", "dino_vitb8")
    assert (p.inference.mode, p.inference.crop, p.inference.stride) == ("slide", 336, 112)
    assert (p.inference.short_side, p.inference.pad_multiple, p.postprocess.logit_scale) == (336, 56, 40)
    assert p.head.name == "proxy" and p.head.params["beta"] == 1.2 and p.head.params["gamma"] == 3.0
    d = load_preset("dap")
    assert d.vfm.name == "dino_vitb8" and d.head.name == "dap"
    assert {k: d.head.params[k] for k in ("beta", "gamma", "knn", "regions", "rho", "steps")} == {
        "beta": 1.2,
        "gamma": 3.0,
        "knn": 0,
        "regions": "slic",
        "rho": 0.5,
        "steps": 1,
    }
    assert d.inference == p.inference
    for vfm in list_vfms():  # every registered VFM (tests/test_vfm.py pins the list itself)
        for method, head in (("proxyclip", "proxy"), ("dap", "dap")):
            c = load_preset(f"{method}-{vfm}")
            assert c.vfm.name == vfm and c.head.name == head and c.clip.model == "ViT-B-16"
    for method in ("proxyclip", "dap"):
        h = load_preset(f"{method}-h14")
        assert (h.clip.model, h.clip.pretrained, h.vfm.name) == (
            "ViT-H-14",
            "laion2b_s32b_b79k",
            "dino_vitb8",
        )
    assert load_preset("dap-fsa").plugin("fsa") is not None
