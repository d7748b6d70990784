"""Inference strategies: how an image becomes windows and window logits become image logits.

A strategy is registered in ``dapseg.registry.STRATEGIES`` under its ``inference.mode`` name; its
builder takes the validated ``inference.params`` object (when it has a params model) and the models
it declared (``Need``), and returns a callable

    strategy(engine, image01 (3, H, W) in [0, 1], text (Q, E), settings) -> logits (Q, H, W)

giving cosine logits covering the processed image. ``whole`` and ``slide`` live here; ``splice``
(splice-then-segment) registers itself from its own module.

What a strategy declares about itself are registry extras (docs/design.md, "Contracts: Strategy"):
``windows``, its window plan (``windows.WindowPlanner``); ``no_plugins``, why it takes no plug-in;
``stages``, the functions ``dapseg bench`` times as their own stages; ``region_masks: True``, that it
also takes ``region_masks=``: the image's region map (H, W) int64 resized to the processed image,
which it crops and pads like the pixels of each window (padding: ``PAD_SENTINEL``) for heads that
declare ``Need.REGION_MASKS``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from dapseg.config import InferenceConfig
from dapseg.heads.affinity import image_similarity_mean
from dapseg.inference.engine import DenseEngine
from dapseg.inference.windows import (
    Window,
    WindowPadding,
    WindowPlan,
    crop_maps,
    crop_windows,
    window_grid,
    window_padding,
)
from dapseg.masks.base import PAD_SENTINEL
from dapseg.registry import STRATEGIES

if TYPE_CHECKING:
    from dapseg.models.vfm import VfmOutput

Strategy = Callable[[DenseEngine, Tensor, Tensor, InferenceConfig], Tensor]


def get_strategy(name: str, params: dict | None = None, **provided: object) -> Strategy:
    """The strategy ``name`` built with ``params`` (validated once, here) and ``provided`` models."""
    return STRATEGIES.build(name, params, **provided)


def min_window_side(engine: DenseEngine) -> int:
    """The smallest window side the engine's models accept: one patch of CLIP and of the VFM."""
    if engine.vfm is None:
        return engine.clip.patch_size
    return max(engine.clip.patch_size, int(engine.vfm.patch_size))


def engine_padding(engine: DenseEngine, h: int, w: int, pad_multiple: int | None) -> WindowPadding:
    """The padding of an (h, w) window for ``engine`` (every strategy pads its windows with this)."""
    return window_padding(h, w, pad_multiple, min_window_side(engine))


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
    if not engine.needs_image_mean:
        return None, [None for _ in starts]
    if engine.vfm is None:
        raise ValueError("mean_scope='image' needs a VFM (configure a `vfm:` section)")
    outs = []
    for start in starts:
        crops = crop_windows(image01, windows[start : start + cfg.max_batch])
        pad = engine_padding(engine, *crops.shape[-2:], cfg.pad_multiple)
        outs.append(engine.vfm_output(pad.apply(crops, engine.clip.mean)))
    return image_similarity_mean([o.feats for o in outs]), outs


def padded_window_logits(
    engine: DenseEngine,
    windows01: Tensor,
    text: Tensor,
    pad_multiple: int | None,
    *,
    vfm_out: VfmOutput | None = None,
    affinity_mean: Tensor | None = None,
    region_masks: Tensor | None = None,
) -> Tensor:
    """Window logits (B, Q, h, w), computed on windows padded to ``pad_multiple`` (and to at least one
    patch per side) and cropped back.

    ``vfm_out`` / ``affinity_mean``: see ``image_affinity_mean``. ``region_masks``: (B, h, w) region
    maps of the windows, padded like them with ``PAD_SENTINEL``."""
    h, w = windows01.shape[-2:]
    pad = engine_padding(engine, h, w, pad_multiple)
    # only when given: engines written for heads without masks need not know the keyword
    masks = {"region_masks": pad.apply_map(region_masks, PAD_SENTINEL)} if region_masks is not None else {}
    logits = engine.window_logits(pad.apply(windows01, engine.clip.mean), text, vfm_out=vfm_out,
                                  affinity_mean=affinity_mean, **masks)
    return pad.crop_pixels(logits, (h, w))


def _window_masks(region_masks: Tensor | None, windows: list[Window]) -> Tensor | None:
    return crop_maps(region_masks, windows) if region_masks is not None else None


def whole_windows(size: tuple[int, int], cfg: InferenceConfig, patch: int) -> WindowPlan:
    """``whole``'s window plan: the image as it is, one window."""
    h, w = size
    return WindowPlan((h, w), [Window(0, h, 0, w)])


def slide_windows(size: tuple[int, int], cfg: InferenceConfig, patch: int) -> WindowPlan:
    """``slide``'s window plan: the image as it is, the sliding-window grid of ``crop`` and ``stride``."""
    return WindowPlan(size, window_grid(*size, cfg.crop, cfg.stride))


def whole(engine: DenseEngine, image01: Tensor, text: Tensor, cfg: InferenceConfig, *,
          region_masks: Tensor | None = None) -> Tensor:
    """The whole image as one window. ``region_masks``: (H, W) region map of the processed image."""
    _, h, w = image01.shape
    window = whole_windows((h, w), cfg, engine.clip.patch_size).windows
    mean, vfm_outs = image_affinity_mean(engine, image01, window, cfg)
    return padded_window_logits(engine, image01[None], text, cfg.pad_multiple, vfm_out=vfm_outs[0],
                                affinity_mean=mean, region_masks=_window_masks(region_masks, window))[0]


def slide(engine: DenseEngine, image01: Tensor, text: Tensor, cfg: InferenceConfig, *,
          region_masks: Tensor | None = None) -> Tensor:
    """Segment-then-splice: window logits averaged where windows overlap.

    Windows go through the model ``max_batch`` at a time; a window's result does not depend on
    which others share its batch (heads normalise per window, or use the image-wide mean computed
    beforehand over every window). ``region_masks``: (H, W) region map of the processed image, cropped
    per window like the pixels.
    """
    _, h, w = image01.shape
    windows = slide_windows((h, w), cfg, engine.clip.patch_size).windows
    mean, vfm_outs = image_affinity_mean(engine, image01, windows, cfg)
    logits = torch.zeros(text.shape[0], h, w)
    count = torch.zeros(1, h, w)
    for k, start in enumerate(range(0, len(windows), cfg.max_batch)):
        batch = windows[start : start + cfg.max_batch]
        out = padded_window_logits(engine, crop_windows(image01, batch), text, cfg.pad_multiple,
                                   vfm_out=vfm_outs[k], affinity_mean=mean,
                                   region_masks=_window_masks(region_masks, batch)).cpu()
        for win, win_logits in zip(batch, out, strict=True):
            logits[:, win.y1 : win.y2, win.x1 : win.x2] += win_logits
            count[:, win.y1 : win.y2, win.x1 : win.x2] += 1
    return logits / count


# Parameterless strategies: the builder returns the function itself.
STRATEGIES.register("whole", description="the whole image as one window",
                    extras={"region_masks": True, "windows": whole_windows})(lambda: whole)
STRATEGIES.register("slide", description="sliding windows, logits averaged where they overlap",
                    extras={"region_masks": True, "windows": slide_windows})(lambda: slide)
