"""Toy components of every kind, registered from *outside* the package through ``dapseg.extend`` only.

Not a test module: ``tests/test_outside_registration.py`` copies this file into a temporary folder and
imports it the way a user does (``dapseg COMMAND --import toys.py``, ``import_components``, or a
``dapseg.components`` entry point). Each component counts its calls in ``CALLS`` so that a test can see
that a command ran it.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from dapseg.extend import (
    HEADS,
    MASK_GENERATORS,
    PLUGINS,
    REFINERS,
    STRATEGIES,
    Attention,
    FamilyTraits,
    Head,
    HeadContext,
    HeadOutput,
    MaskBuild,
    Need,
    Refined,
    RefineInput,
    VfmFamily,
    VfmOutput,
    VfmSpec,
    VisionFoundationModel,
    qkv,
    register_family,
    register_preset,
    specs_from,
)

CALLS: Counter[str] = Counter()

# ----------------------------------------------------------------------------- a VFM family

TOY_MEAN = (0.25, 0.5, 0.75)  # not ImageNet's: the test checks that the family's own normalisation is used
TOY_STD = (0.5, 0.25, 0.125)


class ToyVfm(VisionFoundationModel):
    """One strided convolution: feats (B, C, H/p, W/p) = conv((x - mean) / std); no attention."""

    def __init__(self, spec: VfmSpec, tiny: bool) -> None:
        width = 8 if tiny else 32
        super().__init__(spec, embed_dim=width, num_heads=1)
        self.patch_embed = nn.Conv2d(3, width, spec.patch_size, stride=spec.patch_size)

    def encode(self, x: torch.Tensor, return_attn: bool) -> VfmOutput:
        CALLS["vfm"] += 1
        return VfmOutput(self.patch_embed(x), None)


# Only a name, a patch size and the normalisation: no timm architecture, release file or hub.
TOY_SPECS = specs_from("toyvfm", [{"name": "toyvfm_p16", "patch_size": 16, "mean": TOY_MEAN, "std": TOY_STD}])
register_family(VfmFamily("toyvfm", TOY_SPECS, make_module=ToyVfm, traits=FamilyTraits(fsa_lambda=2.0)),
                "a toy VFM family: one strided convolution")

# ----------------------------------------------------------------------------- a head


class MixParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight: float = Field(0.5, ge=0, le=1)  # share of the uniform attention
    temperature: float = Field(0.1, gt=0)


@HEADS.register("toy_vfm_mix", params=MixParams, needs={Need.VFM_FEATURES})
class VfmMixHead(Head):
    """Attn = w·uniform + (1 − w)·softmax(cos(f_i, f_j) / τ) over the VFM patches f, applied to the CLIP
    values (CLS dropped); the VFM grid equals the CLIP grid (both patch 16)."""

    def __init__(self, params: MixParams) -> None:
        super().__init__()
        self.params = params

    def attention(self, ctx: HeadContext) -> Attention:
        CALLS["head"] += 1
        _, _, v = qkv(ctx.block, ctx.x)
        v = v[:, :, 1:]  # (B, heads, N, d)
        f = F.normalize(ctx.vfm_feats.flatten(2).transpose(1, 2).float(), dim=-1)  # (B, N, C)
        n = f.shape[1]
        affinity = (f @ f.transpose(1, 2) / self.params.temperature).softmax(-1)  # (B, N, N)
        attn = self.params.weight / n + (1 - self.params.weight) * affinity
        return Attention(attn=attn[:, None], v=v, grid=ctx.grid, has_cls=False)


# ----------------------------------------------------------------------------- a plug-in


class IdentityMixParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alpha: float = Field(0.5, ge=0, le=1)


@PLUGINS.register("toy_identity_mix", params=IdentityMixParams)
class IdentityMix:
    """Reworks the head's attention into alpha·Attn + (1 − alpha)·I, through the head's own
    ``aggregate`` and ``project``."""

    def __init__(self, params: IdentityMixParams) -> None:
        self.params = params

    def __call__(self, head: Head, ctx: HeadContext, text: torch.Tensor, to_embed) -> HeadOutput:
        CALLS["plugin"] += 1
        a = head.attention(ctx)
        eye = torch.eye(a.attn.shape[-1], dtype=a.attn.dtype, device=a.attn.device)
        mixed = Attention(attn=self.params.alpha * a.attn + (1 - self.params.alpha) * eye, v=a.v, grid=a.grid,
                          has_cls=a.has_cls)
        return head.project(ctx, mixed, head.aggregate(mixed))


# ----------------------------------------------------------------------------- a strategy


@STRATEGIES.register("toy_flip")
def build_flip():
    """The mean of the image's whole-image logits and its mirror's, mirrored back (composed from the
    built-in ``whole`` strategy)."""
    whole = STRATEGIES.build("whole")

    def flip(engine, image01, text, settings):
        CALLS["strategy"] += 1
        return 0.5 * (whole(engine, image01, text, settings) + whole(engine, image01.flip(-1), text, settings).flip(-1))

    return flip


# ----------------------------------------------------------------------------- a mask generator


class GridParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    splits: int = Field(2, ge=1, le=8)  # bands per side


@MASK_GENERATORS.register("toy_grid", params=GridParams)
def build_grid(params: GridParams, *, build: MaskBuild):
    """Regions = a splits × splits grid of equal bands: region id = row band · splits + column band."""

    def generate(image: np.ndarray, *, name: str | None = None) -> torch.Tensor:
        CALLS["masks"] += 1
        h, w = image.shape[:2]
        rows = torch.arange(h) * params.splits // h
        cols = torch.arange(w) * params.splits // w
        return rows[:, None] * params.splits + cols[None, :]

    return generate


# ----------------------------------------------------------------------------- a refiner


@REFINERS.register("toy_region_mean", needs={Need.REGION_MASKS})
def build_region_mean():
    """The class probabilities averaged over each region of the mask generator's map."""

    def refine(inp: RefineInput) -> Refined:
        CALLS["refiner"] += 1
        probs = inp.probs.clone()  # (C, H, W)
        regions = inp.region_masks.to(probs.device)
        for r in regions.unique():
            inside = regions == r
            probs[:, inside] = probs[:, inside].mean(1, keepdim=True)
        return Refined(probs=probs)

    return refine


# ----------------------------------------------------------------------------- a preset

register_preset("toy", {
    "base": "naclip",
    "description": "toy components registered from outside the package",
    "vfm": {"name": "toyvfm_p16"},
    "head": {"name": "toy_vfm_mix", "params": {"weight": 0.25}},
    "inference": {"mode": "toy_flip", "short_side": 48},
    "refine": {"name": "toy_region_mean"},
    "masks": {"name": "toy_grid", "params": {"splits": 2}},
})

NAMES = {"head": "toy_vfm_mix", "plugin": "toy_identity_mix", "strategy": "toy_flip", "refiner": "toy_region_mean",
         "vfm_family": "toyvfm", "mask_generator": "toy_grid"}
