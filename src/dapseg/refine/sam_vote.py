"""Region voting with SAM automatic masks (refiner ``sam_vote``, as CorrCLIP ends its pipeline).

segment-anything's ``SamAutomaticMaskGenerator`` proposes class-agnostic masks of the image. Each
mask then takes one class, decided by the pixels under it in the model's own labelling:

- ``vote: majority`` — the class most of its pixels got (ties: the lower class index);
- ``vote: mean`` — the argmax of its pixels' mean class probabilities (a soft vote: a class that
  is a close second everywhere can win against one that is confident on a few pixels only; with
  ``prob_thd`` > 0, a mask whose best mean probability is below it takes the unsure label:
  unlabeled, or class 0 under the benchmarks' protocol).

Masks are painted largest first, so a smaller mask inside a larger one wins its pixels (equal
areas: the later mask of the generator's list wins); every vote reads the *unrefined* labels,
never a vote painted before it. Pixels no mask covers keep their own class. The refiner decides
labels only; the probabilities it returns are the model's, unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from dapseg.postprocess import UNLABELED
from dapseg.refine import Refined, RefineInput, Refiner
from dapseg.refine.votes import class_counts, majority_class
from dapseg.registry import REFINERS, Need

# image (H, W, 3) uint8 -> class-agnostic masks, each (H, W) bool
MaskSource = Callable[[np.ndarray], Sequence[np.ndarray]]


class SamVoteParams(BaseModel):
    """``refine.params`` of ``refine.name: sam_vote``."""

    model_config = ConfigDict(extra="forbid")

    vote: Literal["majority", "mean"] = "majority"
    points_per_side: int = Field(default=32, ge=1)  # SamAutomaticMaskGenerator's point grid (its default)
    points_per_batch: int = Field(default=64, ge=1)  # prompts per decoder call (memory)
    pred_iou_thresh: float = Field(default=0.88, ge=0, le=1)  # masks of lower predicted IoU are dropped
    stability_score_thresh: float = Field(default=0.95, ge=0, le=1)  # ... and of lower stability
    min_mask_area: int = Field(default=0, ge=0)  # pixels; smaller masks do not vote


def vote_masks(labels: Tensor, probs: Tensor, masks: Sequence[Tensor], vote: str = "majority",
               prob_thd: float = 0.0, unsure: int = UNLABELED) -> Tensor:
    """Labels (H, W) int64 after each mask took its vote; probs (C, H, W), masks (H, W) bool each.

    ``labels`` may hold ``UNLABELED``: a majority of unlabeled pixels leaves the mask unlabeled (a tie
    too); a mean vote below ``prob_thd`` gives the mask the ``unsure`` label."""
    if vote not in ("majority", "mean"):
        raise ValueError(f"sam_vote: vote must be 'majority' or 'mean', got {vote!r}")
    num_classes = probs.shape[0]
    areas = [int(m.sum()) for m in masks]
    out = labels.clone()
    # Stable sort: equal areas keep the generator's order, so the later one is painted last.
    for i in sorted(range(len(masks)), key=lambda j: -areas[j]):
        m = masks[i].to(labels.device, torch.bool)
        if areas[i] == 0:
            continue
        if m.shape != labels.shape:
            raise ValueError(f"sam_vote: mask {i} is {tuple(m.shape)}, the labels {tuple(labels.shape)}")
        if vote == "majority":
            cls = majority_class(class_counts(labels[m], num_classes))
        else:
            mean = probs[:, m].float().mean(dim=1)  # (C,)
            cls = mean.argmax()
            if prob_thd > 0 and float(mean[cls]) < prob_thd:
                cls = torch.full_like(cls, unsure)
        out[m] = cls
    return out


class SamMaskSource:
    """segment-anything's automatic masks of an image, as bool arrays (H, W)."""

    def __init__(self, sam: Any, params: SamVoteParams) -> None:
        from dapseg.heads.regions import automatic_mask_generator

        self.generator = automatic_mask_generator(
            sam,
            points_per_side=params.points_per_side,
            points_per_batch=params.points_per_batch,
            pred_iou_thresh=params.pred_iou_thresh,
            stability_score_thresh=params.stability_score_thresh,
        )
        self.min_area = params.min_mask_area

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> list[np.ndarray]:
        from dapseg.heads.regions import generate_masks

        records = generate_masks(self.generator, np.ascontiguousarray(image, dtype=np.uint8))  # float32 decoder
        return [r["segmentation"] for r in records if r["area"] >= max(self.min_area, 1)]


class SamVoteRefiner:
    """The ``sam_vote`` refiner: ``RefineInput`` -> ``Refined(logits unchanged, labels voted (H, W))``."""

    name = "sam_vote"

    def __init__(self, mask_source: MaskSource, params: SamVoteParams | None = None) -> None:
        self.mask_source = mask_source
        self.params = params or SamVoteParams()

    def __call__(self, inp: RefineInput) -> Refined:
        labels, probs = inp.labels, inp.probs  # (H, W), (C, H, W) as without refinement
        if inp.image.shape[:2] != labels.shape:
            raise ValueError(f"sam_vote: image {inp.image.shape[:2]} and logits {tuple(labels.shape)} differ in size")
        masks = [torch.from_numpy(np.asarray(m, dtype=bool)) for m in self.mask_source(inp.image)]
        return Refined(logits=inp.logits, labels=vote_masks(labels, probs, masks, self.params.vote, inp.prob_thd,
                                                                 inp.unsure))


@REFINERS.register("sam_vote", params=SamVoteParams, needs={Need.SAM_DECODER},
                   description="SAM automatic masks vote a class per region")
def build_sam_vote(p: SamVoteParams, *, sam_decoder: Any = None) -> Refiner:
    """The ``refine.name: sam_vote`` refiner around ``sam_decoder``: the full SAM of the ``sam:``
    model, else of a SAM the preset loaded as its VFM (the model bundle decides)."""
    if sam_decoder is None:
        raise ValueError("refine.name=sam_vote needs a SAM model: add --set sam.name=sam_vitb "
                         "(or a `sam:` section in the config)")
    return SamVoteRefiner(SamMaskSource(sam_decoder, p), p)
