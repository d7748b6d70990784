"""Refiners: (image, logits at output resolution) -> refined logits. PAMR here; SAM prompts elsewhere."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from torch import Tensor

# (image (H, W, 3) uint8, logits (Q, H, W), query_to_class) -> logits (Q, H, W), or (logits, labels (H, W))
# for a refiner that decides the labels itself (SAM prompts).
Refiner = Callable[[np.ndarray, Tensor, list[int]], Tensor | tuple[Tensor, Tensor]]
REFINER_BUILDERS: dict[str, Callable[..., Refiner]] = {}


def register_refiner(name: str) -> Callable[[Callable[..., Refiner]], Callable[..., Refiner]]:
    def deco(builder: Callable[..., Refiner]) -> Callable[..., Refiner]:
        REFINER_BUILDERS[name] = builder
        return builder

    return deco


def build_refiner(name: str, params: dict[str, Any], **models: Any) -> Refiner | None:
    """The refiner ``name`` ('none' -> None). ``models`` carries e.g. ``sam`` for SAM prompting."""
    from dapseg.refine import pamr, sam_prompt, sam_vote  # noqa: F401  (registers pamr, sam, sam_vote)

    if name == "none":
        return None
    if name not in REFINER_BUILDERS:
        raise ValueError(f"unknown refiner {name!r}; valid: none, {', '.join(sorted(REFINER_BUILDERS))}")
    return REFINER_BUILDERS[name](params, **models)
