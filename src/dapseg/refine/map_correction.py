"""CorrCLIP's map correction (refiner ``map_correction``): each region of the image's region map,
except the one with the lowest id (the pixels no mask covers), takes the class most of its pixels
got; the lowest region keeps its pixels' own classes.

Facts from the public reference (zdk258/CorrCLIP, ``CorrCLIPv1/corrclip_segmentor.py``,
``postprocess_result``): after softmax, background merging and the ``prob_thd`` threshold, every id
of ``torch.unique(instance_mask)`` but the first gets ``torch.mode`` of the predicted labels under
it; the map is the generator's, at the image's own resolution, before CorrCLIP's mask merging.
Ties go to the lower class (``refine.votes``; ``torch.mode`` does so on the CPU). The refiner
decides labels only; the logits are the model's, unchanged.
"""

from __future__ import annotations

import torch

from dapseg.refine import Refined, RefineInput, Refiner
from dapseg.refine.votes import majority_class, region_class_counts
from dapseg.registry import REFINERS, Need


def correct_map(labels: torch.Tensor, regions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """labels (H, W) int64, regions (H, W) int ids -> labels after the vote of every region but the lowest."""
    if regions.shape != labels.shape:
        raise ValueError(f"map_correction: region map {tuple(regions.shape)} and labels {tuple(labels.shape)} "
                         "differ in size")
    _, index = torch.unique(regions.to(labels.device), return_inverse=True)  # (H, W) in 0..R−1, 0 = lowest id
    winners = majority_class(region_class_counts(labels, index, int(index.max()) + 1, num_classes))  # (R,)
    return torch.where(index == 0, labels, winners[index])


class MapCorrection:
    """``RefineInput`` (with ``region_masks``) -> ``Refined(logits unchanged, labels corrected)``."""

    name = "map_correction"

    def __call__(self, inp: RefineInput) -> Refined:
        if inp.region_masks is None:
            raise ValueError("refiner 'map_correction' needs the image's region map (RefineInput.region_masks); "
                             "configure a `masks:` generator or --masks-dir")
        labels = inp.labels
        num_classes = max(inp.query_to_class) + 1
        return Refined(logits=inp.logits, labels=correct_map(labels, inp.region_masks, num_classes))


@REFINERS.register("map_correction", needs={Need.REGION_MASKS},
                   description="CorrCLIP map correction: each mask region takes its majority class")
def build_map_correction() -> Refiner:
    return MapCorrection()
