"""Window grid, stitching, batching, postprocessing and PAMR against naive formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dapseg.config import InferenceConfig
from dapseg.inference.preprocess import short_side_size
from dapseg.inference.strategies import slide, whole
from dapseg.inference.windows import centred_padding, window_grid
from dapseg.postprocess import UNLABELED, class_probs, labels_banded, labels_from_probs, merge_synonyms
from dapseg.refine.pamr import pamr
from dapseg.text import ClassSet


# ----------------------------------------------------------------------------- window grid
@pytest.mark.parametrize(("h", "w", "crop", "stride"), [(336, 500, 224, 112), (100, 700, 224, 112), (50, 60, 224, 112),
                                                       (448, 448, 336, 224), (337, 337, 336, 112)])
def test_window_grid_covers_image_with_equal_windows(h: int, w: int, crop: int, stride: int) -> None:
    windows = window_grid(h, w, crop, stride)
    cover = np.zeros((h, w), dtype=int)
    for win in windows:
        assert win.size == (min(crop, h), min(crop, w))
        assert 0 <= win.y1 < win.y2 <= h and 0 <= win.x1 < win.x2 <= w
        cover[win.y1 : win.y2, win.x1 : win.x2] += 1
    assert cover.min() >= 1
    # the references' count: ceil((side - crop) / stride) + 1 rows and columns
    rows = max(math.ceil((h - crop) / stride), 0) + 1
    cols = max(math.ceil((w - crop) / stride), 0) + 1
    assert len(windows) == rows * cols


def test_centred_padding() -> None:
    assert centred_padding(336, 336, 56) == (0, 0, 0, 0)
    assert centred_padding(300, 250, 56) == (15, 15, 18, 18)  # 250 -> 280, 300 -> 336
    assert centred_padding(57, 1, 56) == (27, 28, 27, 28)  # odd padding: the extra pixel goes right/bottom
    assert centred_padding(301, 250, None) == (0, 0, 0, 0)


def test_short_side_resize_matches_mmseg_rule() -> None:
    assert short_side_size(500, 375, 336) == (448, 336)
    assert short_side_size(1024, 2048, 560) == (560, 1120)
    assert short_side_size(300, 9000, 336) == (68, 2048)  # long side capped at 2048


# ----------------------------------------------------------------------------- stitching
class PositionEngine:
    """A stand-in engine whose window logits are the window's own pixels (Q = 3)."""

    class _Clip:
        mean = (0.25, 0.5, 0.75)
        patch_size = 16  # windows narrower than this would be padded

    clip = _Clip()
    vfm = None
    needs_image_mean = False

    def __init__(self) -> None:
        self.batches: list[int] = []

    def window_logits(self, windows01: torch.Tensor, text: torch.Tensor, *, vfm_out: object = None,
                      affinity_mean: torch.Tensor | None = None) -> torch.Tensor:
        self.batches.append(windows01.shape[0])
        return windows01.clone()


@pytest.mark.parametrize("pad_multiple", [None, 56])
@pytest.mark.parametrize(("h", "w"), [(150, 257), (90, 60), (224, 224)])
def test_slide_stitches_a_known_function_of_position_exactly(h: int, w: int, pad_multiple: int | None) -> None:
    ys, xs = torch.meshgrid(torch.arange(h) / h, torch.arange(w) / w, indexing="ij")
    image = torch.stack([ys, xs, ys * xs])  # logits = f(y, x) for the fake model
    engine = PositionEngine()
    cfg = InferenceConfig(mode="slide", crop=96, stride=40, pad_multiple=pad_multiple, max_batch=4)
    out = slide(engine, image, torch.zeros(3, 8), cfg)
    torch.testing.assert_close(out, image, atol=1e-6, rtol=0)
    assert max(engine.batches) <= 4
    out_whole = whole(engine, image, torch.zeros(3, 8), cfg)
    torch.testing.assert_close(out_whole, image, atol=1e-6, rtol=0)


def test_batched_windows_equal_one_at_a_time() -> None:
    from skimage import data

    from dapseg.api import Segmenter

    image = data.coffee()[:200, :300]
    batched = Segmenter.from_preset("naclip", random_weights=True, tiny=True,
                                    overrides={"inference.short_side": None, "inference.max_batch": 16})
    single = batched.derive({"inference.max_batch": 1})
    assert single.clip is batched.clip  # derive reuses the loaded model
    classes = ClassSet.from_list(["cup", "table; wood", "saucer"])
    a = batched.coarse_logits(image, classes)
    b = single.coarse_logits(image, classes)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- postprocess
def test_synonym_merge_and_background_threshold() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 4, 6) * 0.05  # cosine-sized: some pixels' top class probability is below 0.9
    q2c = [0, 1, 1, 2, 1]
    probs = class_probs(logits, 40.0, q2c)
    sm = torch.softmax(logits * 40, 0)
    naive = torch.stack([sm[[i for i, c in enumerate(q2c) if c == k]].max(0).values for k in range(3)])
    torch.testing.assert_close(probs, naive)
    for unsure in (UNLABELED, 0):  # the API leaves unsure pixels unlabeled; the benchmarks' class 0
        labels = labels_from_probs(probs, 0.9, unsure)
        for y in range(4):
            for x in range(6):
                top = naive[:, y, x]
                expected = unsure if top.max() < 0.9 else int(top.argmax())
                assert labels[y, x] == expected
    assert (naive.max(0).values < 0.9).any() and (naive.max(0).values >= 0.9).any()  # both cases occur
    assert merge_synonyms(sm, [0, 1, 2, 3, 4]) is sm  # no synonyms: nothing to merge


@pytest.mark.parametrize("out_size", [(37, 53), (200, 90), (8, 8)])
def test_banded_labels_equal_full_upsampling(out_size: tuple[int, int]) -> None:
    torch.manual_seed(1)
    logits = torch.randn(4, 9, 13) * 0.1
    q2c = [0, 1, 2, 2]
    full = F.interpolate(logits[None], size=out_size, mode="bilinear", align_corners=False)[0]
    expected = labels_from_probs(class_probs(full, 40.0, q2c), 0.3)
    got = labels_banded(logits, out_size, 40.0, q2c, 0.3, max_elements=4 * out_size[1] * 3)  # 3-row bands
    assert torch.equal(got, expected)


# ----------------------------------------------------------------------------- PAMR
def naive_pamr(image: torch.Tensor, mask: torch.Tensor, steps: int, dilations: tuple[int, ...]) -> torch.Tensor:
    """PAMR by loops over pixels: neighbours clamped at the border (replicate padding)."""
    _, h, w = image.shape
    offs8 = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]
    offs9 = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 0), (0, 1), (1, -1), (1, 0), (1, 1)]

    def at(t: torch.Tensor, y: int, x: int) -> torch.Tensor:
        return t[:, min(max(y, 0), h - 1), min(max(x, 0), w - 1)]

    weights = torch.zeros(h, w, 8 * len(dilations))
    for y in range(h):
        for x in range(w):
            stencil = torch.stack([at(image, y + d * dy, x + d * dx) for d in dilations for dy, dx in offs9], 1)
            sigma = stencil.std(dim=1)  # (K,)
            aff = torch.stack(
                [-(at(image, y + d * dy, x + d * dx) - image[:, y, x]).abs() / (1e-8 + 0.1 * sigma)
                 for d in dilations for dy, dx in offs8], 1)  # (K, P)
            weights[y, x] = torch.softmax(aff.mean(0), 0)
    for _ in range(steps):
        new = torch.zeros_like(mask)
        for y in range(h):
            for x in range(w):
                nb = torch.stack([at(mask, y + d * dy, x + d * dx) for d in dilations for dy, dx in offs8], 1)
                new[:, y, x] = (nb * weights[y, x]).sum(1)
        mask = new
    return mask


def test_pamr_against_naive_loops() -> None:
    torch.manual_seed(2)
    image = torch.rand(3, 7, 9)
    image[:, :, 4:] += 1.0  # an edge PAMR should respect
    mask = torch.randn(2, 7, 9)
    got = pamr(image[None], mask[None], steps=3, dilations=(1, 2))[0]
    expected = naive_pamr(image, mask, 3, (1, 2))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_pamr_constant_image_has_no_nan() -> None:
    image = torch.ones(1, 3, 6, 6)
    mask = torch.randn(1, 2, 6, 6)
    out = pamr(image, mask, steps=2, dilations=(1,))
    assert torch.isfinite(out).all()


def test_labels_ties_pick_the_lowest_class_index():
    """Tie rule of argmax: equal probabilities go to the lowest class index."""
    probs = torch.tensor([[0.2, 0.4, 0.25], [0.4, 0.3, 0.25], [0.4, 0.3, 0.25], [0.0, 0.0, 0.25]])
    assert labels_from_probs(probs[:, None, :], 0.0)[0].tolist() == [1, 0, 0]


# ----------------------------------------------------------------------------- config edge cases


@pytest.mark.parametrize("mode", ["slide", "whole", "splice"])
def test_stride_larger_than_crop_is_refused_at_load(mode: str, tmp_path) -> None:
    from pydantic import ValidationError

    from dapseg.config import load_config_file, load_preset

    with pytest.raises(ValidationError, match=r"inference.stride \(300\) is larger than inference.crop \(224\)"):
        InferenceConfig(mode=mode, crop=224, stride=300)
    with pytest.raises(ValidationError, match=r"inference.stride \(113\) is larger than inference.crop \(112\)"):
        load_preset("naclip", {"inference.crop": 112, "inference.stride": 113})
    config = tmp_path / "c.yaml"
    config.write_text("base: naclip\ninference: {crop: 64, stride: 65}\n", encoding="utf-8")
    with pytest.raises(ValidationError, match=r"inference\.stride \(65\)"):
        load_config_file(config)
    assert InferenceConfig(crop=224, stride=224).stride == 224  # equal is fine: windows touch


@pytest.mark.parametrize(("key", "value"), [("short_side", 0), ("short_side", -1), ("max_batch", 0), ("crop", 0)])
def test_non_positive_sizes_are_refused(key: str, value: int) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=key):
        InferenceConfig(**{key: value})


def test_crop_larger_than_the_image_is_one_window_equal_to_whole() -> None:
    from skimage import data

    from dapseg.api import Segmenter

    image = data.coffee()[::8, ::8]  # (50, 75): smaller than the window
    classes = ClassSet.from_list(["cup", "table", "saucer"])
    slide_seg = Segmenter.from_preset("naclip", random_weights=True, tiny=True,
                                      overrides={"inference.short_side": None, "inference.crop": 448})
    whole_seg = slide_seg.derive({"inference.mode": "whole"})
    a = slide_seg.coarse_logits(image, classes)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, whole_seg.coarse_logits(image, classes), atol=1e-6, rtol=0)


def test_windows_narrower_than_a_patch_are_padded_to_one_patch() -> None:
    from dapseg.inference.strategies import padded_window_logits, window_padding

    assert window_padding(2, 224, None, 16) == (0, 0, 7, 7)
    assert window_padding(5, 3, None, 14) == (5, 6, 4, 5)
    assert window_padding(30, 250, 56, 16) == (15, 15, 13, 13)  # pad_multiple already reaches a patch
    assert window_padding(50, 60, None, 16) == (0, 0, 0, 0)

    from dapseg.api import Segmenter

    seg = Segmenter.from_preset("naclip", random_weights=True, tiny=True)
    text = torch.nn.functional.normalize(torch.randn(3, seg.clip.embed_dim), dim=-1)
    g = torch.Generator().manual_seed(0)
    narrow = torch.rand(2, 3, 4, 40, generator=g)  # 4 px high: less than a 16 px patch
    got = padded_window_logits(seg.engine, narrow, text, None)
    assert got.shape == (2, 3, 4, 40) and torch.isfinite(got).all()
    # naive: pad by hand with the CLIP mean colour (6 rows above, 6 below), then crop the logits
    mean = torch.tensor(seg.clip.mean).view(1, 3, 1, 1).expand(2, 3, 6, 40)
    padded = torch.cat([mean, narrow, mean], dim=2)
    want = seg.engine.window_logits(padded, text)[..., 6:10, :]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
