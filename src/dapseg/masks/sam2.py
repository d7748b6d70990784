"""``sam2``: SAM 2's automatic mask generator (the ``sam2`` package), as CorrCLIP runs it.

CorrCLIP's ``set_mask_generator('sam2')`` (``CorrCLIPv1/corrclip_segmentor.py``) builds
``build_sam2("sam2_hiera_l.yaml", "sam2_hiera_large.pt", apply_postprocessing=False)``, casts it to
half precision and runs ``SAM2AutomaticMaskGenerator(points_per_side=8, pred_iou_thresh=0.4,
stability_score_thresh=0.4, multimask_output=False)`` under fp16 autocast: the defaults here (the
paper's "SAM2_8" row). The "SAM2_32" row uses masks generated offline with 32 points per side
(released as ``region_masks.zip``, read by the ``folder`` generator); CorrCLIPv2's mask-building
script uses ``points_per_side=32, pred_iou_thresh=0.7, stability_score_thresh=0.7,
multimask_output=True`` for it.

The masks are painted as the reference paints them (``base.region_map_from_masks``): ascending area,
ids 1..K, 0 where no mask covers.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from dapseg.masks.base import MaskBuild, import_for, region_map_from_masks
from dapseg.registry import MASK_GENERATORS

_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/"
# model -> (the sam2 package's config, the release file): the package's own table of checkpoints
MODELS: dict[str, tuple[str, str]] = {
    "sam2_hiera_t": ("configs/sam2/sam2_hiera_t.yaml", _URL + "072824/sam2_hiera_tiny.pt"),
    "sam2_hiera_s": ("configs/sam2/sam2_hiera_s.yaml", _URL + "072824/sam2_hiera_small.pt"),
    "sam2_hiera_b+": ("configs/sam2/sam2_hiera_b+.yaml", _URL + "072824/sam2_hiera_base_plus.pt"),
    "sam2_hiera_l": ("configs/sam2/sam2_hiera_l.yaml", _URL + "072824/sam2_hiera_large.pt"),
    "sam2.1_hiera_t": ("configs/sam2.1/sam2.1_hiera_t.yaml", _URL + "092824/sam2.1_hiera_tiny.pt"),
    "sam2.1_hiera_s": ("configs/sam2.1/sam2.1_hiera_s.yaml", _URL + "092824/sam2.1_hiera_small.pt"),
    "sam2.1_hiera_b+": ("configs/sam2.1/sam2.1_hiera_b+.yaml", _URL + "092824/sam2.1_hiera_base_plus.pt"),
    "sam2.1_hiera_l": ("configs/sam2.1/sam2.1_hiera_l.yaml", _URL + "092824/sam2.1_hiera_large.pt"),
}

# A tiny SAM 2 for tests (random weights): Hiera-T's config with a 5-block, 24-wide trunk and
# 32-wide neck, prompt decoder and memory modules. The input stays 1024 (the image predictor's
# feature sizes are fixed to it).
TINY_OVERRIDES = [
    "++model.image_encoder.trunk.embed_dim=24", "++model.image_encoder.trunk.num_heads=1",
    "++model.image_encoder.trunk.stages=[1,1,2,1]", "++model.image_encoder.trunk.global_att_blocks=[3]",
    "++model.image_encoder.trunk.window_pos_embed_bkg_spatial_size=[7,7]",
    "++model.image_encoder.neck.backbone_channel_list=[192,96,48,24]", "++model.image_encoder.neck.d_model=32",
    "++model.image_encoder.neck.position_encoding.num_pos_feats=32", "++model.memory_attention.d_model=32",
    "++model.memory_attention.layer.d_model=32", "++model.memory_attention.layer.self_attention.embedding_dim=32",
    "++model.memory_attention.layer.cross_attention.embedding_dim=32",
    "++model.memory_attention.layer.cross_attention.kv_in_dim=16", "++model.memory_attention.layer.dim_feedforward=64",
    "++model.memory_encoder.out_dim=16", "++model.memory_encoder.mask_downsampler.embed_dim=32",
    "++model.memory_encoder.fuser.layer.dim=32", "++model.memory_encoder.position_encoding.num_pos_feats=16",
]


class Sam2Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Literal[tuple(MODELS)] = "sam2_hiera_l"  # type: ignore[valid-type]
    points_per_side: int = Field(8, ge=1)
    points_per_batch: int = Field(64, ge=1)
    pred_iou_thresh: float = 0.4
    stability_score_thresh: float = 0.4
    multimask_output: bool = False
    fp16: bool = True  # on CUDA: the model in half precision under fp16 autocast (as the reference)
    weights: Path | None = None  # a local release file (else the cache / a download)


class Sam2Masks:
    """SAM 2 automatic masks painted into a region map."""

    def __init__(self, params: Sam2Params, build: MaskBuild) -> None:
        amg = import_for("sam2.automatic_mask_generator", "sam2")
        self.model = build_sam2_model(params, build)
        self.device = torch.device(build.device)
        self.fp16 = params.fp16 and self.device.type == "cuda"
        if self.fp16:
            self.model = self.model.half()
        self.generator = amg.SAM2AutomaticMaskGenerator(
            model=self.model,
            points_per_side=params.points_per_side,
            points_per_batch=params.points_per_batch,
            pred_iou_thresh=params.pred_iou_thresh,
            stability_score_thresh=params.stability_score_thresh,
            multimask_output=params.multimask_output,
        )

    def __call__(self, image: np.ndarray, *, name: str | None = None) -> Tensor:
        amp = torch.autocast("cuda", dtype=torch.float16) if self.fp16 else nullcontext()
        with torch.inference_mode(), amp:
            anns = self.generator.generate(np.ascontiguousarray(image))
        return region_map_from_masks([a["segmentation"] for a in anns], [a["area"] for a in anns], image.shape[:2])


def build_sam2_model(params: Sam2Params, build: MaskBuild) -> torch.nn.Module:
    """The SAM 2 model: the release file loaded strictly (read with ``weights_only``), or random."""
    build_sam2 = import_for("sam2.build_sam", "sam2").build_sam2
    config, url = MODELS[params.model]
    path = None
    if not build.random_weights:
        from dapseg.masks.weights import fetch_url

        path = Path(params.weights) if params.weights is not None else fetch_url(url, build.cache_dir)
    overrides = TINY_OVERRIDES if build.random_weights and build.tiny else []
    # the checkpoint is loaded here, not by build_sam2 (whose torch.load is not restricted to tensors)
    model = build_sam2(config, None, device="cpu", apply_postprocessing=False, hydra_overrides_extra=overrides)
    if path is not None:
        from dapseg.weights import load_state_dict_file

        state = load_state_dict_file(path)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"SAM 2 weights file {path} does not fit {params.model}: missing keys {missing[:8]}, "
                             f"unexpected keys {unexpected[:8]}")
    return model.eval().to(build.device)


@MASK_GENERATORS.register("sam2", params=Sam2Params,
                          description="SAM 2 automatic masks (CorrCLIP: Hiera-L, 8 points per side)")
def build_sam2_masks(params: Sam2Params, *, build: MaskBuild) -> Sam2Masks:
    return Sam2Masks(params, build)
