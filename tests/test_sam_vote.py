"""The sam_vote refiner: region voting against a naive per-pixel vote on hand-made masks."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from skimage import data

from dapseg.api import Segmenter
from dapseg.config import SegmenterConfig
from dapseg.demo.backend import knobs_from_ui
from dapseg.models.sam.build import image_encoder_of
from dapseg.postprocess import UNLABELED, class_probs, labels_from_probs
from dapseg.refine import RefineInput, build_refiner
from dapseg.refine.sam_vote import SamVoteParams, SamVoteRefiner, vote_masks

H, W, C = 12, 15, 4


def hand_made_masks() -> list[torch.Tensor]:
    """Nested, overlapping, equal-area, single-pixel and empty masks on a 12 × 15 image."""
    boxes = [(0, 12, 0, 10),  # large
             (2, 6, 2, 6),  # inside the large one
             (3, 5, 3, 9),  # overlaps the previous, area 12
             (8, 11, 9, 13),  # area 12 too: an equal-area pair (generator order decides overlaps)
             (9, 11, 12, 15),  # overlaps the previous, area 6
             (7, 8, 14, 15),  # one pixel
             (5, 5, 5, 5)]  # empty
    masks = []
    for y1, y2, x1, x2 in boxes:
        m = torch.zeros(H, W, dtype=torch.bool)
        m[y1:y2, x1:x2] = True
        masks.append(m)
    masks[0][5:7, 0] = False  # not a rectangle
    return masks


def naive_vote(labels: torch.Tensor, probs: torch.Tensor, masks: list[torch.Tensor], vote: str,
               prob_thd: float, unsure: int) -> torch.Tensor:
    """Per pixel: the smallest mask covering it (equal areas: the later one) decides, by a vote over
    that mask's pixels in the unrefined labelling (unlabeled, -1, is a candidate of the majority and
    wins its ties); uncovered pixels keep their label."""
    out = labels.clone()
    areas = [int(m.sum()) for m in masks]
    for y in range(H):
        for x in range(W):
            cover = [i for i, m in enumerate(masks) if m[y, x]]
            if not cover:
                continue
            best = min(cover, key=lambda i: (areas[i], -i))
            pix = [(yy, xx) for yy in range(H) for xx in range(W) if masks[best][yy, xx]]
            if vote == "majority":
                counts = Counter(int(labels[p]) for p in pix)
                top = max(counts.values())
                out[y, x] = min(c for c, n in counts.items() if n == top)
            else:
                mean = [sum(float(probs[c][p]) for p in pix) / len(pix) for c in range(C)]
                cls = int(np.argmax(mean))
                out[y, x] = unsure if prob_thd > 0 and mean[cls] < prob_thd else cls
    return out


def random_case(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(C + 1, H, W, generator=gen) * 0.05  # query 4 is a synonym of class 2
    q2c = [0, 1, 2, 3, 2]
    probs = class_probs(logits, 40.0, q2c)
    return logits, probs, probs.argmax(0)


@pytest.mark.parametrize(("vote", "prob_thd", "unsure"),
                         [("majority", 0.0, 0), ("mean", 0.0, 0), ("mean", 0.45, 0), ("mean", 0.45, UNLABELED),
                          ("majority", 0.35, UNLABELED)])
@pytest.mark.parametrize("seed", [0, 1])
def test_vote_masks_equals_naive_vote(vote: str, prob_thd: float, unsure: int, seed: int) -> None:
    _, probs, labels = random_case(seed)
    if vote == "majority" and unsure == UNLABELED:  # unsure pixels in the labelling vote as unlabeled
        labels = labels_from_probs(probs, prob_thd, UNLABELED)
        assert (labels == UNLABELED).any() and (labels != UNLABELED).any()
    masks = hand_made_masks()
    got = vote_masks(labels, probs, masks, vote, prob_thd, unsure)
    want = naive_vote(labels, probs, masks, vote, prob_thd, unsure)
    assert torch.equal(got, want)
    assert torch.equal(got[:, 13:][:7], labels[:, 13:][:7])  # uncovered pixels keep their class


def test_vote_masks_tie_and_degenerate_cases() -> None:
    labels = torch.tensor([[1, 1, 2, 2], [3, 3, 3, 0]])
    probs = torch.nn.functional.one_hot(labels, 4).permute(2, 0, 1).float()
    tie = torch.tensor([[True, True, True, True], [False] * 4])  # two 1s, two 2s: the lower class
    assert vote_masks(labels, probs, [tie])[0].tolist() == [1, 1, 1, 1]
    assert torch.equal(vote_masks(labels, probs, []), labels)  # no masks: nothing changes
    with pytest.raises(ValueError, match="vote must be"):
        vote_masks(labels, probs, [tie], "median")
    with pytest.raises(ValueError, match="mask 0"):
        vote_masks(labels, probs, [torch.ones(3, 3, dtype=torch.bool)])


def test_refiner_with_injected_masks_keeps_logits_and_votes_labels() -> None:
    logits, probs, labels = random_case(2)
    masks = hand_made_masks()
    image = np.zeros((H, W, 3), dtype=np.uint8)
    seen = []

    def source(img: np.ndarray) -> list[np.ndarray]:
        seen.append(img.shape)
        return [m.numpy() for m in masks]

    refiner = SamVoteRefiner(source, SamVoteParams(vote="mean"))
    out = refiner(RefineInput(image, logits, [0, 1, 2, 3, 2], logit_scale=40.0, prob_thd=0.0))
    assert seen == [(H, W, 3)]
    assert out.logits is logits and out.probs is None  # the probabilities stay those of the logits
    assert torch.equal(out.labels, naive_vote(labels, probs, masks, "mean", 0.0, UNLABELED))
    for unsure in (0, UNLABELED):  # the refiner hands the unsure label of its input on
        out = refiner(RefineInput(image, logits, [0, 1, 2, 3, 2], logit_scale=40.0, prob_thd=0.45, unsure=unsure))
        below = labels_from_probs(probs, 0.45, unsure)  # the unrefined labelling at that threshold
        assert torch.equal(out.labels, naive_vote(below, probs, masks, "mean", 0.45, unsure))


def test_sam_vote_needs_a_sam_and_is_offered_everywhere() -> None:
    with pytest.raises(ValueError, match="needs a SAM model"):
        build_refiner("sam_vote", {})
    with pytest.raises(ValueError, match="vote"):
        SamVoteParams(vote="median")
    assert SegmenterConfig().with_overrides({"refine.name": "sam_vote"}).refine.name == "sam_vote"
    assert knobs_from_ui(336, 224, 112, 0.0, "none", "sam_vote").refine == "sam_vote"  # the demo's menu


def test_sam_vote_end_to_end_on_a_photo_with_a_tiny_random_sam() -> None:
    params = {"points_per_side": 3, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    seg = Segmenter.from_preset("naclip", random_weights=True, tiny=True, device="cpu",
                                overrides={"refine.name": "sam_vote", "refine.params": params,
                                           "sam": {"name": "sam_vitb"}, "inference.short_side": 64})
    assert image_encoder_of(seg.refiner.mask_source.generator.predictor.model) is image_encoder_of(seg.sam)
    image = data.coffee()[::5, ::5]
    out = seg.predict(image, ["cup", "table", "saucer"])
    assert out.labels.shape == image.shape[:2]
    assert torch.isfinite(out.probs).all()


def test_sam_vote_uses_the_sam_a_preset_loaded_as_its_vfm() -> None:
    seg = Segmenter.from_preset("proxyclip-sam_vitb", random_weights=True, tiny=True, device="cpu",
                                overrides={"refine.name": "sam_vote"})
    assert seg.sam is None
    assert image_encoder_of(seg.refiner.mask_source.generator.predictor.model) is image_encoder_of(seg.vfm)
