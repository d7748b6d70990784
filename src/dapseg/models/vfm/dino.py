"""DINO (Caron et al., 2021): the ProxyCLIP default VFM family, on timm's ViT with the official
token pipeline (``vit.py``). Features: last block after the final LayerNorm, CLS dropped; position
embeddings interpolated as official DINO does (bicubic, scale factor (h' + 0.1) / M)."""

from __future__ import annotations

from dapseg.models.vfm.base import VfmFamily, register_family, specs_from
from dapseg.models.vfm.sources import TimmHubFile
from dapseg.models.vfm.vit import TINY_VIT, VitParams, make_timm_vit, vit_checkpoint_filter, wrap_vit

SPECS = specs_from("dino", [
    {"name": "dino_vits8", "arch": "vit_small_patch8_224", "patch_size": 8,
     "official_file": "dino_deitsmall8_pretrain.pth", "hub": "vit_small_patch8_224.dino",
     "description": "DINO ViT-S/8", "tiny": {**TINY_VIT, "img_size": 32}},
    {"name": "dino_vits16", "arch": "vit_small_patch16_224", "patch_size": 16,
     "official_file": "dino_deitsmall16_pretrain.pth", "hub": "vit_small_patch16_224.dino",
     "description": "DINO ViT-S/16", "tiny": {**TINY_VIT, "img_size": 64}},
    {"name": "dino_vitb8", "arch": "vit_base_patch8_224", "patch_size": 8,
     "official_file": "dino_vitbase8_pretrain.pth", "hub": "vit_base_patch8_224.dino",
     "description": "DINO ViT-B/8 (ProxyCLIP default)", "tiny": {**TINY_VIT, "img_size": 32}},
    {"name": "dino_vitb16", "arch": "vit_base_patch16_224", "patch_size": 16,
     "official_file": "dino_vitbase16_pretrain.pth", "hub": "vit_base_patch16_224.dino",
     "description": "DINO ViT-B/16", "tiny": {**TINY_VIT, "img_size": 64}},
], pos_offset=0.1)

FAMILY = register_family(VfmFamily("dino", SPECS, make_timm_vit, vit_checkpoint_filter, wrap_vit,
                                    weights=TimmHubFile(), params=VitParams), "DINO ViT (ProxyCLIP's default family)")
