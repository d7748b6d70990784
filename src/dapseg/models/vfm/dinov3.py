"""DINOv3 on timm's ``Eva`` modules (beyond the ProxyCLIP reference).

Features as for DINOv2: last block output after the final norm, CLS and the storage (register)
tokens dropped. Positions are RoPE over the patch grid (timm's port matches the official
``RopePositionEmbedding``), so any window size works without interpolation.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat
from torch import nn

from dapseg.models.vfm.base import (
    VfmFamily,
    VfmOutput,
    VfmSpec,
    VisionFoundationModel,
    register_family,
    specs_from,
)
from dapseg.models.vfm.sources import TimmHubFile
from dapseg.models.vfm.vit import patch_softmax, strip_prefixes

_TINY = {"embed_dim": 64, "depth": 2, "num_heads": 2}
SPECS = specs_from("dinov3", [
    {"name": "dinov3_vits16", "arch": "vit_small_patch16_dinov3",
     "official_file": "dinov3_vits16_pretrain_lvd1689m-*.pth", "hub": "vit_small_patch16_dinov3.lvd1689m",
     "description": "DINOv3 ViT-S/16"},
    {"name": "dinov3_vitb16", "arch": "vit_base_patch16_dinov3",
     "official_file": "dinov3_vitb16_pretrain_lvd1689m-*.pth", "hub": "vit_base_patch16_dinov3.lvd1689m",
     "description": "DINOv3 ViT-B/16"},
    {"name": "dinov3_vitl16", "arch": "vit_large_patch16_dinov3",
     "official_file": "dinov3_vitl16_pretrain_lvd1689m-*.pth", "hub": "vit_large_patch16_dinov3.lvd1689m",
     "description": "DINOv3 ViT-L/16"},
], patch_size=16, tiny=_TINY)


def eva_attn_logits(
    block: torch.nn.Module, x: torch.Tensor, rope: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-softmax attention of a timm ``EvaBlock`` on tokens ``x`` (B, T, D), RoPE applied to the
    patch tokens as the block does: (q·kᵀ·scale (B, H, T, T), v (B, H, T, d))."""
    attn = block.attn
    h = block.norm1(x)
    b, t, _ = h.shape
    if attn.qkv is not None:
        bias = None if attn.q_bias is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        qkv = F.linear(h, attn.qkv.weight, attn.qkv.bias if bias is None else bias)
        q, k, v = qkv.reshape(b, t, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q, k, v = (
            p(h).reshape(b, t, attn.num_heads, -1).transpose(1, 2)
            for p in (attn.q_proj, attn.k_proj, attn.v_proj)
        )
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        npt = attn.num_prefix_tokens
        half = getattr(attn, "rotate_half", False)
        q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2).type_as(v)
    return (q * attn.scale) @ k.transpose(-2, -1), v


class Dinov3Vfm(VisionFoundationModel):
    """DINOv3 over a timm ``Eva`` (``self.eva``)."""

    def __init__(self, spec: VfmSpec, eva: torch.nn.Module) -> None:
        super().__init__(spec, embed_dim=eva.embed_dim, num_heads=eva.blocks[-1].attn.num_heads)
        self.eva = eva

    def tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int]]:
        """Normalised image -> (tokens (B, 1 + R + h·w, C), RoPE table for the grid, grid)."""
        eva = self.eva
        patches = eva.patch_embed.proj(x)  # (B, C, h, w)
        grid = (patches.shape[-2], patches.shape[-1])
        patches = eva.patch_embed.norm(patches.flatten(2).transpose(1, 2))
        if eva.pos_embed is not None:
            raise RuntimeError(f"{self.name}: absolute position embeddings are not expected for DINOv3")
        b = x.shape[0]
        prefix = [t.expand(b, -1, -1) for t in (eva.cls_token, eva.reg_token) if t is not None]
        tokens = eva.norm_pre(eva.pos_drop(torch.cat([*prefix, patches], dim=1)))
        rope = eva.rope.get_embed(shape=grid) if eva.rope is not None else None
        return tokens, rope, grid

    def encode(self, x: torch.Tensor, return_attn: bool) -> VfmOutput:
        eva = self.eva
        t, rope, (h, w) = self.tokens(x)
        for blk in eva.blocks[:-1]:
            t = blk(t, rope=rope)
        attn = None
        if return_attn:
            attn = patch_softmax(eva_attn_logits(eva.blocks[-1], t, rope)[0], eva.num_prefix_tokens)
        t = eva.norm(eva.blocks[-1](t, rope=rope))
        feats = t[:, eva.num_prefix_tokens :].transpose(1, 2).reshape(x.shape[0], -1, h, w)
        return VfmOutput(feats, attn)


def make_eva(spec: VfmSpec, tiny: bool) -> nn.Module:
    """timm's ``Eva`` of ``spec.arch`` (random init)."""
    return timm.create_model(spec.arch, pretrained=False, num_classes=0, **(dict(spec.tiny) if tiny else {}))


def eva_checkpoint_filter(sd: dict[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    """Official DINOv3 (or timm hub) keys -> timm Eva keys: timm's Eva ``checkpoint_filter_fn``."""
    from timm.models.eva import checkpoint_filter_fn

    return checkpoint_filter_fn(strip_prefixes(sd), module)


FAMILY = register_family(
    VfmFamily("dinov3", SPECS, make_eva, eva_checkpoint_filter,
              lambda spec, module, params, window_size: Dinov3Vfm(spec, module), weights=TimmHubFile()),
    "DINOv3 ViT (RoPE, beyond the reference)",
)
