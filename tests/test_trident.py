"""Trident: SAM global affinity, chunked aggregation, splice, SAM prompt refinement.

Every expectation is computed here by a naive formula (python loops / the library's own dense
attention), never by the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor
from segment_anything.modeling.image_encoder import add_decomposed_rel_pos

from dapseg.inference.global_affinity import (
    AffinityParams,
    GlobalAffinity,
    SamLastAttention,
    affinity_rows,
    aggregate_map,
    valid_grid,
)
from dapseg.inference.splice import splice_features, splice_size
from dapseg.inference.strategies import get_strategy
from dapseg.models.sam import memory as sam_memory
from dapseg.models.sam.build import sam_variant, tiny_sam
from dapseg.models.sam.encoder import encode_image, preprocess
from dapseg.refine.sam_prompt import SamPromptRefiner, extract_prompts

# ----------------------------------------------------------------------------- naive formulas


def naive_affinity(w: torch.Tensor, v: torch.Tensor, p: AffinityParams) -> torch.Tensor:
    """Reference formula, element by element. w (heads, N, N) attention on valid tokens, v (heads, N, d).

    Rows the reference would turn into 0/0 are returned as NaN here (the caller checks them apart).
    """
    heads, n, _ = w.shape
    c = torch.zeros(heads, n, n, dtype=torch.float64)
    for h in range(heads):
        for i in range(n):
            for j in range(n):
                a, b = v[h, i].double(), v[h, j].double()
                na, nb = max(a.norm().item(), 1e-12), max(b.norm().item(), 1e-12)
                c[h, i, j] = (a @ b) / (na * nb)
    out = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        eps = p.cos_fac * c[:, i, :].mean().item()
        if not p.refine_neg_cos and eps < 0:
            eps = p.neg_thresh
        eps = min(eps, p.max_thresh)
        row = torch.zeros(n, dtype=torch.float64)
        for j in range(n):
            if p.kind == "attn":
                row[j] = w[:, i, j].double().mean()
            elif p.kind == "aff":
                row[j] = sum(float(w[h, i, j]) for h in range(heads) if c[h, i, j] > eps) / heads
            else:  # cos
                cm = c[:, i, j].mean().item()
                row[j] = math.exp(p.cos_scale * cm) if cm > eps else 0.0
        out[i] = row / row.sum()  # NaN when every entry is masked, as in the reference
    return out.float()


def random_last(heads=2, grid=(4, 5), d=6, rel=True, seed=0) -> SamLastAttention:
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    q, k, v = (torch.randn(heads, n, d, generator=g) for _ in range(3))
    rh = torch.randn(2 * grid[0] - 1, d, generator=g) * 0.5 if rel else None
    rw = torch.randn(2 * grid[1] - 1, d, generator=g) * 0.5 if rel else None
    return SamLastAttention(q=q, k=k, v=v, grid=grid, scale=d**-0.5, rel_pos_h=rh, rel_pos_w=rw)


def library_attention(last: SamLastAttention) -> torch.Tensor:
    """segment-anything's own dense attention formula for the same q, k: (heads, G, G)."""
    a = (last.q * last.scale) @ last.k.transpose(-2, -1)
    if last.rel_pos_h is not None:
        a = add_decomposed_rel_pos(a, last.q, last.rel_pos_h, last.rel_pos_w, last.grid, last.grid)
    return a.softmax(-1)


def valid_index(grid, valid):
    return torch.tensor([y * grid[1] + x for y in range(valid[0]) for x in range(valid[1])])


# ----------------------------------------------------------------------------- affinity kinds


@pytest.mark.parametrize("kind", ["aff", "attn", "cos"])
@pytest.mark.parametrize("refine_neg_cos", [True, False])
def test_affinity_kinds_match_naive(kind, refine_neg_cos):
    last = random_last()
    valid = (3, 4)  # non-square crop of a non-square grid
    p = AffinityParams(kind=kind, refine_neg_cos=refine_neg_cos, cos_fac=1.2, cos_scale=2.0)
    idx = valid_index(last.grid, valid)
    w = library_attention(last)[:, idx][:, :, idx]
    expected = naive_affinity(w, last.v[:, idx], p)
    got = GlobalAffinity(last, valid, p).dense()
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.sum(-1), torch.ones(len(idx)))


def test_negative_threshold_handling():
    # Anti-parallel value tokens: mean cosine is negative, so ε < 0 and refine_neg_cos decides.
    v = torch.tensor([[[1.0, 0.0], [-1.0, 0.0], [-1.0, 0.1]]])  # (1 head, 3 tokens, 2)
    w = torch.full((1, 3, 3), 1 / 3)
    c = torch.nn.functional.normalize(v, dim=-1) @ torch.nn.functional.normalize(v, dim=-1).transpose(-2, -1)
    for neg in (True, False):
        p = AffinityParams(kind="aff", refine_neg_cos=neg)
        got = affinity_rows(w, c, p)
        torch.testing.assert_close(got, naive_affinity(w, v, p))
    # Row 0 with refine_neg_cos=False: ε = 0.6 keeps only itself.
    got = affinity_rows(w, c, AffinityParams(kind="aff", refine_neg_cos=False))
    torch.testing.assert_close(got[0], torch.tensor([1.0, 0.0, 0.0]))


def test_all_masked_row_is_finite_and_others_unchanged():
    last = random_last(seed=3)
    last.v[:, 5] = 0.0  # a zero value vector: cosine 0 everywhere, ε = 0, every entry masked
    valid = last.grid
    for kind in ("aff", "cos"):
        p = AffinityParams(kind=kind)
        got = GlobalAffinity(last, valid, p).dense()
        assert torch.isfinite(got).all()
        expected = naive_affinity(library_attention(last), last.v, p)
        assert torch.isnan(expected[5]).all()  # what the reference formula gives
        ok = torch.isfinite(expected).all(-1)
        torch.testing.assert_close(got[ok], expected[ok], atol=1e-5, rtol=1e-5)
        # The empty row keeps its largest unmasked weight(s) (attention / mean cosine), ties shared.
        fallback = library_attention(last).mean(0)[5] if kind == "aff" else torch.zeros(got.shape[1])
        top = fallback >= fallback.max() - 1e-5 * (1 + fallback.max().abs())  # the tie rule
        torch.testing.assert_close(got[5], top.float() / top.sum())


# ----------------------------------------------------------------------------- aggregation


@pytest.mark.parametrize("kind", ["aff", "attn", "cos"])
def test_chunked_aggregation_equals_unchunked_and_naive(kind):
    last = random_last(heads=3, grid=(6, 7), d=5, seed=1)
    valid = (5, 7)
    aff = GlobalAffinity(last, valid, AffinityParams(kind=kind))
    f = torch.randn(aff.n, 9, generator=torch.Generator().manual_seed(2))
    idx = valid_index(last.grid, valid)
    w = library_attention(last)[:, idx][:, :, idx]
    naive = naive_affinity(w, last.v[:, idx], AffinityParams(kind=kind)) @ f
    full = aff.aggregate(f, chunk=aff.n)
    torch.testing.assert_close(full, naive, atol=1e-5, rtol=1e-5)
    for chunk in (1, 4, 13):
        torch.testing.assert_close(aff.aggregate(f, chunk=chunk), full, atol=1e-6, rtol=1e-6)


def test_aggregate_map_resizes_to_valid_grid():
    last = random_last(grid=(4, 6), seed=4)
    aff = GlobalAffinity(last, (2, 5), AffinityParams())
    feats = torch.randn(3, 7, 11)
    out = aggregate_map(feats, aff)
    f = torch.nn.functional.interpolate(feats[None], (2, 5), mode="bilinear", align_corners=False)[0]
    expected = (aff.dense() @ f.reshape(3, -1).T).T.reshape(3, 2, 5)
    torch.testing.assert_close(out, expected)


def test_valid_grid_floors_like_reference():
    assert valid_grid((1024, 512)) == (64, 32)
    assert valid_grid((683, 1024)) == (42, 64)
    assert valid_grid((5, 1024)) == (1, 64)


# ----------------------------------------------------------------------------- SAM encoder


def test_chunked_encoder_matches_library_non_square():
    torch.manual_seed(0)
    sam = tiny_sam()
    for prm in sam.image_encoder.blocks[-1].attn.parameters():
        torch.nn.init.normal_(prm, std=0.3)  # non-zero relative positions
    image = torch.rand(3, 50, 90)
    enc = encode_image(sam, image, chunk=7)
    x, size = preprocess(sam.image_encoder, image)
    with torch.no_grad():
        expected = sam.image_encoder(x)
    assert size == (71, 128) and enc.input_size == size and enc.original_size == (50, 90)
    torch.testing.assert_close(enc.features, expected, atol=1e-5, rtol=1e-4)
    rows = torch.arange(enc.last.q.shape[1])
    got = enc.last.attention_rows(rows)
    torch.testing.assert_close(got, library_attention(enc.last), atol=1e-6, rtol=1e-5)


def test_vit_h_memory_check_fails_up_front(monkeypatch):
    monkeypatch.setattr(sam_memory, "available_bytes", lambda device: 2 * 2**30)
    with pytest.raises(MemoryError, match=r"sam_vith.*GiB"):
        sam_memory.check_memory("sam_vith", "cpu")
    sam_memory.check_memory("sam_vitb", "cpu")  # ~0.9 GiB fits in 2 GiB
    assert sam_memory.estimate_sam_bytes("sam_vith") > 2.5 * 2**30 > sam_memory.estimate_sam_bytes("sam_vitb")
    # With SAM loaded, the refiner checks before its first image.
    monkeypatch.setattr(sam_memory, "available_bytes", lambda device: 1024)
    from dapseg.refine import build_refiner

    with pytest.raises(MemoryError, match="GiB"):
        build_refiner("sam", {}, sam_decoder=tiny_sam())
    with pytest.raises(ValueError, match="sam_vitb"):
        sam_variant("sam_vitx")
    assert sam_variant("sam_vit_h") == sam_variant("sam_vith") == "vit_h"


# ----------------------------------------------------------------------------- splice


def test_splice_recovers_position_function_with_overlaps():
    # A "head" whose features are a known function of the absolute cell position.
    H, W, cell, crop, stride = 80, 112, 16, 48, 32
    gh, gw = H // cell, W // cell
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    truth = torch.stack([ys, xs]).float()
    feats, boxes = [], []
    for y in [*range(0, H - crop + 1, stride), H - crop]:
        for x in [*range(0, W - crop + 1, stride), W - crop]:
            feats.append(truth[:, y // cell:(y + crop) // cell, x // cell:(x + crop) // cell] + 0.0)
            boxes.append((y, x, y + crop, x + crop))
    out = splice_features(feats, boxes, (H, W), cell)
    torch.testing.assert_close(out, truth)


def test_splice_averages_overlaps_and_handles_small_image():
    a, b = torch.ones(1, 2, 3), 3 * torch.ones(1, 2, 3)
    out = splice_features([a, b], [(0, 0, 32, 48), (0, 16, 32, 64)], (32, 64), 16)
    torch.testing.assert_close(out[0], torch.tensor([[1.0, 2.0, 2.0, 3.0]] * 2))
    # An image smaller than one window: a single window (its grid padded beyond the image) is resized.
    small = torch.randn(4, 3, 3)
    out = splice_features([small], [(0, 0, 30, 20)], (30, 20), 16)
    assert out.shape == (4, 2, 2) and torch.isfinite(out).all()


# ----------------------------------------------------------------------------- prompts


def test_prompts_from_hand_made_masks():
    h, w = 40, 50
    labels = torch.zeros(h, w, dtype=torch.long)
    probs = torch.zeros(4, h, w)
    probs[0] = 0.9
    labels[2:8, 3:10] = 1  # blob A of class 1: 42 px
    labels[20:30, 30:45] = 1  # blob B of class 1: 150 px
    labels[35:38, 2:5] = 2  # class 2: 9 px, under the minimal area
    # class 3: never predicted (empty class)
    for c in (1, 2):
        probs[0][labels == c] = 0.1
        probs[c][labels == c] = 0.6
    probs[1, 5, 7] = 0.95  # most confident pixel of blob A
    probs[1, 25, 40] = 0.8  # ... of blob B
    probs[0, 0, 0] = 0.1  # a background pixel below the coarse threshold: no class
    prompts = extract_prompts(labels, probs, coarse_thresh=0.2, minimal_area=10, alpha=0.005)
    by_cls = {p.cls: p for p in prompts}
    assert sorted(by_cls) == [0, 1]  # class 2 too small, class 3 empty
    p1 = by_cls[1]
    assert p1.regions.shape == (2, h, w)
    # Regions in raster order of their first pixel: A then B.
    assert p1.regions[0].sum() == 42 and p1.regions[1].sum() == 150
    torch.testing.assert_close(p1.points, torch.tensor([[7.0, 5.0], [40.0, 25.0]]))
    torch.testing.assert_close(p1.boxes, torch.tensor([[3.0, 2.0, 9.0, 7.0], [30.0, 20.0, 44.0, 29.0]]))
    expected_mask = torch.where(probs[1] > 0.2, 0.005 * probs[1], torch.zeros(h, w))
    torch.testing.assert_close(p1.mask, expected_mask)
    # Background is one region of everything else, minus the pixel below the threshold.
    assert by_cls[0].regions.shape[0] == 1 and not by_cls[0].regions[0, 0, 0]
    # A class whose probability never reaches the coarse threshold is skipped entirely.
    weak = probs.clone()
    weak[1] = weak[1].clamp(max=0.15)
    weak_prompts = extract_prompts(labels, weak, coarse_thresh=0.2, minimal_area=10, alpha=0.005)
    assert 1 not in {p.cls for p in weak_prompts}


def test_two_blobs_touching_diagonally_are_one_region():
    labels = torch.zeros(6, 6, dtype=torch.long)
    labels[0:2, 0:2] = 1
    labels[2:4, 2:4] = 1  # touches the first blob at a corner: 8-connected
    probs = torch.stack([(labels == 0).float(), (labels == 1).float()])
    prompts = extract_prompts(labels, probs, coarse_thresh=0.0, minimal_area=0, alpha=1.0)
    assert [p.regions.shape[0] for p in prompts] == [1, 1]


# ----------------------------------------------------------------------------- refinement


def _coarse(h=64, w=96):
    labels = torch.zeros(h, w, dtype=torch.long)
    labels[8:30, 10:40] = 1
    labels[36:60, 50:90] = 1
    labels[40:52, 4:20] = 2
    g = torch.Generator().manual_seed(0)
    probs = (torch.nn.functional.one_hot(labels, 3).permute(2, 0, 1).float() * 3
             + torch.rand(3, h, w, generator=g)).softmax(0)
    return labels, probs


def test_refinement_end_to_end_matches_per_region_predictor():
    torch.manual_seed(0)
    sam = tiny_sam()
    labels, probs = _coarse()
    image = torch.rand(3, *labels.shape)
    params = dict(coarse_thresh=0.2, minimal_area=20, alpha=0.005, iou_thresh=-1e9, down_ratio=2)
    new_labels, new_probs = SamPromptRefiner(sam, params)(image, labels, probs)
    assert new_labels.shape == labels.shape and new_probs.shape == probs.shape
    assert torch.isfinite(new_probs).all()

    # Naive: the library's numpy predictor, one region at a time, on the same encoding.
    pred = SamPredictor(sam)
    from dapseg.refine.sam_prompt import set_encoding

    set_encoding(pred, encode_image(sam, image))
    h, w = labels.shape
    dh, dw = h // 2, w // 2
    ld = torch.nn.functional.interpolate(labels[None, None].float(), (dh, dw), mode="nearest")[0, 0].long()
    pd = torch.nn.functional.interpolate(probs[None], (dh, dw), mode="bilinear", align_corners=False)[0]
    refined = torch.zeros_like(probs)
    for cp in extract_prompts(ld, pd, coarse_thresh=0.2, minimal_area=20, alpha=0.005):
        frame = sam.prompt_encoder.mask_input_size[0]
        nh, nw = pred.transform.get_preprocess_shape(dh, dw, frame)
        m = torch.nn.functional.interpolate(cp.mask[None, None], (nh, nw), mode="bilinear",
                                            align_corners=False)
        m = torch.nn.functional.pad(m, (0, frame - nw, 0, frame - nh))[0].numpy()
        scores, union = [], []
        for r in range(cp.points.shape[0]):
            # numpy predict maps coordinates from the original image size: scale ours (down-sampled) first.
            sx, sy = w / dw, h / dh
            pt = (cp.points[r].numpy() * [sx, sy])[None]
            box = cp.boxes[r].numpy() * [sx, sy, sx, sy]
            lg, _, _ = pred.predict(pt, np.ones(1), box=box, mask_input=m, multimask_output=False,
                                    return_logits=True)
            lg = torch.from_numpy(lg[0])
            scores.append(torch.sigmoid(lg) * probs[cp.cls])
            union.append(lg > 0)
        refined[cp.cls] = torch.stack(scores).amax(0) * torch.stack(union).any(0)
    any_ref = refined.sum(0) > 0
    assert any_ref.any() and not any_ref.all()  # something was refined, not everything
    torch.testing.assert_close(new_labels, torch.where(any_ref, refined.argmax(0), labels))
    torch.testing.assert_close(new_probs, torch.where(any_ref[None], refined, probs), atol=1e-4, rtol=1e-4)


def test_refinement_with_every_mask_rejected_keeps_coarse():
    torch.manual_seed(0)
    sam = tiny_sam()
    labels, probs = _coarse()
    new_labels, new_probs = SamPromptRefiner(sam, dict(iou_thresh=1e9, minimal_area=20))(
        torch.rand(3, *labels.shape), labels, probs
    )
    assert torch.equal(new_labels, labels)
    torch.testing.assert_close(new_probs, probs)


def test_refiner_rejects_no_prompts():
    with pytest.raises(ValueError, match="at least one"):
        SamPromptRefiner(tiny_sam(), dict(points=False, boxes=False, masks=False))


def test_refiner_registered_returns_probs_and_labels():
    from dapseg.refine import RefineInput, build_refiner

    torch.manual_seed(0)
    sam = tiny_sam()
    refine = build_refiner("sam", {"minimal_area": 20, "iou_thresh": -1e9}, sam_decoder=sam)
    labels, probs = _coarse()
    q2c = [0, 1, 1, 2]  # class 1 has two synonyms
    logits = torch.log(torch.stack([probs[0], probs[1], probs[1] * 0.5, probs[2]])) / 40.0
    image = (torch.rand(*labels.shape, 3) * 255).byte().numpy()
    inp = RefineInput(image, logits, q2c, logit_scale=40.0, prob_thd=0.0)
    out = refine(inp)
    assert out.logits is None  # SAM decides labels and probabilities, never logits
    assert out.probs.shape == (3, *labels.shape) and out.labels.shape == labels.shape
    torch.testing.assert_close(out.probs.sum(0), torch.ones(labels.shape))
    # the same as the refiner class on the image as loaded, the coarse probabilities and labels,
    # renormalised per pixel
    torch.manual_seed(0)
    want_labels, want_probs = SamPromptRefiner(sam, {"minimal_area": 20, "iou_thresh": -1e9}, 16)(
        image, inp.labels, inp.probs)
    assert torch.equal(out.labels, want_labels)
    torch.testing.assert_close(out.probs, want_probs / want_probs.sum(0))


# ----------------------------------------------------------------------------- splice strategy


@pytest.fixture(scope="module")
def tiny_clip():
    from dapseg.config import ClipConfig
    from dapseg.models.clip import build_clip

    torch.manual_seed(0)
    return build_clip(ClipConfig(), random_weights=True, tiny=True)


def make_engine(clip, head="maskclip", sam=None):
    from dapseg.heads.base import build_head
    from dapseg.inference.engine import DenseEngine

    engine = DenseEngine(clip, build_head(head))
    engine.sam_for_tests = sam  # handed to the strategy by ``run_strategy``, as the segmenter does
    return engine


def run_strategy(name, engine, image, text, cfg):
    """Build strategy ``name`` as the segmenter does (params validated once, SAM handed over), run it."""
    params = cfg.params if name == cfg.mode else {}  # the config's params are the splice strategy's
    return get_strategy(name, params, sam_encoder=engine.sam_for_tests)(engine, image, text, cfg)


def splice_cfg(**kw):
    from dapseg.config import InferenceConfig

    params = kw.pop("params", {})
    return InferenceConfig(mode="splice", short_side=None, **{"crop": 48, "stride": 32, "max_batch": 4, **kw},
                           params=params)


def naive_splice_tokens(engine, image, crop, stride, text):
    """Window head tokens averaged cell by cell with python loops: (D, H/16, W/16)."""
    from dapseg.inference.windows import window_grid

    _, H, W = image.shape
    sums, counts = {}, {}
    for win in window_grid(H, W, crop, stride):
        out = engine.head_output(image[None, :, win.y1:win.y2, win.x1:win.x2], text)
        gh, gw = out.grid
        for r in range(gh):
            for c in range(gw):
                key = (win.y1 // 16 + r, win.x1 // 16 + c)
                sums[key] = sums.get(key, 0) + out.tokens[0, r * gw + c]
                counts[key] = counts.get(key, 0) + 1
    d = next(iter(sums.values())).shape[0]
    out = torch.zeros(d, H // 16, W // 16)
    for (r, c), v in sums.items():
        out[:, r, c] = v / counts[(r, c)]
    return out


def classify(engine, tokens_map, text, size):
    d, h, w = tokens_map.shape
    emb = engine.clip.head_tokens_to_embeddings(tokens_map.reshape(d, -1).T[None])[0]
    emb = torch.nn.functional.normalize(emb, dim=-1)
    logits = (emb @ text.T).T.reshape(-1, h, w)
    return torch.nn.functional.interpolate(logits[None], size, mode="bilinear", align_corners=False)[0]


def random_text(clip, q=3):
    t = torch.randn(q, clip.visual.proj.shape[1], generator=torch.Generator().manual_seed(7))
    return torch.nn.functional.normalize(t, dim=-1)


@pytest.mark.parametrize("head", ["maskclip", "naclip", "sclip", "vanilla"])
def test_splice_without_affinity_equals_naive_average(tiny_clip, head):
    engine = make_engine(tiny_clip, head)
    text = random_text(tiny_clip)
    image = torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(1))
    got = run_strategy("splice", engine, image, text, splice_cfg(params={"kind": "none"}))
    expected = classify(engine, naive_splice_tokens(engine, image, 48, 32, text), text, (64, 96))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_splice_one_window_without_affinity_equals_whole(tiny_clip):
    engine = make_engine(tiny_clip)
    text = random_text(tiny_clip)
    image = torch.rand(3, 48, 80)
    cfg = splice_cfg(crop=224, stride=112, params={"kind": "none"})
    torch.testing.assert_close(run_strategy("splice", engine, image, text, cfg),
                               run_strategy("whole", engine, image, text, cfg), atol=1e-5, rtol=1e-5)


def test_splice_with_sam_affinity_equals_manual_composition(tiny_clip):
    torch.manual_seed(0)
    sam = tiny_sam()
    engine = make_engine(tiny_clip, "naclip", sam)
    text = random_text(tiny_clip)
    image = torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(2))
    p = AffinityParams(kind="aff")
    # sam_input=processed: SAM encodes the working image tensor (the original-image path is tested
    # in test_trident_fidelity.py).
    cfg = splice_cfg(params={"kind": "aff", "chunk": 5, "sam_input": "processed"})
    got = run_strategy("splice", engine, image, text, cfg)
    spliced = naive_splice_tokens(engine, image, 48, 32, text)
    enc = encode_image(sam, image)
    vh, vw = enc.input_size[0] // 16, enc.input_size[1] // 16
    idx = valid_index(enc.last.grid, (vh, vw))
    a = naive_affinity(library_attention(enc.last)[:, idx][:, :, idx], enc.last.v[:, idx], p)
    f = torch.nn.functional.interpolate(spliced[None], (vh, vw), mode="bilinear", align_corners=False)[0]
    agg = (a @ f.reshape(f.shape[0], -1).T).T.reshape(-1, vh, vw)
    torch.testing.assert_close(got, classify(engine, agg, text, (64, 96)), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("size", [(40, 70), (30, 200)])
def test_splice_small_and_non_square_images(tiny_clip, size):
    torch.manual_seed(0)
    engine = make_engine(tiny_clip, "maskclip", tiny_sam())
    text = random_text(tiny_clip)
    image = torch.rand(3, *size)
    for params in ({"kind": "aff"}, {"kind": "cos", "sam_splits": 2}, {"kind": "attn"}):
        out = run_strategy("splice", engine, image, text, splice_cfg(crop=224, stride=112, params=params))
        assert out.shape == (3, *size) and torch.isfinite(out).all()


def test_splice_size_follows_reference_rule():
    # long side 597 -> 608; short side 448 · 608 / 597 = 456.25 -> 456 -> up to 464
    assert splice_size(448, 597, 16, 336) == (464, 608)
    assert splice_size(224, 224, 16, 336) == (224, 224)  # multiples of 16: kept, one smaller window
    assert splice_size(100, 90, 16, 336) == (336, 336)  # raised to at least one window


def test_splice_without_sam_names_the_fix(tiny_clip):
    engine = make_engine(tiny_clip)
    with pytest.raises(ValueError, match="sam_vitb"):
        run_strategy("splice", engine, torch.rand(3, 48, 48), random_text(tiny_clip), splice_cfg())


# ----------------------------------------------------------------------------- presets end to end


@pytest.mark.parametrize("preset", ["trident-refine", "dap-splice"])  # trident-refine runs trident first
def test_presets_run_on_a_photo_with_random_weights(preset):
    from skimage import data

    from dapseg.api import Segmenter

    image = data.astronaut()[::4, ::3]  # (128, 171): non-square
    seg = Segmenter.from_preset(preset, random_weights=True, tiny=True, device="cpu",
                                overrides={"inference.short_side": 96})
    res = seg.predict(image, "person, sky; clouds, rocket")
    assert res.labels.shape == image.shape[:2] and res.probs.shape == (3, *image.shape[:2])
    assert torch.isfinite(res.probs).all() and int(res.labels.max()) < 3
    assert float(res.probs.min()) >= 0 and float(res.probs.max()) <= 1
    torch.testing.assert_close(res.labels, res.probs.argmax(0))  # prob_thd 0: labels follow the probs


def test_trident_h14_preset_config():
    from dapseg.config import load_preset

    cfg = load_preset("trident-h14")
    assert (cfg.clip.model, cfg.sam.name, cfg.inference.mode) == ("ViT-H-14", "sam_vith", "splice")
    assert (cfg.inference.crop, cfg.inference.stride) == (336, 224)


def test_splice_params_are_validated_when_the_config_loads():
    from pydantic import ValidationError

    from dapseg.config import load_preset

    assert load_preset("trident").inference.params["kind"] == "aff"  # defaults filled in at load
    with pytest.raises(ValidationError, match="kind"):
        load_preset("trident", {"inference.params.kind": "nope"})
    with pytest.raises(ValidationError, match="takes no params"):
        load_preset("naclip", {"inference.params": {"kind": "aff"}})
    switched = load_preset("trident", {"inference.mode": "slide", "inference.params": {}})
    assert switched.inference.mode == "slide"
