"""PAMR: pixel-adaptive mask refinement (Araslanov & Roth 2020), as NACLIP applies it.

Each step replaces every pixel's logits by a weighted average of its 8 neighbours at each dilation,
weighted by a softmax over neighbours of −|I_p − I_q| / (0.1 · σ_local), averaged over colour
channels; σ_local is the standard deviation over the 3×3 stencils of all dilations, centres included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, field_validator
from torch import Tensor

from dapseg.refine import Refined, RefineInput, Refiner
from dapseg.registry import REFINERS

# The 8 neighbours of a 3×3 stencil (dy, dx), and the 9 offsets incl. the centre.
_NEIGHBOURS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]
_STENCIL = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 0), (0, 1), (1, -1), (1, 0), (1, 1)]


def _shifted(x: Tensor, offsets: list[tuple[int, int]], dilation: int) -> Tensor:
    """(B, K, H, W) -> (B, K, P, H, W): x at p + d·offset, replicate-padded at the border."""
    d = dilation
    padded = F.pad(x, [d, d, d, d], mode="replicate")
    h, w = x.shape[-2:]
    return torch.stack([padded[..., d + dy * d : d + dy * d + h, d + dx * d : d + dx * d + w] for dy, dx in offsets], 2)


def pamr(image: Tensor, mask: Tensor, steps: int = 10, dilations: tuple[int, ...] = (8, 16)) -> Tensor:
    """image (B, K, H, W) float, mask (B, C, H, W) -> refined mask (B, C, H, W)."""
    if mask.shape[-2:] != image.shape[-2:]:
        mask = F.interpolate(mask, size=image.shape[-2:], mode="bilinear", align_corners=True)
    centre = image.unsqueeze(2)
    # |I_p − I_q| for the 8 neighbours at each dilation: (B, K, 8·len(dilations), H, W).
    diffs = torch.cat([(_shifted(image, _NEIGHBOURS, d) - centre).abs() for d in dilations], dim=2)
    # σ_local: one std per pixel over the 3×3 stencils of all dilations together (centre included).
    sigma = torch.cat([_shifted(image, _STENCIL, d) for d in dilations], dim=2).std(dim=2, keepdim=True)
    aff = torch.softmax((-diffs / (1e-8 + 0.1 * sigma)).mean(dim=1, keepdim=True), dim=2)
    for _ in range(steps):
        neighbours = torch.cat([_shifted(mask, _NEIGHBOURS, d) for d in dilations], dim=2)
        mask = (neighbours * aff).sum(dim=2)
    return mask


class PamrParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = 10
    dilations: tuple[int, ...] = (8, 16)

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: int) -> int:
        if v < 1:
            raise ValueError("steps must be >= 1")
        return v


@REFINERS.register("pamr", params=PamrParams, description="PAMR: pixel-adaptive smoothing of the logits")
def build_pamr(p: PamrParams) -> Refiner:
    def refine(inp: RefineInput) -> Refined:
        # NACLIP refines the cosine logits with the CLIP-normalised image; PAMR's affinities are
        # invariant to a per-channel affine map up to the σ term, so we use the normalised image too.
        from dapseg.inference.preprocess import normalize, to_tensor01
        from dapseg.models.clip import OPENAI_MEAN, OPENAI_STD

        img = normalize(to_tensor01(inp.image)[None], OPENAI_MEAN, OPENAI_STD).to(inp.logits)
        return Refined(logits=pamr(img, inp.logits[None], p.steps, p.dilations)[0])

    return refine
