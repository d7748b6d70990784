"""Trident fidelity: where the proxy affinity's mean is taken, what SAM sees, refinement on CPU.

Expectations come from naive formulas written here (python loops, cv2 / PIL called directly),
never from the code under test.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything.modeling import ImageEncoderViT

from dapseg.api import Segmenter
from dapseg.config import load_preset
from dapseg.heads.affinity import image_similarity_mean
from dapseg.heads.base import build_head
from dapseg.inference import splice as splice_module
from dapseg.inference.global_affinity import valid_grid
from dapseg.inference.preprocess import resize_image, short_side_size
from dapseg.inference.splice import SpliceParams, sam_image, splice_size
from dapseg.inference.strategies import get_strategy
from dapseg.models.sam.build import SAM_PIXEL_MEAN, SAM_PIXEL_STD, tiny_sam
from dapseg.models.sam.encoder import library_preprocess, reference_sam_image
from test_proxy_dap import assert_matches, feats_np, make_ctx, naive_head, naive_similarity

# ----------------------------------------------------------------------------- naive formulas


def naive_image_mean(windows_feats: list[np.ndarray]) -> float:
    """mean(S) over every entry of every window's S (the reference: one batch of all windows)."""
    total, count = 0.0, 0
    for f in windows_feats:
        s = naive_similarity(f)
        total += float(s.sum())
        count += s.size
    return total / count


def naive_attention_with_mean(feats: np.ndarray, mean: float, beta: float = 1.2, gamma: float = 3.0) -> np.ndarray:
    """Row softmax of A = γ(S − β·mean) over A >= 0 (rows left empty keep their maxima): (N', N')."""
    s = naive_similarity(feats)
    a = gamma * (s - beta * mean)
    n = s.shape[0]
    out = np.zeros((n, n))
    for i in range(n):
        kept = [j for j in range(n) if a[i, j] >= 0] or [j for j in range(n) if a[i, j] == a[i].max()]
        e = np.array([math.exp(a[i, j] - max(a[i, kept])) for j in kept])
        out[i, kept] = e / e.sum()
    return out


def ceil_to(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def naive_sam_input(image: np.ndarray, multiple: int = 16, long_side: int = 1024) -> tuple[np.ndarray, tuple]:
    """The reference's SAM input, by hand: cv2 to multiples of 16, PIL bilinear to long side 1024,
    (x − mean) / std, zero padding bottom/right. Returns ((3, 1024, 1024) float64, (h, w))."""
    h, w = image.shape[:2]
    th, tw = ceil_to(h, multiple), ceil_to(w, multiple)
    img = cv2.resize(image, (tw, th), interpolation=cv2.INTER_LINEAR) if (th, tw) != (h, w) else image
    scale = long_side / max(th, tw)
    nh, nw = int(th * scale + 0.5), int(tw * scale + 0.5)
    resized = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR)).astype(np.float64)
    x = (resized - np.array(SAM_PIXEL_MEAN)) / np.array(SAM_PIXEL_STD)  # (nh, nw, 3)
    out = np.zeros((3, long_side, long_side))
    out[:, :nh, :nw] = x.transpose(2, 0, 1)
    return out, (nh, nw)


def photo(h: int, w: int) -> np.ndarray:
    from skimage import data

    return cv2.resize(data.astronaut(), (w, h), interpolation=cv2.INTER_AREA)


# ----------------------------------------------------------------------------- 1. mean scope


def test_image_mean_over_2x3_windows_matches_naive_whatever_the_batching():
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(6, 8, 4, 5, generator=g) + 0.3  # 6 windows (a 2 × 3 grid), shifted: mean(S) > 0
    want = naive_image_mean([f.double().numpy() for f in feats])
    for split in ([6], [1] * 6, [2, 3, 1], [4, 2]):
        batches = list(torch.split(feats, split))
        assert abs(float(image_similarity_mean(batches)) - want) < 1e-6
    per_window = [naive_image_mean([f.double().numpy()]) for f in feats]
    assert max(abs(m - want) for m in per_window) > 1e-3  # the scope matters for these features


@pytest.mark.parametrize("name", ["proxy", "dap"])
def test_head_with_image_scope_uses_the_given_mean(name):
    ctx = make_ctx(b=3, grid=(3, 5), vgrid=(6, 10))
    mean = 0.05
    ctx.affinity_mean = torch.tensor(mean)
    params = {"mean_scope": "image"} | ({"regions": "none"} if name == "dap" else {})
    got = build_head(name, params)(ctx).tokens
    assert_matches(got, naive_head(ctx, lambda b: naive_attention_with_mean(feats_np(ctx, b), mean)))
    # the per-window head differs: its means are the windows' own
    window = build_head(name, {k: v for k, v in params.items() if k != "mean_scope"})(ctx).tokens
    assert (window - got).abs().max() > 1e-3


def test_head_with_image_scope_and_no_mean_names_the_setting():
    ctx = make_ctx(b=2)
    with pytest.raises(ValueError, match="mean_scope"):
        build_head("proxy", {"mean_scope": "image"})(ctx)


def test_presets_set_the_mean_scope():
    for preset in ("trident", "trident-refine", "trident-h14", "dap-splice"):
        assert load_preset(preset).head.params["mean_scope"] == "image", preset
    for preset in ("proxyclip", "dap"):
        assert load_preset(preset).head.params.get("mean_scope", "window") == "window", preset


def tiny_segmenter(preset: str, **overrides) -> Segmenter:
    return Segmenter.from_preset(preset, random_weights=True, tiny=True, device="cpu", overrides=overrides)


@pytest.mark.parametrize("preset,mode", [("trident", "splice"), ("dap-splice", "splice"), ("proxyclip", "slide")])
def test_strategy_gives_every_window_the_naive_image_mean(preset, mode):
    """A 2 × 3 window grid: each batch's head sees mean(S) over all six windows' VFM features."""
    overrides = {"inference.crop": 48, "inference.stride": 32, "inference.short_side": None,
                 "head.params.mean_scope": "image"}
    if mode == "splice":
        overrides["inference.params.kind"] = "none"
    seg = tiny_segmenter(preset, **overrides)
    head = seg.engine.head
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = head.attention

    def spy(ctx):
        seen.append((ctx.affinity_mean, ctx.vfm_feats))
        return original(ctx)

    head.attention = spy
    image = torch.rand(3, 80, 112, generator=torch.Generator().manual_seed(4))  # windows: 2 rows × 3 columns
    text = torch.nn.functional.normalize(torch.randn(2, seg.clip.visual.proj.shape[1]), dim=-1)
    outs = []
    for max_batch in (1, 4, 6):
        seen.clear()
        cfg = seg.config.inference.model_copy(update={"max_batch": max_batch})
        outs.append(get_strategy(mode, cfg.params, sam_encoder=seg.sam)(seg.engine, image, text, cfg))
        feats = torch.cat([f for _, f in seen])
        assert feats.shape[0] == 6
        want = naive_image_mean([f.double().numpy() for f in feats])
        assert all(abs(float(m) - want) < 1e-6 for m, _ in seen)
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=1e-6, rtol=0)


def test_trident_preset_identical_with_max_batch_1_and_6():
    from skimage import data

    image = data.coffee()[::3, ::3]  # (134, 200)
    # short side 224 (224 × 334), aligned to 240 × 336 for splicing; crop 96, stride 64: 4 × 5 windows
    common = {"inference.short_side": 224, "inference.crop": 96, "inference.stride": 64}
    one = tiny_segmenter("trident", **common, **{"inference.max_batch": 1}).predict(image, "cup, table, wall")
    six = tiny_segmenter("trident", **common, **{"inference.max_batch": 6}).predict(image, "cup, table, wall")
    torch.testing.assert_close(one.logits, six.logits, atol=1e-6, rtol=0)
    window = tiny_segmenter("trident", **common, **{"head.params.mean_scope": "window"}).predict(
        image, "cup, table, wall")
    assert (window.logits - one.logits).abs().max() > 1e-4  # the scope changes this preset's numbers


# ----------------------------------------------------------------------------- 2. what SAM sees


@pytest.mark.parametrize("size", [(336, 505), (505, 336), (1024, 2048), (375, 500), (64, 80)])
def test_reference_sam_image_is_cv2_to_multiples_of_16(size):
    image = photo(*size)
    got = reference_sam_image(image, 16)
    th, tw = ceil_to(size[0], 16), ceil_to(size[1], 16)
    want = image if (th, tw) == size else cv2.resize(image, (tw, th))  # cv2's default: INTER_LINEAR
    assert got.shape == (th, tw, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)


def big_encoder() -> ImageEncoderViT:
    """A tiny-width encoder at SAM's real input size 1024 (token grid 64 × 64)."""
    torch.manual_seed(0)
    return ImageEncoderViT(img_size=1024, patch_size=16, embed_dim=16, depth=1, num_heads=2, out_chans=16,
                           global_attn_indexes=(0,))


@pytest.mark.parametrize("size", [(336, 505), (505, 336), (1024, 2048), (375, 500)])
def test_library_preprocess_equals_pil_and_cv2_by_hand(size):
    image = photo(*size)
    x, input_size = library_preprocess(big_encoder(), reference_sam_image(image, 16))
    want, want_size = naive_sam_input(image)
    assert input_size == want_size
    np.testing.assert_allclose(x[0].double().numpy(), want, atol=1e-4)


# (H, W) of the photo -> SAM token grid of the reference, worked out by hand:
# 336 × 505 -> 336 × 512 -> 672 × 1024 -> 42 × 64;  1024 × 2048 -> 512 × 1024 -> 32 × 64;
# 375 × 500 -> 384 × 512 -> 768 × 1024 -> 48 × 64.
@pytest.mark.parametrize("size,grid", [((336, 505), (42, 64)), ((505, 336), (64, 42)),
                                       ((1024, 2048), (32, 64)), ((375, 500), (48, 64))])
def test_sam_token_grid_and_clip_grid_mapping(size, grid):
    image = photo(*size)
    th, tw = ceil_to(size[0], 16), ceil_to(size[1], 16)
    scale = 1024 / max(th, tw)
    assert (int(th * scale + 0.5) // 16, int(tw * scale + 0.5) // 16) == grid  # the hand computation above
    _, input_size = library_preprocess(big_encoder(), sam_image(torch.zeros(3, 8, 8), image, SpliceParams(),
                                                                 16, None))
    assert valid_grid(input_size, 16) == grid
    # The spliced CLIP map (dataset short side 448, the reference's resize to multiples of 16) is
    # resized onto that SAM grid: the CLIP grid is worked out from PIL/cv2 sizes, not from dapseg.
    h, w = size
    s = min(2048 / max(h, w), 448 / min(h, w))
    ph, pw = int(h * s + 0.5), int(w * s + 0.5)
    processed = cv2.resize(image, (pw, ph))
    sh, sw = splice_size(*processed.shape[:2], 16, 336)
    spliced = torch.randn(5, sh // 16, sw // 16)
    mapped = splice_module.aggregate_map(spliced, IdentityAffinity(grid))
    want = torch.nn.functional.interpolate(spliced[None], grid, mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(mapped, want)


class IdentityAffinity:  # a stand-in GlobalAffinity: A = I
    def __init__(self, grid):
        self.valid = grid

    def aggregate(self, f, chunk=None):
        return f


def test_short_side_and_processed_sam_inputs():
    image = photo(336, 505)
    working = torch.rand(3, 448, 688)
    short = sam_image(working, image, SpliceParams(sam_input="short_side"), 16, 448)
    resized = cv2.resize(image, (673, 448))  # 505 · 448 / 336 = 673.3
    np.testing.assert_array_equal(short, cv2.resize(resized, (688, 448)))
    assert sam_image(working, image, SpliceParams(sam_input="processed"), 16, 448) is working
    # without an original (a strategy called directly) the working image, in uint8, stands in
    stand_in = sam_image(working, None, SpliceParams(), 16, 448)
    np.testing.assert_array_equal(stand_in, (working * 255).round().byte().permute(1, 2, 0).numpy())
    assert short_side_size(336, 505, 448) == (448, 673) and resize_image(image, (448, 673)).shape[:2] == (448, 673)


def test_segmenter_gives_sam_the_original_image(monkeypatch):
    from skimage import data

    image = np.ascontiguousarray(data.coffee()[::8, ::8])  # (50, 75): not multiples of 16
    seen = []
    encode = splice_module.encode_image

    def spy(sam, img, chunk=512):
        seen.append(img)
        return encode(sam, img, chunk)

    monkeypatch.setattr(splice_module, "encode_image", spy)
    tiny_segmenter("trident", **{"inference.short_side": 112}).predict(image, "cup, table")
    assert len(seen) == 1 and isinstance(seen[0], np.ndarray)
    np.testing.assert_array_equal(seen[0], cv2.resize(image, (80, 64)))  # the original, not the 112-px one


# ----------------------------------------------------------------------------- 3. refinement on CPU


def test_trident_refine_on_a_photo_on_cpu():
    from skimage import data

    from dapseg.refine.sam_prompt import SamPromptRefiner

    image = np.ascontiguousarray(data.astronaut()[::4, ::3])  # (128, 171): not multiples of 16
    seg = tiny_segmenter("trident-refine", **{"inference.short_side": 96, "refine.params.iou_thresh": -1e9,
                                              "refine.params.minimal_area": 10})
    res = seg.predict(image, "person, sky; clouds, rocket")
    assert res.labels.shape == image.shape[:2] and torch.isfinite(res.probs).all()
    # The refiner itself on integer labels, on CPU: SAM sees the original rounded up to 128 × 176.
    refiner = SamPromptRefiner(tiny_sam(), {"iou_thresh": -1e9, "minimal_area": 10})
    labels = torch.zeros(image.shape[:2], dtype=torch.long)
    labels[20:90, 30:120] = 1
    probs = torch.nn.functional.one_hot(labels, 2).permute(2, 0, 1).float() * 0.8 + 0.1
    new_labels, new_probs = refiner(image, labels, probs)
    assert new_labels.dtype == torch.long and new_labels.shape == labels.shape
    assert torch.isfinite(new_probs).all() and bool((new_probs != probs).any())
