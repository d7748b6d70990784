"""``mask2former``: Mask2Former's COCO panoptic segments (transformers), as CorrCLIP loads them.

CorrCLIP's ``set_mask_generator('mask2former')`` loads ``facebook/mask2former-swin-large-coco-panoptic``
with ``AutoImageProcessor`` and ``Mask2FormerForUniversalSegmentation``, runs it under fp16 autocast
and keeps ``post_process_panoptic_segmentation(outputs, target_sizes=[(H, W)])[0]["segmentation"]``
with its default thresholds: segment ids 1..K, 0 where no segment is kept (-1 everywhere when none is).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from dapseg.masks.base import MaskBuild, import_for
from dapseg.masks.hub import PanopticMasks, checkpoint_folder
from dapseg.registry import MASK_GENERATORS

COCO_PANOPTIC_CLASSES = 133


class Mask2FormerParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    checkpoint: str = "facebook/mask2former-swin-large-coco-panoptic"  # a hub repository
    fp16: bool = True  # on CUDA: fp16 autocast, as the reference
    weights: Path | None = None  # a local checkpoint folder (config.json, weights, preprocessor_config.json)


def random_model(tiny: bool):
    """Mask2Former with random weights: Swin-L as in the COCO panoptic checkpoint (200 queries), or a
    tiny one (tests)."""
    import_for("transformers", "mask2former")
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    stages = ["stage1", "stage2", "stage3", "stage4"]
    if tiny:
        backbone = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4,
                              out_features=stages)
        config = Mask2FormerConfig(backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,
                                   encoder_feedforward_dim=64, encoder_layers=1, decoder_layers=2,
                                   num_attention_heads=2, dim_feedforward=64, num_queries=10,
                                   num_labels=COCO_PANOPTIC_CLASSES)
    else:
        backbone = SwinConfig(embed_dim=192, depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48], window_size=12,
                              out_features=stages)
        config = Mask2FormerConfig(backbone_config=backbone, num_queries=200, num_labels=COCO_PANOPTIC_CLASSES)
    return Mask2FormerForUniversalSegmentation(config)


@MASK_GENERATORS.register("mask2former", params=Mask2FormerParams,
                          description="Mask2Former COCO panoptic segments (Swin-L, transformers)")
def build_mask2former(params: Mask2FormerParams, *, build: MaskBuild) -> PanopticMasks:
    import_for("transformers", "mask2former")
    from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

    if build.random_weights:
        model = random_model(build.tiny)
        size = {"shortest_edge": 64, "longest_edge": 128} if build.tiny else {"shortest_edge": 384}
        processor = Mask2FormerImageProcessor(size=size)
    else:
        folder = checkpoint_folder(params.checkpoint, params.weights, build)
        processor = AutoImageProcessor.from_pretrained(folder)
        model = Mask2FormerForUniversalSegmentation.from_pretrained(folder)
    return PanopticMasks(model, processor, processor.post_process_panoptic_segmentation, build, params.fp16)
