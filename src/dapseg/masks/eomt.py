"""``eomt``: EoMT's COCO panoptic segments (transformers), the checkpoint CorrCLIP loads.

CorrCLIP's ``set_mask_generator('eomt')`` builds EoMT-L at 640 (``eomt_large_640.yaml``, weights
``tue-mps/coco_panoptic_eomt_large_640``) with its own copy of the EoMT code and keeps the segment
ids of ``to_per_pixel_preds_panoptic`` (mask_thresh 0.8, overlap_thresh 0.8, COCO's stuff classes
80..132 merged per class): ids 0..K-1, -1 where no segment is kept. transformers' EoMT port runs the
same checkpoint and its ``post_process_panoptic_segmentation`` the same steps (scores above 0.8,
masks at sigmoid >= 0.5, overlap ratio 0.8, one segment per stuff class, -1 elsewhere); where the two
differ: the image is resized by transformers' processor instead of PIL bilinear, and an overlap
ratio of exactly 0.8 is dropped by transformers and kept by the reference.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from dapseg.masks.base import MaskBuild, import_for
from dapseg.masks.hub import PanopticMasks, checkpoint_folder
from dapseg.registry import MASK_GENERATORS

COCO_PANOPTIC_CLASSES = 133
COCO_STUFF_CLASSES = list(range(80, 133))  # the reference's config: data.init_args.stuff_classes


class EomtParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    checkpoint: str = "tue-mps/coco_panoptic_eomt_large_640"  # a hub repository
    mask_thresh: float = Field(0.8, ge=0, le=1)  # class score a segment must exceed
    overlap_thresh: float = Field(0.8, ge=0, le=1)
    fp16: bool = True  # on CUDA: fp16 autocast, as the reference
    weights: Path | None = None  # a local checkpoint folder


def random_model(tiny: bool):
    """EoMT with random weights: ViT-L at 640 with 200 queries (as the checkpoint), or a tiny one."""
    import_for("transformers", "eomt")
    from transformers import EomtConfig, EomtForUniversalSegmentation

    if tiny:
        config = EomtConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, image_size=64, num_blocks=2,
                            num_queries=10, num_labels=COCO_PANOPTIC_CLASSES)
    else:
        config = EomtConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, image_size=640,
                            num_queries=200, num_labels=COCO_PANOPTIC_CLASSES)
    return EomtForUniversalSegmentation(config)


@MASK_GENERATORS.register("eomt", params=EomtParams,
                          description="EoMT COCO panoptic segments (ViT-L 640, transformers)")
def build_eomt(params: EomtParams, *, build: MaskBuild) -> PanopticMasks:
    import_for("transformers", "eomt")
    from transformers import AutoImageProcessor, EomtForUniversalSegmentation, EomtImageProcessor

    if build.random_weights:
        model = random_model(build.tiny)
        side = 64 if build.tiny else 640
        processor = EomtImageProcessor(size={"shortest_edge": side, "longest_edge": side}, do_pad=True)
    else:
        folder = checkpoint_folder(params.checkpoint, params.weights, build)
        processor = AutoImageProcessor.from_pretrained(folder)
        model = EomtForUniversalSegmentation.from_pretrained(folder)
    post = partial(processor.post_process_panoptic_segmentation, threshold=params.mask_thresh,
                   mask_threshold=0.5, overlap_mask_area_threshold=params.overlap_thresh,
                   stuff_classes=COCO_STUFF_CLASSES)
    return PanopticMasks(model, processor, post, build, params.fp16)
