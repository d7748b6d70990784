"""Timing one prediction (wall and CPU seconds) and the text encoding a first image pays."""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import torch

from dapseg.bench.probe import synchronize


def timed_predict(segmenter: Any, image: np.ndarray, classes: Any, device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one prediction.

    CPU time moves much less than wall time when other processes compete for the cores, so it is
    the better before/after figure on a shared machine.
    """
    synchronize(device)
    t0, c0 = time.perf_counter(), time.process_time()
    segmenter.predict(image, classes)
    synchronize(device)
    return time.perf_counter() - t0, time.process_time() - c0


def text_encoding_seconds(segmenter: Any, classes: Any, device: torch.device) -> float:
    """Seconds to encode ``classes``' queries from scratch (all templates), as a first image pays it:
    a fresh embedder around the segmenter's text encoder, with no memory or disk cache."""
    from dapseg.text import TextEmbedder

    fresh = TextEmbedder(segmenter.text.encode, segmenter.text.model_id, segmenter.text.templates, cache_root=None)
    synchronize(device)
    t0 = time.perf_counter()
    fresh(classes)
    synchronize(device)
    return time.perf_counter() - t0


def spread(values: list[float]) -> dict[str, float]:
    """Median, min and max of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}
