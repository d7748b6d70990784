"""DINO, DINOv2 and MAE on timm's VisionTransformer modules, with the official token pipeline.

timm resamples position embeddings its own way (bicubic to a size, antialiased); the official
DINO / DINOv2 code does it differently (DINO and plain DINOv2: bicubic with a *scale factor*
(h' + 0.1) / M, no antialias; DINOv2 with registers: bicubic to the size, antialiased). So this
module runs its own forward over timm's submodules (patch_embed.proj, cls/reg tokens, blocks,
norm) and does the official interpolation itself; the blocks are timm's, unchanged.

``vfm.params.features`` (DINO, DINOv2, MAE) chooses what ``feats`` holds: ``output`` (the default,
as ProxyCLIP) is the last block's output after the final norm; ``qk`` is q + k of the last block's
attention (its qkv projection of norm1(x), summed before the split into heads), as CorrCLIP takes
its correlation features (its reference hooks ``blocks[-1].attn.qkv`` and adds the q and k thirds).
Both drop the prefix tokens (CLS, registers).
"""

from __future__ import annotations

import math
from typing import Literal

import timm
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from dapseg.models.vfm.base import VfmOutput, VfmSpec, VisionFoundationModel

TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2}  # the tiny test variant of every timm ViT

VitFeatures = Literal["output", "qk"]


class VitParams(BaseModel):
    """``vfm.params`` of the timm ViT families (DINO, DINOv2, MAE)."""

    model_config = ConfigDict(extra="forbid")

    features: VitFeatures = Field(
        "output", description="output: last block after the final norm (ProxyCLIP); "
        "qk: q + k of the last block's attention, before the head split (CorrCLIP)")


def interpolate_patch_pos(
    pos: torch.Tensor, grid: tuple[int, int], pixels: tuple[int, int], *, offset: float, antialias: bool
) -> torch.Tensor:
    """Official DINO/DINOv2 resampling of patch position embeddings (1, M·M, C) -> (1, h·w, C).

    Like the official code it returns ``pos`` unchanged when the token count already matches and the
    input is square in pixels, even when a slightly non-square input floors to the same grid.
    """
    n, dim = pos.shape[1], pos.shape[2]
    m = math.isqrt(n)
    if m * m != n:
        raise ValueError(f"position embedding has {n} patch entries, not a square grid")
    h, w = grid
    if h * w == n and pixels[0] == pixels[1]:
        return pos
    src = pos.float().reshape(1, m, m, dim).permute(0, 3, 1, 2)  # (1, C, M, M)
    if offset:
        # official: scale factor, not size; the offset avoids flooring to h' - 1 (DINO issue #8)
        out = F.interpolate(
            src, scale_factor=((h + offset) / m, (w + offset) / m), mode="bicubic", antialias=antialias
        )
    else:
        out = F.interpolate(src, size=(h, w), mode="bicubic", antialias=antialias)
    if tuple(out.shape[-2:]) != (h, w):
        raise RuntimeError(f"position interpolation gave {tuple(out.shape[-2:])}, expected {(h, w)}")
    return out.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(pos.dtype)


def resize_pos_embed_mae(pos: torch.Tensor, num_prefix: int, size: int) -> torch.Tensor:
    """MAE's one-off resize at build time (their ``interpolate_pos_embed``): bicubic to a size,
    align_corners=False, no antialias; prefix (CLS) entries kept. (1, P + M·M, C) -> (1, P + s·s, C)."""
    prefix, patch = pos[:, :num_prefix], pos[:, num_prefix:]
    m = math.isqrt(patch.shape[1])
    if m == size:
        return pos
    grid = patch.reshape(1, m, m, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=False)
    return torch.cat([prefix, grid.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


def vit_attn_logits(block: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-softmax attention of a timm ``Block`` on tokens ``x`` (B, T, D): (q·kᵀ·scale (B, H, T, T), v)."""
    attn = block.attn
    h = block.norm1(x)
    b, t, _ = h.shape
    qkv = attn.qkv(h).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # each (B, H, T, d)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return (q * attn.scale) @ k.transpose(-2, -1), v


def patch_softmax(logits: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Softmax over patch keys of the patch-query rows: (B, H, T, T) -> (B, H, N, N)."""
    return logits[:, :, num_prefix:, num_prefix:].softmax(dim=-1)


class TimmVitVfm(VisionFoundationModel):
    """DINO / DINOv2 / MAE over a timm ``VisionTransformer`` (``self.vit``)."""

    def __init__(
        self, spec: VfmSpec, vit: torch.nn.Module, *, window_size: int | None = None, features: VitFeatures = "output"
    ) -> None:
        """``window_size``: the model is built at that size and every input is resized to it (MAE:
        the reference resizes every window to slide_crop²); None: inputs are fed at their own size.
        ``features``: what ``feats`` holds (``VitParams``)."""
        super().__init__(spec, embed_dim=vit.embed_dim, num_heads=vit.blocks[-1].attn.num_heads)
        self.vit = vit
        self.window_size = window_size
        self.features = features

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        if self.window_size is not None:
            return self.window_size, self.window_size
        return height, width

    def _pos_split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(prefix entries (1, P, C) — empty when the prefix tokens carry no position —, patch entries)."""
        vit = self.vit
        n_pos_prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
        return vit.pos_embed[:, :n_pos_prefix], vit.pos_embed[:, n_pos_prefix:]

    def tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Normalised image (B, 3, H, W) -> tokens entering the first block (B, P + h·w, C), grid."""
        vit = self.vit
        patches = vit.patch_embed.proj(x)  # (B, C, h, w); the stride-p conv floors H/p and W/p
        grid = (patches.shape[-2], patches.shape[-1])
        patches = vit.patch_embed.norm(patches.flatten(2).transpose(1, 2))  # (B, h·w, C)
        prefix_pos, patch_pos = self._pos_split()
        if self.window_size is not None:
            if patch_pos.shape[1] != grid[0] * grid[1]:
                raise RuntimeError(f"{self.name}: built for {patch_pos.shape[1]} patches, got grid {grid}")
        else:
            patch_pos = interpolate_patch_pos(
                patch_pos,
                grid,
                (x.shape[-2], x.shape[-1]),
                offset=self.spec.pos_offset,
                antialias=self.spec.pos_antialias,
            )
        b = x.shape[0]
        prefix = [t.expand(b, -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
        if vit.no_embed_class:  # DINOv2 + registers in timm layout: CLS already holds its position
            tokens = torch.cat([*prefix, patches + patch_pos], dim=1)
        else:
            tokens = torch.cat([*prefix, patches], dim=1) + torch.cat([prefix_pos, patch_pos], dim=1)
        return vit.norm_pre(vit.pos_drop(tokens)), grid

    def encode(self, x: torch.Tensor, return_attn: bool) -> VfmOutput:
        vit = self.vit
        t, (h, w) = self.tokens(x)
        for blk in vit.blocks[:-1]:
            t = blk(t)
        attn = None
        if return_attn:
            attn = patch_softmax(vit_attn_logits(vit.blocks[-1], t)[0], vit.num_prefix_tokens)
        if self.features == "qk":
            q, k, _ = vit.blocks[-1].attn.qkv(vit.blocks[-1].norm1(t)).chunk(3, dim=-1)  # (B, T, C) each
            t = q + k  # before the head split (and before any q/k norm), as CorrCLIP's hook sees it
        else:
            t = vit.norm(vit.blocks[-1](t))  # final norm, as get_intermediate_layers / MAE's norm(x[:, 1:])
        patches = t[:, vit.num_prefix_tokens :]  # (B, h·w, C), CLS / registers dropped
        feats = patches.transpose(1, 2).reshape(x.shape[0], -1, h, w)
        return VfmOutput(feats, attn)


def make_timm_vit(spec: VfmSpec, tiny: bool) -> nn.Module:
    """timm's ``VisionTransformer`` of ``spec.arch`` at its checkpoint's native size, random init.

    timm's own init takes ~10 s for a ViT-B on 2 cores; with 'skip' the layers keep PyTorch's
    default random init (LayerScale its constant), but pos_embed / cls / reg tokens are left as
    uninitialised memory, so we draw them here (timm: std 0.02 for positions).
    """
    kwargs = dict(spec.tiny) if tiny else {}
    vit = timm.create_model(spec.arch, pretrained=False, num_classes=0, weight_init="skip", **kwargs)
    with torch.no_grad():
        for tok in (vit.pos_embed, vit.cls_token, vit.reg_token):
            if tok is not None:
                tok.normal_(0.0, 0.02)
    return vit


def strip_prefixes(sd: dict[str, torch.Tensor], prefixes: tuple[str, ...] = ("module.", "backbone.")
                   ) -> dict[str, torch.Tensor]:
    """Official checkpoints' wrapper prefixes removed from every key."""
    out = {}
    for k, v in sd.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p) :]
        out[k] = v
    return out


def vit_checkpoint_filter(sd: dict[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    """Official DINO / DINOv2 / MAE (or timm hub) keys -> timm ViT keys: prefixes stripped, the unused
    projection ``head.*`` dropped, then timm's own ``checkpoint_filter_fn`` (DINOv2 registers etc.)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    sd = {k: v for k, v in strip_prefixes(sd).items() if not k.startswith("head.")}
    return checkpoint_filter_fn(sd, module)


def wrap_vit(spec: VfmSpec, module: nn.Module, params: VitParams | None, window_size: int) -> VisionFoundationModel:
    """A ViT fed at each window's own size (DINO, DINOv2)."""
    return TimmVitVfm(spec, module, features=(params or VitParams()).features)
