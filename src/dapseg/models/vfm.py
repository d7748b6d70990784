"""Vision foundation models (VFMs) that give ProxyCLIP-style proxy features.

``build_vfm(cfg, ...)`` returns a ``VisionFoundationModel``: an ``nn.Module`` whose ``forward`` takes
images (B, 3, H, W) with values in [0, 1], applies ImageNet mean/std normalisation and the model's
own resizing, and returns ``VfmOutput(feats (B, C, h', w'), attn (B, heads, N', N') | None)`` with
N' = h'·w' patch tokens (CLS / register tokens dropped everywhere).

Which features (facts read from the public reference mc-lan/ProxyCLIP, ``proxyclip_segmentor.py``):

* DINO (``get_intermediate_layers(x)[0]``): last block output after the final LayerNorm, CLS
  dropped; the window is fed at its own size, position embeddings interpolated as official DINO
  does (bicubic, ``scale_factor = (h' + 0.1) / M``).
* DINOv2 (``get_intermediate_layers(x, reshape=True)[0]``, ``norm=True`` by default): last block
  output after the final norm, CLS and registers dropped; official interpolation (without
  registers: bicubic, ``scale_factor = (h' + 0.1) / M``, no antialias; with registers: bicubic to
  size (h', w') with antialias).
* MAE (their ``models_vit`` with ``global_pool=False``): ``norm(x[:, 1:])`` after the last block,
  built at the window size (position embeddings resized once, bicubic to size, no antialias) and
  the window bilinearly resized to window_size × window_size.
* SAM (``image_encoder(x)``): the neck output (B, 256, 64, 64) after bilinear resize to 1024×1024.
* DINOv3 (beyond the reference): like DINOv2 — last block after the final norm, CLS and the
  4 storage tokens dropped; RoPE needs no interpolation.

``attn`` is the last block's attention softmax(q·kᵀ·scale [+ SAM's decomposed relative-position
terms]) restricted to patch tokens: the prefix tokens are removed from both axes *before* the
softmax, so every row sums to 1 over the N' patches.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dapseg.config import VfmConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Family = Literal["dino", "dinov2", "mae", "sam", "dinov3"]


class VfmOutput(NamedTuple):
    feats: torch.Tensor  # (B, C, h', w')
    attn: torch.Tensor | None  # (B, heads, h'·w', h'·w'), rows sum to 1; None unless requested


@dataclass(frozen=True)
class VfmSpec:
    """One registry entry: which architecture, where its weights come from, how it is fed."""

    name: str
    family: Family
    arch: str  # timm model name (without tag) or segment-anything variant ("vit_b", ...)
    patch_size: int
    official_file: str  # the official release file ``--vfm-weights`` expects (for messages)
    hub: str  # timm hub tag ("timm/<arch>.<tag>") or the official URL (SAM)
    description: str
    pos_offset: float = 0.0  # official interpolation: scale_factor (h' + offset) / M when > 0
    pos_antialias: bool = False
    tiny: dict[str, Any] = field(default_factory=dict)  # overrides giving the tiny test variant

    @property
    def built_at_window_size(self) -> bool:
        """MAE is built at the sliding-window size (the one place MAE is recognised: its family)."""
        return self.family == "mae"


_TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2}
_SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"

_SPECS: tuple[VfmSpec, ...] = (
    VfmSpec(
        "dino_vits8",
        "dino",
        "vit_small_patch8_224",
        8,
        "dino_deitsmall8_pretrain.pth",
        "vit_small_patch8_224.dino",
        "DINO ViT-S/8",
        0.1,
        False,
        {**_TINY_VIT, "img_size": 32},
    ),
    VfmSpec(
        "dino_vits16",
        "dino",
        "vit_small_patch16_224",
        16,
        "dino_deitsmall16_pretrain.pth",
        "vit_small_patch16_224.dino",
        "DINO ViT-S/16",
        0.1,
        False,
        {**_TINY_VIT, "img_size": 64},
    ),
    VfmSpec(
        "dino_vitb8",
        "dino",
        "vit_base_patch8_224",
        8,
        "dino_vitbase8_pretrain.pth",
        "vit_base_patch8_224.dino",
        "DINO ViT-B/8 (ProxyCLIP default)",
        0.1,
        False,
        {**_TINY_VIT, "img_size": 32},
    ),
    VfmSpec(
        "dino_vitb16",
        "dino",
        "vit_base_patch16_224",
        16,
        "dino_vitbase16_pretrain.pth",
        "vit_base_patch16_224.dino",
        "DINO ViT-B/16",
        0.1,
        False,
        {**_TINY_VIT, "img_size": 64},
    ),
    VfmSpec(
        "dinov2_vitb14",
        "dinov2",
        "vit_base_patch14_dinov2",
        14,
        "dinov2_vitb14_pretrain.pth",
        "vit_base_patch14_dinov2.lvd142m",
        "DINOv2 ViT-B/14",
        0.1,
        False,
        {**_TINY_VIT, "img_size": 56},
    ),
    VfmSpec(
        "dinov2_vitb14_reg",
        "dinov2",
        "vit_base_patch14_reg4_dinov2",
        14,
        "dinov2_vitb14_reg4_pretrain.pth",
        "vit_base_patch14_reg4_dinov2.lvd142m",
        "DINOv2 ViT-B/14 with 4 registers",
        0.0,
        True,
        {**_TINY_VIT, "img_size": 56},
    ),
    VfmSpec(
        "mae_vitb16",
        "mae",
        "vit_base_patch16_224",
        16,
        "mae_pretrain_vit_base.pth",
        "vit_base_patch16_224.mae",
        "MAE ViT-B/16 (built at the window size)",
        tiny={**_TINY_VIT},
    ),
    VfmSpec(
        "sam_vitb",
        "sam",
        "vit_b",
        16,
        "sam_vit_b_01ec64.pth",
        _SAM_URL + "sam_vit_b_01ec64.pth",
        "SAM ViT-B image encoder (input resized to 1024x1024)",
    ),
    VfmSpec(
        "sam_vitl",
        "sam",
        "vit_l",
        16,
        "sam_vit_l_0b3195.pth",
        _SAM_URL + "sam_vit_l_0b3195.pth",
        "SAM ViT-L image encoder (input resized to 1024x1024)",
    ),
    VfmSpec(
        "sam_vith",
        "sam",
        "vit_h",
        16,
        "sam_vit_h_4b8939.pth",
        _SAM_URL + "sam_vit_h_4b8939.pth",
        "SAM ViT-H image encoder (input resized to 1024x1024)",
    ),
    VfmSpec(
        "dinov3_vits16",
        "dinov3",
        "vit_small_patch16_dinov3",
        16,
        "dinov3_vits16_pretrain_lvd1689m-*.pth",
        "vit_small_patch16_dinov3.lvd1689m",
        "DINOv3 ViT-S/16",
        tiny={"embed_dim": 64, "depth": 2, "num_heads": 2},
    ),
    VfmSpec(
        "dinov3_vitb16",
        "dinov3",
        "vit_base_patch16_dinov3",
        16,
        "dinov3_vitb16_pretrain_lvd1689m-*.pth",
        "vit_base_patch16_dinov3.lvd1689m",
        "DINOv3 ViT-B/16",
        tiny={"embed_dim": 64, "depth": 2, "num_heads": 2},
    ),
    VfmSpec(
        "dinov3_vitl16",
        "dinov3",
        "vit_large_patch16_dinov3",
        16,
        "dinov3_vitl16_pretrain_lvd1689m-*.pth",
        "vit_large_patch16_dinov3.lvd1689m",
        "DINOv3 ViT-L/16",
        tiny={"embed_dim": 64, "depth": 2, "num_heads": 2},
    ),
)
VFM_SPECS: dict[str, VfmSpec] = {s.name: s for s in _SPECS}


def list_vfms() -> list[str]:
    """Names accepted by ``build_vfm`` (``VfmConfig.name``)."""
    return list(VFM_SPECS)


def vfm_spec(name: str) -> VfmSpec:
    """The registry entry for ``name``; ValueError listing the valid names otherwise."""
    try:
        return VFM_SPECS[name]
    except KeyError:
        raise ValueError(f"unknown VFM {name!r}; valid names: {', '.join(VFM_SPECS)}") from None


class VisionFoundationModel(nn.Module):
    """Base class: normalisation, resizing, input checks. Subclasses implement ``_encode``."""

    def __init__(self, spec: VfmSpec, *, embed_dim: int, num_heads: int, tiny: bool) -> None:
        super().__init__()
        self.spec = spec
        self.name = spec.name
        self.family = spec.family
        self.patch_size = spec.patch_size
        self.embed_dim = embed_dim  # C of ``feats``
        self.num_heads = num_heads  # heads of ``attn``
        self.tiny = tiny
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """The (H, W) the encoder sees for a (height, width) input (after this model's resize)."""
        return height, width

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """The feature grid (h', w') for an input of (height, width) pixels."""
        h, w = self.input_size(height, width)
        return h // self.patch_size, w // self.patch_size

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        size = self.input_size(x.shape[-2], x.shape[-1])
        if tuple(x.shape[-2:]) == size:
            return x
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, return_attn: bool = False) -> VfmOutput:
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(
                f"{self.name}: images must be a float tensor (B, 3, H, W) in [0, 1], "
                f"got {tuple(images.shape)} {images.dtype}"
            )
        gh, gw = self.grid(images.shape[-2], images.shape[-1])
        if gh < 1 or gw < 1:
            raise ValueError(
                f"{self.name}: image {tuple(images.shape[-2:])} is smaller than one "
                f"{self.patch_size}x{self.patch_size} patch"
            )
        dtype = self.mean.dtype
        # Normalise then resize, in the reference's order (both are linear, so it commutes anyway).
        x = (images.to(dtype) - self.mean) / self.std
        x = self._resize(x)
        return self._encode(x, return_attn)

    def _encode(self, x: torch.Tensor, return_attn: bool) -> VfmOutput:
        raise NotImplementedError


def build_vfm(
    cfg: VfmConfig,
    *,
    random_weights: bool = False,
    tiny: bool = False,
    cache_dir: str | os.PathLike | None = None,
    window_size: int = 336,
    device: str | torch.device | None = None,
) -> VisionFoundationModel:
    """Build the VFM ``cfg.name`` in eval mode with frozen parameters.

    Weights: ``cfg.weights`` (an official release file) if given; else ``random_weights`` (random
    init, never the network); else the pretrained weights from the cache, downloaded when online
    (``dapseg.weights.WeightsMissingError`` when offline and not cached). ``tiny`` builds a small
    variant of the same family for tests: random weights unless ``cfg.weights`` names a file of
    that tiny shape (no tiny checkpoints are published).
    ``window_size`` matters only for MAE, which ProxyCLIP builds at the sliding-window size.
    """
    from dapseg.models import vfm_loading

    spec = vfm_spec(cfg.name)
    if window_size < spec.patch_size:
        raise ValueError(f"window_size {window_size} is smaller than the patch size {spec.patch_size}")
    model = vfm_loading.build_with_weights(
        spec,
        weights=cfg.weights,
        random_weights=random_weights or (tiny and cfg.weights is None),
        tiny=tiny,
        cache_dir=cache_dir,
        window_size=window_size,
    )
    model.eval().requires_grad_(False)
    return model.to(device) if device is not None else model
