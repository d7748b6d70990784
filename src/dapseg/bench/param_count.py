"""Parameters of the models a segmenter holds (CLIP, VFM, SAM, mask generator, head)."""

from __future__ import annotations

from typing import Any

import torch


def count_params(module: torch.nn.Module | None) -> int:
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters())  # parameters() yields a shared tensor once


def model_params(segmenter: Any) -> dict[str, int]:
    """Parameters per model: CLIP (image + text towers), VFM, SAM (where present), head."""
    out = {"clip": count_params(segmenter.clip.model)}
    if segmenter.vfm is not None:
        out["vfm"] = count_params(segmenter.vfm)
    if segmenter.sam is not None:
        out["sam"] = count_params(segmenter.sam)
    masks = getattr(segmenter.models, "mask_generator", None)
    if isinstance(getattr(masks, "model", None), torch.nn.Module):
        out["masks"] = count_params(masks.model)
    head = count_params(segmenter.head)
    if head:
        out["head"] = head
    return out
