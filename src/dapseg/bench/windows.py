"""The windows a segmenter cuts an image into, as its strategy declares them.

A strategy declares its window plan as the registry extra ``windows`` (``inference.windows.WindowPlanner``);
the bench asks it instead of knowing any strategy's geometry. A strategy that declares none has an
unknown window count (None).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dapseg.inference.preprocess import short_side_size
from dapseg.inference.windows import WindowPlan
from dapseg.registry import STRATEGIES


def window_plan(segmenter: Any, image: np.ndarray) -> WindowPlan | None:
    """The strategy's plan for ``image`` (H, W, 3) once resized to the configured short side, or None."""
    cfg = segmenter.config.inference
    planner = STRATEGIES.get(cfg.mode).extras.get("windows")
    if planner is None:
        return None
    h, w = image.shape[:2]
    size = short_side_size(h, w, cfg.short_side) if cfg.short_side else (h, w)
    return planner(size, cfg, segmenter.clip.patch_size)


def n_windows(segmenter: Any, image: np.ndarray) -> int | None:
    """Windows the strategy cuts the processed image into (1 for ``whole``; None: not declared)."""
    plan = window_plan(segmenter, image)
    return None if plan is None else len(plan.windows)
