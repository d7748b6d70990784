"""pearl_prop: PEARL's text-aware Laplacian propagation of the logits (public code PGSmall/PEARL, TLP).

For an image (H, W) and cosine logits L (Q, H, W), on a coarse grid of about ``grid`` cells a side:

1. s_h = max(1, round(H / grid)), s_w likewise (Python's round: halves to even); image and logits
   average-pooled by (s_h, s_w) (a remainder that does not fill a cell is dropped);
2. p = softmax(L) over the queries (no logit scale), confidence c = max_q p;
3. text weights S = row-normalise(softmax(TTᵀ / text_temperature) + diagonal_boost·I) from the query
   embeddings T. The reference applies S as ``einsum('cc,bcij->bcij', S, p)``, which takes S's
   *diagonal*: every "text" term below uses only s_q = S_qq, never S's off-diagonal entries;
4. data weight C = max(c, confidence_floor)² · (1 + clamp(Σ_q s_q p_q², 0, 1));
5. edge weights between 4-neighbours i, j (grey = 0.299 R + 0.587 G + 0.114 B of the CLIP-normalised
   image): g = |grey_i − grey_j| / (mean of g over the image's edges of that direction + 1e-6),
   w = clamp(exp(−edge_sharpness·g) · (1 + clamp(Σ_q s_q p_q(i) p_q(j), 0, 1)), 0, 1);
6. solve (diag(C) + smoothness·Λ) X = C ⊙ L_pooled, Λ the graph Laplacian of w (one system for all
   queries), by ``steps`` conjugate-gradient steps from X = L_pooled;
7. X upsampled bilinearly back to (H, W): the refined cosine logits.

The solve is batched over images and runs in float32 on the logits' device (autocast is off).
Departures from the reference, none of which changes a number for one image: the gradient means
are taken per image (the reference takes them over its batch, which is always one image), and no
image is resized here (the reference upsamples the resized network input back to the image size;
the two are the same image when the input was not resized).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, field_validator
from torch import Tensor

from dapseg.refine import Refined, RefineInput, Refiner
from dapseg.registry import REFINERS, Need

_EPS = 1e-6  # the reference's guard in divisions (temperature, row sums, gradient means)
_CG_EPS = 1e-12  # the reference's guard in the conjugate-gradient step sizes
_GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma weights of R, G, B


class PearlPropParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grid: int = 80  # cells per side of the solve grid (PEARL: 80; 224 on Cityscapes)
    steps: int = 25  # conjugate-gradient steps (PEARL: 25)
    edge_sharpness: float = 5.0  # k in exp(−k·g) of the image-gradient edge weights (PEARL: 5)
    text_temperature: float = 0.5  # τ of softmax(TTᵀ/τ) (PEARL: 0.5)
    diagonal_boost: float = 10.0  # added to S's diagonal before row normalisation (PEARL: 10)
    confidence_floor: float = 0.05  # the data weight is max(confidence, floor)² (PEARL: 0.05)
    smoothness: float = 1.0  # weight of the Laplacian against the data term (PEARL: 1)

    @field_validator("grid", "steps")
    @classmethod
    def _at_least_one(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be >= 1")
        return v

    @field_validator("text_temperature", "confidence_floor")
    @classmethod
    def _positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("must be > 0")
        return v

    @field_validator("edge_sharpness", "diagonal_boost", "smoothness")
    @classmethod
    def _non_negative(cls, v: float) -> float:
        if v < 0:
            raise ValueError("must be >= 0")
        return v


def text_weights(text: Tensor, temperature: float, diagonal_boost: float) -> Tensor:
    """(Q, E) query embeddings -> (Q,) s_q = S_qq of S = row-normalise(softmax(cos/τ) + boost·I)."""
    t = F.normalize(text.float(), dim=-1)
    s = torch.softmax(t @ t.T / max(temperature, _EPS), dim=1)
    if diagonal_boost > 0:
        s = s + diagonal_boost * torch.eye(s.shape[0], dtype=s.dtype, device=s.device)
        s = s / (s.sum(dim=1, keepdim=True) + _EPS)
    return s.diagonal()


def pooling_factors(h: int, w: int, grid: int) -> tuple[int, int]:
    """Cells of (h, w) pixels pooled into one grid cell: max(1, round(side / grid)) per side."""
    return max(1, round(h / float(grid))), max(1, round(w / float(grid)))


def grey(image: Tensor) -> Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma 0.299 R + 0.587 G + 0.114 B."""
    r, g, b = image[:, 0:1], image[:, 1:2], image[:, 2:3]
    return _GREY[0] * r + _GREY[1] * g + _GREY[2] * b


def edge_weights(
    grey_image: Tensor, probs: Tensor, s_diag: Tensor | None, sharpness: float
) -> tuple[Tensor, Tensor]:
    """Weights of the edges to the right (B, 1, H, W−1) and downwards (B, 1, H−1, W) (step 5)."""
    gx = (grey_image[..., :, 1:] - grey_image[..., :, :-1]).abs()
    gy = (grey_image[..., 1:, :] - grey_image[..., :-1, :]).abs()
    w_h = torch.exp(-sharpness * (gx / (gx.mean(dim=(1, 2, 3), keepdim=True) + _EPS)))
    w_v = torch.exp(-sharpness * (gy / (gy.mean(dim=(1, 2, 3), keepdim=True) + _EPS)))
    if s_diag is None:
        return w_h, w_v
    sp = s_diag.view(1, -1, 1, 1) * probs  # (B, Q, H, W): S applied as the reference does (diagonal)
    agree_h = (probs[..., :, 1:] * sp[..., :, :-1]).sum(dim=1, keepdim=True).clamp(0.0, 1.0)
    agree_v = (probs[..., 1:, :] * sp[..., :-1, :]).sum(dim=1, keepdim=True).clamp(0.0, 1.0)
    return (w_h * (1.0 + agree_h)).clamp(0.0, 1.0), (w_v * (1.0 + agree_v)).clamp(0.0, 1.0)


def laplacian(x: Tensor, w_h: Tensor, w_v: Tensor) -> Tensor:
    """Λx for the 4-neighbour graph of ``edge_weights``: (Λx)_i = Σ_j w_ij (x_i − x_j); x (B, Q, H, W)."""
    out = torch.zeros_like(x)
    flow_h = w_h * (x[..., :, 1:] - x[..., :, :-1])  # (B, Q, H, W−1)
    out[..., :, 1:] += flow_h
    out[..., :, :-1] -= flow_h
    flow_v = w_v * (x[..., 1:, :] - x[..., :-1, :])  # (B, Q, H−1, W)
    out[..., 1:, :] += flow_v
    out[..., :-1, :] -= flow_v
    return out


def conjugate_gradient(apply: Callable[[Tensor], Tensor], b: Tensor, x0: Tensor, steps: int) -> Tensor:
    """``steps`` conjugate-gradient steps for apply(x) = b from x0, one system per batch item (the
    inner products run over all of its other dimensions); x (B, ...)."""
    dims = tuple(range(1, b.dim()))
    x = x0.clone()
    r = b - apply(x)
    p = r.clone()
    rs_old = (r * r).sum(dim=dims, keepdim=True)
    for _ in range(steps):
        ap = apply(p)
        alpha = rs_old / ((p * ap).sum(dim=dims, keepdim=True) + _CG_EPS)
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = (r * r).sum(dim=dims, keepdim=True)
        p = r + rs_new / (rs_old + _CG_EPS) * p
        rs_old = rs_new
    return x


def propagate(image: Tensor, logits: Tensor, text: Tensor | None, p: PearlPropParams) -> Tensor:
    """image (B, 3, H, W) CLIP-normalised, logits (B, Q, H, W) cosine, text (Q, E) or None (no text
    terms) -> refined logits (B, Q, H, W) float32 (module docstring)."""
    h, w = logits.shape[-2:]
    with torch.autocast(logits.device.type, enabled=False):
        image, logits = image.float(), logits.float()
        sh, sw = pooling_factors(h, w, p.grid)
        if sh > 1 or sw > 1:
            image = F.avg_pool2d(image, (sh, sw), (sh, sw))
            logits = F.avg_pool2d(logits, (sh, sw), (sh, sw))
        s_diag = None if text is None else text_weights(text.to(logits.device), p.text_temperature,
                                                         p.diagonal_boost)
        probs = torch.softmax(logits, dim=1)  # (B, Q, h', w')
        data = probs.amax(dim=1, keepdim=True).clamp_min(p.confidence_floor) ** 2  # (B, 1, h', w')
        if s_diag is not None:
            data = data * (1.0 + (s_diag.view(1, -1, 1, 1) * probs * probs).sum(1, keepdim=True).clamp(0.0, 1.0))
        w_h, w_v = edge_weights(grey(image), probs, s_diag, p.edge_sharpness)

        def system(x: Tensor) -> Tensor:
            return data * x + p.smoothness * laplacian(x, w_h, w_v)

        out = conjugate_gradient(system, data * logits, logits, p.steps)
        if sh > 1 or sw > 1:
            out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
    return out


@REFINERS.register("pearl_prop", params=PearlPropParams, needs={Need.CLASS_TEXT},
                   description="PEARL: text-aware Laplacian propagation of the logits (CG on a coarse grid)",
                   # pooling, edges, CG solve, upsampling: timed by `dapseg bench` as their own stage
                   extras={"stages": {"propagation": ("propagate",)}})
def build_pearl_prop(p: PearlPropParams) -> Refiner:
    def refine(inp: RefineInput) -> Refined:
        from dapseg.inference.preprocess import normalize
        from dapseg.models.clip import OPENAI_MEAN, OPENAI_STD

        if inp.text is None:
            raise ValueError("refine.name=pearl_prop needs the query text embeddings (RefineInput.text)")
        # (H, W, 3) uint8 -> (1, 3, H, W) in [0, 1], converted on the logits' device. The reference
        # computes the edges on the CLIP-normalised network input (per-channel scales do not cancel
        # in the grey level): the same here.
        pixels = torch.from_numpy(np.ascontiguousarray(inp.image, dtype=np.uint8)).to(inp.logits.device)
        img = normalize(pixels.permute(2, 0, 1)[None].float().div_(255.0), OPENAI_MEAN, OPENAI_STD)
        return Refined(logits=propagate(img, inp.logits[None], inp.text, p)[0])

    return refine
