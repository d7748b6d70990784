"""SAM's image encoder (segment-anything's own ``ImageEncoderViT``) as a VFM.

segment-anything rather than timm's ``samvit_*`` port: it is the module the references
(ProxyCLIP ``sam_model_registry``, Trident) run, so official checkpoints load by stripping the
``image_encoder.`` prefix and the features are the official ones by construction.

Features: the neck output (B, 256, 64, 64) of the window bilinearly resized to 1024×1024.
Attention: the last block, which is a global-attention block in every SAM variant (global indexes
end with depth - 1): softmax(q·kᵀ·scale + decomposed relative-position terms), exactly the map the
block applies (segment-anything's ``add_decomposed_rel_pos`` adds, for query (i_h, i_w) and key
(j_h, j_w), q·R_h[i_h - j_h] + q·R_w[i_w - j_w] before the softmax). There are no prefix tokens.
"""

from __future__ import annotations

import torch
from segment_anything.modeling.image_encoder import ImageEncoderViT, add_decomposed_rel_pos
from torch import nn

from dapseg.models.sam.build import (
    SAM_IMAGE_SIZE,
    SAM_URL,
    SAM_VARIANTS,
    decoder_tensors,
    make_image_encoder,
    randomize_position_terms,
)
from dapseg.models.vfm.base import (
    FamilyTraits,
    VfmFamily,
    VfmOutput,
    VfmSpec,
    VisionFoundationModel,
    register_family,
    specs_from,
)
from dapseg.models.vfm.sources import UrlFile

# The VFM entries of the released SAMs, from the one variant table (models/sam/build.py).
SPECS = specs_from("sam", [
    {"name": f"sam_{variant.replace('_', '')}", "arch": variant, "official_file": v.release_file,
     "hub": SAM_URL + v.release_file,
     "description": f"SAM {variant.upper().replace('_', '-').replace('VIT', 'ViT')} image encoder "
                    "(input resized to 1024x1024)"}
    for variant, v in SAM_VARIANTS.items()
], patch_size=16)

def sam_attn_logits(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-softmax attention of a global SAM block on x (B, H, W, C): ((B, heads, N, N), v (B, heads, N, d)).
    """
    if block.window_size > 0:
        raise ValueError("attention is taken from a global-attention block only")
    attn = block.attn
    h = block.norm1(x)
    b, gh, gw, _ = h.shape
    qkv = attn.qkv(h).reshape(b, gh * gw, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, b * attn.num_heads, gh * gw, -1).unbind(0)  # (B·heads, N, d)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if attn.use_rel_pos:
        logits = add_decomposed_rel_pos(logits, q, attn.rel_pos_h, attn.rel_pos_w, (gh, gw), (gh, gw))
    n = gh * gw
    return logits.view(b, attn.num_heads, n, n), v.view(b, attn.num_heads, n, -1)


class SamVfm(VisionFoundationModel):
    """SAM image encoder (``self.encoder``); every input is resized to 1024×1024."""

    def __init__(self, spec: VfmSpec, encoder: ImageEncoderViT) -> None:
        super().__init__(
            spec,
            embed_dim=encoder.neck[0].out_channels,
            num_heads=encoder.blocks[-1].attn.num_heads,
        )
        self.encoder = encoder

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        return SAM_IMAGE_SIZE, SAM_IMAGE_SIZE

    def encode(self, x: torch.Tensor, return_attn: bool) -> VfmOutput:
        enc = self.encoder
        t = enc.patch_embed(x)  # (B, 64, 64, C) channels-last
        if enc.pos_embed is not None:
            t = t + enc.pos_embed
        for blk in enc.blocks[:-1]:
            t = blk(t)
        attn = sam_attn_logits(enc.blocks[-1], t)[0].softmax(dim=-1) if return_attn else None
        t = enc.blocks[-1](t)
        feats = enc.neck(t.permute(0, 3, 1, 2))  # (B, out_chans, 64, 64), as image_encoder(x)
        return VfmOutput(feats, attn)


def _sam_filter(sd: dict[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    """The whole SAM's release file -> the image encoder's keys (``image_encoder.`` entries, prefix
    stripped); a file of encoder keys alone is taken as is."""
    if any(k.startswith("image_encoder.") for k in sd):
        return {k[len("image_encoder.") :]: v for k, v in sd.items() if k.startswith("image_encoder.")}
    return dict(sd)


FAMILY = register_family(
    VfmFamily(
        "sam", SPECS, lambda spec, tiny: make_image_encoder(spec.arch, tiny=tiny), _sam_filter,
        lambda spec, module, params, window_size: SamVfm(spec, module), weights=UrlFile(),
        init_random=randomize_position_terms, checkpoint_extras=decoder_tensors,
        traits=FamilyTraits(sam_decoder=True),
    ),
    "SAM image encoder (segment-anything)",
)
