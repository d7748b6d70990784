"""MAE (He et al., 2022) on timm's ViT (``vit.py``), as ProxyCLIP runs it: built at the sliding-window
size (the checkpoint's 14×14 position grid resized once, bicubic to the size, as MAE's
``interpolate_pos_embed``), every window bilinearly resized to window_size², features ``norm(x[:, 1:])``.
MAE is recognised in one way only: its family (``VfmSpec.built_at_window_size``)."""

from __future__ import annotations

from torch import nn

from dapseg.models.vfm.base import VfmFamily, VfmSpec, VisionFoundationModel, specs_from
from dapseg.models.vfm.vit import TINY_VIT, make_timm_vit, resize_pos_embed_mae, vit_checkpoint_filter, wrap_vit
from dapseg.registry import VFM_FAMILIES

SPECS = specs_from("mae", [
    {"name": "mae_vitb16", "arch": "vit_base_patch16_224", "patch_size": 16,
     "official_file": "mae_pretrain_vit_base.pth", "hub": "vit_base_patch16_224.mae",
     "description": "MAE ViT-B/16 (built at the window size)", "tiny": {**TINY_VIT}},
])


def wrap_mae(spec: VfmSpec, module: nn.Module, window_size: int) -> VisionFoundationModel:
    """Built at the window size: the (checkpoint's) position grid is resized once, MAE-style."""
    grid = window_size // spec.patch_size
    module.pos_embed = nn.Parameter(resize_pos_embed_mae(module.pos_embed.data, module.num_prefix_tokens, grid))
    return wrap_vit(spec, module, window_size)


FAMILY = VfmFamily("mae", SPECS, make_timm_vit, vit_checkpoint_filter, wrap_mae)
VFM_FAMILIES.register("mae", description="MAE ViT, built at the window size")(lambda: FAMILY)
