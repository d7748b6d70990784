"""MAE (He et al., 2022) on timm's ViT (``vit.py``), as ProxyCLIP runs it: built at the sliding-window
size (the checkpoint's 14×14 position grid resized once, bicubic to the size, as MAE's
``interpolate_pos_embed``), every window bilinearly resized to window_size², features ``norm(x[:, 1:])``.
The family declares it is built at the window size and the FSA λ it wants (``FamilyTraits``), so no
other module needs to recognise MAE."""

from __future__ import annotations

from torch import nn

from dapseg.models.vfm.base import FamilyTraits, VfmFamily, VfmSpec, VisionFoundationModel, register_family, specs_from
from dapseg.models.vfm.sources import TimmHubFile
from dapseg.models.vfm.vit import (
    TINY_VIT,
    TimmVitVfm,
    VitParams,
    make_timm_vit,
    resize_pos_embed_mae,
    vit_checkpoint_filter,
)

SPECS = specs_from("mae", [
    {"name": "mae_vitb16", "arch": "vit_base_patch16_224", "patch_size": 16,
     "official_file": "mae_pretrain_vit_base.pth", "hub": "vit_base_patch16_224.mae",
     "description": "MAE ViT-B/16 (built at the window size)", "tiny": {**TINY_VIT}},
])


def wrap_mae(spec: VfmSpec, module: nn.Module, params: VitParams | None, window_size: int) -> VisionFoundationModel:
    """Built at the window size: the (checkpoint's) position grid is resized once, MAE-style."""
    grid = window_size // spec.patch_size
    module.pos_embed = nn.Parameter(resize_pos_embed_mae(module.pos_embed.data, module.num_prefix_tokens, grid))
    return TimmVitVfm(spec, module, window_size=window_size, features=(params or VitParams()).features)


# FSA's reference takes λ = 4.5 whenever the VFM is MAE, whatever the CLIP.
FAMILY = register_family(
    VfmFamily("mae", SPECS, make_timm_vit, vit_checkpoint_filter, wrap_mae, weights=TimmHubFile(), params=VitParams,
              traits=FamilyTraits(built_at_window_size=True, fsa_lambda=4.5)),
    "MAE ViT, built at the window size",
)
