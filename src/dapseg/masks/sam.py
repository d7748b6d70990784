"""``sam``: segment-anything's automatic mask generator.

CorrCLIP's own code builds its SAM masks in CorrCLIPv2 (``mask_generators/factory.py``,
``SAMGenerator``): ``sam_model_registry['vit_h']`` with the release file and
``SamAutomaticMaskGenerator(sam, pred_iou_thresh=0.7, stability_score_thresh=0.7)`` (32 points per
side, segment-anything's default), masks painted by ascending area as for SAM 2. Those are the
defaults here. The image encoder and decoder are dapseg's SAM builds (``models/sam/build.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from dapseg.masks.base import MaskBuild, region_map_from_masks
from dapseg.registry import MASK_GENERATORS


class SamParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Literal["sam_vitb", "sam_vitl", "sam_vith"] = "sam_vith"
    points_per_side: int = Field(32, ge=1)
    points_per_batch: int = Field(64, ge=1)
    pred_iou_thresh: float = 0.7
    stability_score_thresh: float = 0.7
    weights: Path | None = None  # the official sam_vit_*.pth (else the cache / a download)


class SamMasks:
    """segment-anything automatic masks painted into a region map."""

    def __init__(self, params: SamParams, build: MaskBuild) -> None:
        from segment_anything import SamAutomaticMaskGenerator

        self.model = build_sam_model(params, build)
        self.generator = SamAutomaticMaskGenerator(
            self.model,
            points_per_side=params.points_per_side,
            points_per_batch=params.points_per_batch,
            pred_iou_thresh=params.pred_iou_thresh,
            stability_score_thresh=params.stability_score_thresh,
        )

    def __call__(self, image: np.ndarray, *, name: str | None = None) -> Tensor:
        with torch.inference_mode():
            anns = self.generator.generate(np.ascontiguousarray(image))
        return region_map_from_masks([a["segmentation"] for a in anns], [a["area"] for a in anns], image.shape[:2])


def build_sam_model(params: SamParams, build: MaskBuild) -> torch.nn.Module:
    """A full ``Sam``: the release file (encoder loaded strictly, decoder from the same file), or random."""
    from dapseg.models.sam.build import (
        decoder_tensors,
        make_image_encoder,
        randomize_position_terms,
        sam_variant,
        sam_with_decoder,
        tiny_sam,
    )

    variant = sam_variant(params.model)
    if build.random_weights:
        if build.tiny:
            return tiny_sam().eval().to(build.device)
        encoder = make_image_encoder(variant, tiny=False)
        randomize_position_terms(encoder)
        return sam_with_decoder(encoder.to(build.device))
    from dapseg.models.vfm.loading import fetch_weights
    from dapseg.weights import load_state_dict_file

    path = Path(params.weights) if params.weights is not None else fetch_weights(params.model, build.cache_dir)
    state = load_state_dict_file(path)
    encoder = make_image_encoder(variant, tiny=False)
    prefix = "image_encoder."
    missing, unexpected = encoder.load_state_dict(
        {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=False)
    if missing or unexpected:
        raise ValueError(f"SAM weights file {path} does not fit {params.model}: missing keys {missing[:8]}, "
                         f"unexpected keys {unexpected[:8]}")
    return sam_with_decoder(encoder.to(build.device), decoder_state=decoder_tensors(state))


@MASK_GENERATORS.register("sam", params=SamParams,
                          description="segment-anything automatic masks (ViT-H, 32 points per side)")
def build_sam_masks(params: SamParams, *, build: MaskBuild) -> SamMasks:
    return SamMasks(params, build)
