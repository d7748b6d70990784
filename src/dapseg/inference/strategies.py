"""Inference strategies: how an image becomes windows and window logits become image logits.

A strategy is registered in ``dapseg.registry.STRATEGIES`` under its ``inference.mode`` name; its
builder takes the validated ``inference.params`` object (when it has a params model) and the models
it declared (``Need``), and returns a callable

    strategy(engine, image01 (3, H, W) in [0, 1], text (Q, E), settings) -> logits (Q, H, W)

giving cosine logits covering the processed image. ``whole`` and ``slide`` live here; ``splice``
(splice-then-segment) registers itself from its own module.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from dapseg.config import InferenceConfig
from dapseg.inference.engine import DenseEngine
from dapseg.inference.windows import centred_padding, crop_windows, pad_windows, window_grid
from dapseg.registry import STRATEGIES

Strategy = Callable[[DenseEngine, Tensor, Tensor, InferenceConfig], Tensor]


def get_strategy(name: str, params: dict | None = None, **provided: object) -> Strategy:
    """The strategy ``name`` built with ``params`` (validated once, here) and ``provided`` models."""
    return STRATEGIES.build(name, params, **provided)


def padded_window_logits(engine: DenseEngine, windows01: Tensor, text: Tensor, pad_multiple: int | None) -> Tensor:
    """Window logits (B, Q, h, w), computed on windows padded to ``pad_multiple`` and cropped back."""
    h, w = windows01.shape[-2:]
    pad = centred_padding(h, w, pad_multiple)
    logits = engine.window_logits(pad_windows(windows01, pad, engine.clip.mean), text)
    left, _, top, _ = pad
    return logits[..., top : top + h, left : left + w]


def whole(engine: DenseEngine, image01: Tensor, text: Tensor, cfg: InferenceConfig) -> Tensor:
    """The whole image as one window."""
    return padded_window_logits(engine, image01[None], text, cfg.pad_multiple)[0]


def slide(engine: DenseEngine, image01: Tensor, text: Tensor, cfg: InferenceConfig) -> Tensor:
    """Segment-then-splice: window logits averaged where windows overlap.

    Windows go through the model ``max_batch`` at a time; a window's result does not depend on
    which others share its batch (every head normalises per window).
    """
    _, h, w = image01.shape
    windows = window_grid(h, w, cfg.crop, cfg.stride)
    logits = torch.zeros(text.shape[0], h, w)
    count = torch.zeros(1, h, w)
    for start in range(0, len(windows), cfg.max_batch):
        batch = windows[start : start + cfg.max_batch]
        out = padded_window_logits(engine, crop_windows(image01, batch), text, cfg.pad_multiple).cpu()
        for win, win_logits in zip(batch, out, strict=True):
            logits[:, win.y1 : win.y2, win.x1 : win.x2] += win_logits
            count[:, win.y1 : win.y2, win.x1 : win.x2] += 1
    return logits / count


# Parameterless strategies: the builder returns the function itself.
STRATEGIES.register("whole", description="the whole image as one window")(lambda: whole)
STRATEGIES.register("slide", description="sliding windows, logits averaged where they overlap")(lambda: slide)
