"""DINOv2 (Oquab et al., 2023) on timm's ViT with the official token pipeline (``vit.py``).
Features: last block after the final norm, CLS and registers dropped. Without registers positions are
interpolated with a scale factor (h' + 0.1) / M; with registers bicubic to the size, antialiased.
Official files load through timm's checkpoint filter (mask token dropped, registers renamed)."""

from __future__ import annotations

from dapseg.models.vfm.base import VfmFamily, register_family, specs_from
from dapseg.models.vfm.sources import TimmHubFile
from dapseg.models.vfm.vit import TINY_VIT, VitParams, make_timm_vit, vit_checkpoint_filter, wrap_vit

SPECS = specs_from("dinov2", [
    {"name": "dinov2_vitb14", "arch": "vit_base_patch14_dinov2", "patch_size": 14,
     "official_file": "dinov2_vitb14_pretrain.pth", "hub": "vit_base_patch14_dinov2.lvd142m",
     "description": "DINOv2 ViT-B/14", "pos_offset": 0.1, "tiny": {**TINY_VIT, "img_size": 56}},
    {"name": "dinov2_vitb14_reg", "arch": "vit_base_patch14_reg4_dinov2", "patch_size": 14,
     "official_file": "dinov2_vitb14_reg4_pretrain.pth", "hub": "vit_base_patch14_reg4_dinov2.lvd142m",
     "description": "DINOv2 ViT-B/14 with 4 registers", "pos_antialias": True,
     "tiny": {**TINY_VIT, "img_size": 56}},
])

FAMILY = register_family(VfmFamily("dinov2", SPECS, make_timm_vit, vit_checkpoint_filter, wrap_vit,
                                    weights=TimmHubFile(), params=VitParams), "DINOv2 ViT")
