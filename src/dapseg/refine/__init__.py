"""Refiners: a coarse segmentation at the output resolution in, a refined one out.

A refiner is registered in ``dapseg.registry.REFINERS``; its builder takes the validated
``refine.params`` object and the models it declared (``Need``) and returns a callable
``refiner(RefineInput) -> Refined``. A refiner returns what it decides and nothing it does not:
PAMR smooths the logits (probabilities and labels follow from them as without refinement); SAM
prompting returns class probabilities and the labels it chose. No refiner fakes logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from torch import Tensor

from dapseg.postprocess import class_probs, labels_from_probs


@dataclass
class RefineInput:
    """What a refiner sees: the image and the coarse result upsampled to it."""

    image: np.ndarray  # (H, W, 3) uint8
    logits: Tensor  # (Q, H, W) cosine logits per query, before the logit scale
    query_to_class: list[int]  # query index -> class index
    logit_scale: float
    prob_thd: float
    # (H, W) int64 region map of the image from the mask generator (its lowest value: the pixels no
    # mask covers); None without a `masks:` section
    region_masks: Tensor | None = None

    @cached_property
    def probs(self) -> Tensor:
        """(C, H, W) class probabilities, as the segmenter computes them without refinement."""
        return class_probs(self.logits.float(), self.logit_scale, self.query_to_class)

    @cached_property
    def labels(self) -> Tensor:
        """(H, W) int64 class indices (background where below ``prob_thd``)."""
        return labels_from_probs(self.probs, self.prob_thd)


@dataclass
class Refined:
    """A refiner's result: whichever of logits (Q, H, W), probs (C, H, W), labels (H, W) it decided.

    The segmenter fills in the rest: probabilities from the logits, labels from the probabilities.
    """

    logits: Tensor | None = None
    probs: Tensor | None = None
    labels: Tensor | None = None

    def __post_init__(self) -> None:
        if self.logits is None and self.probs is None:
            raise ValueError("a refiner must return refined logits or refined probabilities")


Refiner = Callable[[RefineInput], Refined]


def build_refiner(name: str, params: dict | None = None, **provided: object) -> Refiner | None:
    """The refiner ``name`` ('none' -> None) with the models in ``provided`` it declared."""
    from dapseg.registry import REFINERS

    if name == REFINERS.none_name:
        return None
    return REFINERS.build(name, params, **provided)
