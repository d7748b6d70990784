"""Vision foundation models (VFMs) that give ProxyCLIP-style proxy features.

``build_vfm(cfg, ...)`` returns a ``VisionFoundationModel``: an ``nn.Module`` whose ``forward`` takes
images (B, 3, H, W) with values in [0, 1], applies its spec's mean/std normalisation (ImageNet's
for the ViTs) and the model's own resizing, and returns
``VfmOutput(feats (B, C, h', w'), attn (B, heads, N', N') | None)`` with N' = h'·w' patch tokens
(CLS / register tokens dropped everywhere).

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
* Stable Diffusion (``sd.py``, ProxyCLIP Table 2): a UNet feature map at t = 0 of the window resized
  to 672², VAE latents, empty-prompt conditioning (no attention).

``attn`` is the last block's attention softmax(q·kᵀ·scale [+ SAM's decomposed relative-position
terms]) restricted to patch tokens: the prefix tokens are removed from both axes *before* the
softmax, so every row sums to 1 over the N' patches.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import nn

from dapseg.registry import VFM_FAMILIES

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VfmOutput(NamedTuple):
    feats: torch.Tensor  # (B, C, h', w')
    attn: torch.Tensor | None  # (B, heads, h'·w', h'·w'), rows sum to 1; None unless requested


@dataclass(frozen=True, kw_only=True)
class VfmSpec:
    """One VFM a family offers: which architecture, where its weights come from, how it is fed.

    A family needs only ``name``, ``family``, ``patch_size`` and its normalisation (``mean``, ``std``);
    the other fields serve the families built on timm / segment-anything and their releases."""

    name: str
    family: str  # a registered VFM family (dapseg.registry.VFM_FAMILIES)
    patch_size: int  # pixels per feature cell
    mean: tuple[float, float, float] = IMAGENET_MEAN  # input normalisation: (x - mean) / std per channel
    std: tuple[float, float, float] = IMAGENET_STD
    description: str = ""  # for listings and messages (empty: the name)
    arch: str | None = None  # timm model name (without tag) or segment-anything variant ("vit_b", ...)
    official_file: str | None = None  # the official release file ``--vfm-weights`` expects (for messages)
    hub: str | None = None  # timm hub tag ("timm/<arch>.<tag>"), the official URL (SAM) or a hub repository
    pos_offset: float = 0.0  # official interpolation: scale_factor (h' + offset) / M when > 0
    pos_antialias: bool = False
    tiny: dict[str, Any] = field(default_factory=dict)  # overrides giving the tiny test variant
    arch_config: dict[str, Any] = field(default_factory=dict)  # architecture settings (families without timm)


class VisionFoundationModel(nn.Module):
    """Base class: normalisation, resizing, input checks. Subclasses implement ``encode``."""

    def __init__(self, spec: VfmSpec, *, embed_dim: int, num_heads: int) -> None:
        super().__init__()
        self.spec = spec
        self.name = spec.name
        self.family = spec.family  # the family's name (for reports; never branched on outside models/vfm)
        self.traits = FamilyTraits()  # set by ``loading.build_vfm`` from the family
        self.patch_size = spec.patch_size
        self.embed_dim = embed_dim  # C of ``feats``
        self.num_heads = num_heads  # heads of ``attn``
        self.checkpoint_extras: dict[str, torch.Tensor] = {}  # see VfmFamily.checkpoint_extras
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

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
        return self.encode(x, return_attn)

    def encode(self, x: torch.Tensor, return_attn: bool) -> VfmOutput:
        """The family's forward: normalised, resized images (B, 3, H', W') -> ``VfmOutput`` (feats
        (B, C, h', w') with (h', w') = ``grid`` of the input; attn over the patch tokens, or None when
        ``return_attn`` is false or the model has none)."""
        raise NotImplementedError


@dataclass(frozen=True)
class FamilyTraits:
    """What the rest of the package may know about a family, declared instead of checked by name."""

    built_at_window_size: bool = False  # the model is built for ``inference.crop`` (rebuilt when it changes)
    sam_decoder: bool = False  # a segment-anything mask decoder can go around it (DAP's SAM regions, SAM refiners)
    fsa_lambda: float | None = None  # the λ FSA takes by default with this VFM (None: FSA's CLIP-based default)


class WeightsSource(Protocol):
    """Where a family's pretrained weights come from and how they are cached (``sources.py``)."""

    folder: bool  # True: the weights are a folder of files (``vfm.weights`` names a directory)

    def describe(self, spec: VfmSpec) -> str: ...  # for messages: where the weights come from
    def host(self, spec: VfmSpec) -> str: ...  # probed before downloading (offline check)
    def cached(self, spec: VfmSpec, cache_dir: str | os.PathLike[str] | None) -> Path | None: ...
    def download(self, spec: VfmSpec, cache_dir: str | os.PathLike[str] | None) -> Path: ...


@dataclass(frozen=True)
class NoWeights:
    """The weights source of a family that publishes nothing to download: a weights file is given
    (``vfm.weights`` / ``--vfm-weights``), or the model runs with random weights."""

    folder: bool = False

    def describe(self, spec: VfmSpec) -> str:
        return "a local file (the family publishes no download; give it with --vfm-weights)"

    def host(self, spec: VfmSpec) -> str:
        return ""  # no network involved

    def cached(self, spec: VfmSpec, cache_dir: str | os.PathLike[str] | None) -> Path | None:
        return None

    def download(self, spec: VfmSpec, cache_dir: str | os.PathLike[str] | None) -> Path:
        raise FileNotFoundError(f"VFM family {spec.family!r} publishes no weights to download")


# (spec, random-init module, the family's validated ``vfm.params``, window size) -> the wrapped model
Wrap = Callable[[VfmSpec, nn.Module, Any, int], VisionFoundationModel]


def keep_checkpoint(state_dict: dict[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    """The checkpoint filter of a family whose weights files hold the module's own keys: none."""
    return state_dict


def module_is_model(spec: VfmSpec, module: nn.Module, params: Any, window_size: int) -> VisionFoundationModel:
    """The wrap of a family whose ``make_module`` builds the ``VisionFoundationModel`` itself."""
    if not isinstance(module, VisionFoundationModel):
        raise TypeError(f"VFM family {spec.family!r}: make_module built a {type(module).__name__}, not a "
                        "VisionFoundationModel; give the family a wrap function")
    return module


@dataclass(frozen=True)
class VfmFamily:
    """What a VFM family contributes (registered in ``dapseg.registry.VFM_FAMILIES``): its specs as
    data, how to build its bare architecture, where its weights come from and how they are read and
    filtered onto it, how to wrap it, its ``vfm.params`` model and its traits.

    A family of its own (not timm's) needs only ``name``, ``specs`` and ``make_module`` returning its
    ``VisionFoundationModel``: its weights files then hold the model's own keys (given with
    ``--vfm-weights``; no download source), and random weights are the module's own init."""

    name: str
    specs: tuple[VfmSpec, ...]
    make_module: Callable[[VfmSpec, bool], nn.Module]  # (spec, tiny) -> random-init architecture
    # (checkpoint, module) -> the checkpoint with the module's keys
    filter_checkpoint: Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]] = keep_checkpoint
    wrap: Wrap = module_is_model
    weights: WeightsSource = NoWeights()
    init_random: Callable[[nn.Module], None] | None = None  # extra init for random weights
    # Reads the weights (a file, or a folder when ``weights.folder``) into one state dict;
    # None: ``dapseg.weights.load_state_dict_file``.
    read_weights: Callable[[Path], dict[str, torch.Tensor]] | None = None
    # Tensors of the weights file kept beside the module (``VisionFoundationModel.checkpoint_extras``),
    # e.g. SAM's prompt encoder and mask decoder, so that the file is read once.
    checkpoint_extras: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    params: type[BaseModel] | None = None  # the model of ``vfm.params`` (None: the family takes none)
    traits: FamilyTraits = FamilyTraits()


def specs_from(family: str, rows: list[dict[str, Any]], **defaults: Any) -> tuple[VfmSpec, ...]:
    """VfmSpec entries of ``family`` from keyword rows (the family modules' data tables)."""
    return tuple(VfmSpec(family=family, **{**defaults, **row}) for row in rows)


def register_family(family: VfmFamily, description: str = "") -> VfmFamily:
    """Register ``family`` in ``VFM_FAMILIES`` with its params model (what ``vfm.params`` is checked
    against when a config loads). Its specs must name it as their family (``specs_from`` does)."""
    strays = [spec.name for spec in family.specs if spec.family != family.name]
    if not family.specs or strays:
        raise ValueError(f"VFM family {family.name!r} must offer specs of its own (family={family.name!r}), "
                         f"got {'none' if not family.specs else ', '.join(strays)}")
    VFM_FAMILIES.register(family.name, params=family.params, description=description)(lambda *_: family)
    return family
