"""Pixels left unlabeled (issue 27): below ``postprocess.prob_thd`` and in the classes a user marks,
the API's labels hold ``UNLABELED`` (-1), the label PNG 255 (65535 when 16-bit), the JSON and the
manifest count them; the benchmarks' class lists keep class 0 there (eval's protocol)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from dapseg.api import Segmenter
from dapseg.cli import main
from dapseg.postprocess import UNLABELED
from dapseg.text import ClassSet
from dapseg.viz import UNLABELED_COLOUR, display_palette, label_image, labels_from_png, overlay

CLASSES = "person, sky; clouds, cup, background"


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return np.ascontiguousarray(data.astronaut()[::8, ::8])  # 64 x 64


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    return Segmenter.from_preset("naclip", random_weights=True, tiny=True, device="cpu")


def _median_top(segmenter: Segmenter, photo: np.ndarray, classes: ClassSet) -> tuple[torch.Tensor, float]:
    """The probabilities and a threshold near the median top probability, half-way between two of
    them (the labels are upsampled in bands: no pixel must sit on the threshold within rounding)."""
    probs = segmenter.predict(photo, classes).probs  # (C, H, W)
    top = probs.max(0).values.flatten().sort().values
    mid = top.numel() // 2
    gaps = top[mid - 200 : mid + 200].diff()
    k = mid - 200 + int(gaps.argmax())
    assert float(gaps.max()) > 1e-4
    return probs, float(top[k] + top[k + 1]) / 2


def test_below_prob_thd_is_unlabeled_in_the_api_and_class_0_for_the_benchmarks(segmenter, photo) -> None:
    classes = ClassSet.parse(CLASSES)
    probs, thd = _median_top(segmenter, photo, classes)
    top, arg = probs.max(0)
    seg = segmenter.derive({"postprocess.prob_thd": thd})
    res = seg.predict(photo, classes)
    want = torch.where(top < thd, torch.full_like(arg, -1), arg)  # naive rule, -1 written out
    assert UNLABELED == -1 and torch.equal(res.labels, want)
    assert 0.3 < float((res.labels == -1).double().mean()) < 0.7  # both kinds of pixel occur
    assert res.unlabeled_share() == pytest.approx(float((top < thd).double().mean()))
    shares = res.pixel_shares()
    assert sum(shares.values()) + res.unlabeled_share() == pytest.approx(1.0)
    assert shares["person"] == pytest.approx(float(((arg == 0) & (top >= thd)).double().mean()))

    bench = ClassSet.parse(CLASSES)
    bench = ClassSet.from_list(bench.names, allow_repeats=True, unsure_class=0)  # as eval builds it
    assert torch.equal(seg.predict(photo, bench).labels, torch.where(top < thd, torch.zeros_like(arg), arg))


def test_unlabeled_classes_by_name_or_synonym(segmenter, photo) -> None:
    classes = ClassSet.parse(CLASSES)
    arg = segmenter.predict(photo, classes).labels
    marked = classes.leave_unlabeled(["Background", "clouds"])  # a synonym names its class
    assert marked.unlabeled_classes == (1, 3) and marked.names == classes.names
    res = segmenter.predict(photo, marked)
    want = arg.clone()
    want[(arg == 1) | (arg == 3)] = -1
    assert torch.equal(res.labels, want) and (want == -1).any() and (want >= 0).any()
    assert torch.equal(res.probs, segmenter.predict(photo, classes).probs)  # the probabilities keep every class
    with pytest.raises(ValueError, match="'backgruond' is not in the class list"):
        classes.leave_unlabeled(["backgruond"])
    with pytest.raises(ValueError, match="unsure_class 4"):
        ClassSet.from_list(["a", "b"], unsure_class=4)


def test_label_png_holds_255_and_reads_back() -> None:
    labels = np.array([[0, 1, -1], [2, -1, 1]])
    img = label_image(labels, 3)
    assert img.mode == "P"
    values = np.asarray(img)
    assert values.tolist() == [[0, 1, 255], [2, 255, 1]]
    pal = np.array(img.getpalette()).reshape(-1, 3)
    assert tuple(pal[255]) == UNLABELED_COLOUR and (pal[:3] == display_palette(3)).all()
    assert labels_from_png(values, 3).tolist() == labels.tolist()
    big = label_image(np.array([[299, -1, 255]]), 300)  # > 255 classes: 16-bit, 65535 unlabeled
    assert np.asarray(big).tolist() == [[299, 65535, 255]]
    assert labels_from_png(np.asarray(big), 300).tolist() == [[299, -1, 255]]
    with pytest.raises(ValueError, match="pixel value 7"):
        labels_from_png(np.array([[7]]), 3)


def test_overlay_shows_unlabeled_pixels_grey_and_untinted() -> None:
    image = np.zeros((2, 2, 3), np.uint8)
    image[...] = (200, 100, 50)
    labels = np.array([[0, -1], [1, 1]])
    out = np.asarray(overlay(image, labels, ["a", "b"], with_legend=False))
    luma = int(0.299 * 200 + 0.587 * 100 + 0.114 * 50)
    assert out[0, 1].tolist() == [luma] * 3
    want = (image[0, 0] * 0.5 + display_palette(2)[0] * 0.5).astype(np.uint8)
    assert out[0, 0].tolist() == want.tolist()


def test_segment_writes_255_and_counts_unlabeled(tmp_path: Path, photo, capsys) -> None:
    Image.fromarray(photo).save(tmp_path / "im.png")
    out = tmp_path / "out"
    rc = main(["segment", str(tmp_path / "im.png"), "--classes", CLASSES, "--unlabeled-classes", "background",
               "--out", str(out), "--save", "labels,json", "--random-weights", "--tiny", "--preset", "naclip",
               "--set", "postprocess.prob_thd=0.3", "--device", "cpu"])
    assert rc == 0
    seg = Segmenter.from_preset("naclip", random_weights=True, tiny=True, device="cpu",
                                overrides={"postprocess.prob_thd": 0.3})
    want = seg.predict(photo, ClassSet.parse(CLASSES).leave_unlabeled(["background"])).labels.numpy()
    png = np.asarray(Image.open(out / "im_labels.png"))
    assert (png == np.where(want == -1, 255, want)).all() and (png == 255).any()
    summary = json.loads((out / "im.json").read_text())
    line = json.loads((out / "manifest.jsonl").read_text())
    share = float((want == -1).mean())
    assert summary["unlabeled_share"] == pytest.approx(share) and line["unlabeled_share"] == pytest.approx(share)
    assert json.loads((out / "labeling-job.json").read_text())["unlabeled_classes"] == ["background"]


def test_eval_predictor_keeps_class_0_below_the_threshold(photo) -> None:
    from dapseg.commands.evalkit import SegmenterFactory

    args = argparse.Namespace(random_weights=True, tiny=True, device="cpu", cache_dir=None, clip_weights=None,
                              vfm_weights=None, sam_weights=None, overrides=[], plugins=[], fsa=False,
                              config=None, preset="naclip")
    built = SegmenterFactory(args)("naclip", {"postprocess.prob_thd": 0.99}, ["background", "person", "sky"])
    labels = built.predict(photo)
    assert (labels >= 0).all() and (labels == 0).all()  # random weights: every top probability < 0.99
