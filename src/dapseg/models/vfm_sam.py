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

from functools import partial

import torch
from segment_anything.modeling.image_encoder import ImageEncoderViT, add_decomposed_rel_pos
from torch import nn

from dapseg.models.vfm import VfmOutput, VfmSpec, VisionFoundationModel

SAM_IMAGE_SIZE = 1024

# segment-anything's build_sam hyper-parameters: (embed_dim, depth, heads, global-attention blocks)
SAM_ARCHS: dict[str, tuple[int, int, int, tuple[int, ...]]] = {
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
}


def make_sam_encoder(arch: str, *, tiny: bool) -> ImageEncoderViT:
    """An ``ImageEncoderViT`` as segment-anything builds it (tiny: 2 blocks, width 32, the last global)."""
    if tiny:
        dim, depth, heads, global_idx, out_chans = 32, 2, 2, (1,), 32
    else:
        dim, depth, heads, global_idx = SAM_ARCHS[arch]
        out_chans = 256
    return ImageEncoderViT(
        img_size=SAM_IMAGE_SIZE,
        patch_size=16,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=4,
        out_chans=out_chans,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=14,
        global_attn_indexes=global_idx,
    )


def randomize_position_terms(enc: ImageEncoderViT, std: float = 0.02) -> None:
    """segment-anything zero-initialises pos_embed and rel_pos; random weights get small noise
    instead, so that random models depend on position as trained ones do."""
    with torch.no_grad():
        if enc.pos_embed is not None:
            enc.pos_embed.normal_(0.0, std)
        for blk in enc.blocks:
            if blk.attn.use_rel_pos:
                blk.attn.rel_pos_h.normal_(0.0, std)
                blk.attn.rel_pos_w.normal_(0.0, std)


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

    def __init__(self, spec: VfmSpec, encoder: ImageEncoderViT, *, tiny: bool) -> None:
        super().__init__(
            spec,
            embed_dim=encoder.neck[0].out_channels,
            num_heads=encoder.blocks[-1].attn.num_heads,
            tiny=tiny,
        )
        self.encoder = encoder

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        return SAM_IMAGE_SIZE, SAM_IMAGE_SIZE

    def _encode(self, x: torch.Tensor, return_attn: bool) -> VfmOutput:
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
