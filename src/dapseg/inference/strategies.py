"""Inference strategies: how an image becomes windows and window logits become image logits.

A strategy maps (engine, image (3, H, W) in [0, 1], text (Q, E), settings) to cosine logits
(Q, H, W) at the processed image's resolution. ``whole`` and ``slide`` live here; ``splice``
(splice-then-segment) registers itself from its own module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import Tensor

from dapseg.config import InferenceConfig
from dapseg.heads.affinity import image_similarity_mean
from dapseg.inference.engine import DenseEngine
from dapseg.inference.windows import Window, centred_padding, window_grid

if TYPE_CHECKING:
    from dapseg.models.vfm import VfmOutput

Strategy = Callable[[DenseEngine, Tensor, Tensor, InferenceConfig], Tensor]
STRATEGIES: dict[str, Strategy] = {}
# The pydantic model of ``inference.params`` for strategies that take parameters.
STRATEGY_PARAMS: dict[str, type[BaseModel]] = {}
# Strategies that also take the original image as loaded, keyword ``original`` ((H, W, 3) uint8 RGB):
# splice gives it to SAM, as the Trident reference does.
NEEDS_ORIGINAL: set[str] = set()


def register_strategy(
    name: str, params: type[BaseModel] | None = None, *, needs_original: bool = False
) -> Callable[[Strategy], Strategy]:
    def deco(fn: Strategy) -> Strategy:
        STRATEGIES[name] = fn
        if params is not None:
            STRATEGY_PARAMS[name] = params
        if needs_original:
            NEEDS_ORIGINAL.add(name)
        return fn

    return deco


def strategy_needs_original(name: str) -> bool:
    """Whether strategy ``name`` takes the original image (keyword ``original``)."""
    get_strategy(name)
    return name in NEEDS_ORIGINAL


def validate_strategy_params(mode: str, params: dict[str, Any]) -> dict[str, Any]:
    """``inference.params`` checked against the strategy's model (at config time, not mid-run)."""
    get_strategy(mode)
    model = STRATEGY_PARAMS.get(mode)
    if model is None:
        if params:
            raise ValueError(f"inference mode {mode!r} takes no params, got {sorted(params)} "
                             "(switching from splice? also set inference.params={})")
        return params
    return model(**params).model_dump()


def get_strategy(name: str) -> Strategy:
    import dapseg.inference  # noqa: F401  (registers every built-in strategy)

    if name not in STRATEGIES:
        raise ValueError(f"unknown inference mode {name!r}; valid: {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name]


def pad_windows(windows01: Tensor, pad: tuple[int, int, int, int], fill: tuple[float, ...]) -> Tensor:
    """Pad (B, 3, h, w) windows with a constant colour (the CLIP mean: zero after normalisation)."""
    if not any(pad):
        return windows01
    out = F.pad(windows01, pad, value=0.0)
    left, _, top, _ = pad
    h, w = windows01.shape[-2:]
    mask = torch.ones_like(out[:, :1], dtype=torch.bool)
    mask[..., top : top + h, left : left + w] = False
    colour = torch.tensor(fill, dtype=out.dtype, device=out.device).view(1, 3, 1, 1)
    return torch.where(mask, colour, out)


def min_window_side(engine: DenseEngine) -> int:
    """The smallest window side the engine's models accept: one patch of CLIP and of the VFM."""
    sizes = [engine.clip.patch_size]
    vfm = getattr(engine, "vfm", None)
    if vfm is not None and hasattr(vfm, "patch_size"):
        sizes.append(int(vfm.patch_size))
    return max(sizes)


def window_padding(h: int, w: int, pad_multiple: int | None, min_side: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom): ``centred_padding`` to ``pad_multiple``, then, where a side is still
    shorter than ``min_side``, centred padding up to ``min_side`` (a window narrower than one patch,
    e.g. of a 10000×10 image, would give an empty token grid)."""
    left, right, top, bottom = centred_padding(h, w, pad_multiple)
    extra_w, extra_h = max(0, min_side - (w + left + right)), max(0, min_side - (h + top + bottom))
    return left + extra_w // 2, right + extra_w - extra_w // 2, top + extra_h // 2, bottom + extra_h - extra_h // 2


def image_affinity_mean(
    engine: DenseEngine, image01: Tensor, windows: list[Window], cfg: InferenceConfig
) -> tuple[Tensor | None, list[VfmOutput | None]]:
    """For heads with mean_scope="image": mean(S) over the VFM features of *all* windows of the image.

    Returns (mean, the VFM output of each batch of ``cfg.max_batch`` windows, to be reused by the
    head) — or (None, [None per batch]) when the head takes its mean per window. The windows are
    padded exactly as ``padded_window_logits`` pads them, so the head sees the same features.
    A first pass over every batch, so the mean never depends on ``max_batch``.
    """
    starts = range(0, len(windows), cfg.max_batch)
    if not getattr(engine, "needs_image_mean", False):
        return None, [None for _ in starts]
    if engine.vfm is None:
        raise ValueError("mean_scope='image' needs a VFM (configure a `vfm:` section)")
    outs = []
    for start in starts:
        crops = crop_windows(image01, windows[start : start + cfg.max_batch])
        pad = window_padding(*crops.shape[-2:], cfg.pad_multiple, min_window_side(engine))
        outs.append(engine.vfm_output(pad_windows(crops, pad, engine.clip.mean)))
    return image_similarity_mean([o.feats for o in outs]), outs


def padded_window_logits(
    engine: DenseEngine,
    windows01: Tensor,
    text: Tensor,
    pad_multiple: int | None,
    *,
    vfm_out: VfmOutput | None = None,
    affinity_mean: Tensor | None = None,
) -> Tensor:
    """Window logits (B, Q, h, w), computed on windows padded to ``pad_multiple`` (and to at least one
    patch per side) and cropped back.

    ``vfm_out`` / ``affinity_mean``: see ``image_affinity_mean``."""
    h, w = windows01.shape[-2:]
    pad = window_padding(h, w, pad_multiple, min_window_side(engine))
    # only passed when set, so engines that know nothing of them (test doubles) still fit
    extra = {"vfm_out": vfm_out, "affinity_mean": affinity_mean} if affinity_mean is not None else {}
    logits = engine.window_logits(pad_windows(windows01, pad, engine.clip.mean), text, **extra)
    left, _, top, _ = pad
    return logits[..., top : top + h, left : left + w]


@register_strategy("whole")
def whole(engine: DenseEngine, image01: Tensor, text: Tensor, cfg: InferenceConfig) -> Tensor:
    """The whole image as one window."""
    _, h, w = image01.shape
    mean, vfm_outs = image_affinity_mean(engine, image01, [Window(0, h, 0, w)], cfg)
    return padded_window_logits(engine, image01[None], text, cfg.pad_multiple, vfm_out=vfm_outs[0],
                                affinity_mean=mean)[0]


def crop_windows(image01: Tensor, windows: list[Window]) -> Tensor:
    """(3, H, W) -> (n, 3, h, w) stacked crops (all windows of a grid share one size)."""
    return torch.stack([image01[:, w.y1 : w.y2, w.x1 : w.x2] for w in windows])


@register_strategy("slide")
def slide(engine: DenseEngine, image01: Tensor, text: Tensor, cfg: InferenceConfig) -> Tensor:
    """Segment-then-splice: window logits averaged where windows overlap.

    Windows go through the model ``max_batch`` at a time; a window's result does not depend on
    which others share its batch (heads normalise per window, or use the image-wide mean computed
    beforehand over every window).
    """
    _, h, w = image01.shape
    windows = window_grid(h, w, cfg.crop, cfg.stride)
    mean, vfm_outs = image_affinity_mean(engine, image01, windows, cfg)
    logits = torch.zeros(text.shape[0], h, w)
    count = torch.zeros(1, h, w)
    for k, start in enumerate(range(0, len(windows), cfg.max_batch)):
        batch = windows[start : start + cfg.max_batch]
        out = padded_window_logits(engine, crop_windows(image01, batch), text, cfg.pad_multiple,
                                   vfm_out=vfm_outs[k], affinity_mean=mean).cpu()
        for win, win_logits in zip(batch, out, strict=True):
            logits[:, win.y1 : win.y2, win.x1 : win.x2] += win_logits
            count[:, win.y1 : win.y2, win.x1 : win.x2] += 1
    return logits / count
