"""The mask-generator contract and what every generator shares.

A generator is a callable

    generator(image (H, W, 3) uint8 RGB, *, name: str | None = None) -> region map (H, W) int64

``name`` identifies the image (a path's stem, the mirrored name of ``dapseg segment``, a dataset
sample's name); only generators that read precomputed masks (``folder``) use it.

The region map follows CorrCLIP's encoding (``CorrCLIPv1/corrclip_segmentor.py``, ``generate_mask``):
an integer per pixel, one value per region; the *lowest* value present is the union of the pixels no
mask covers (0 for SAM/SAM2 and Mask2Former, -1 for EoMT). When every pixel is covered, the lowest
value is a real region, and the consumers treat it exactly as the official code does (as the
"uncovered" one). Values are kept as the generator gives them: consumers only compare values and
take ``unique`` (sorted), so any order-preserving relabelling would give the same result, but we do
not relabel.

Windows that are padded get ``PAD_SENTINEL`` on their padded pixels (the official ``forward_slide``
pads the crops of the map with ``value=10000``); region values must stay below it.

A builder registered in ``MASK_GENERATORS`` is called as ``builder(params, build=MaskBuild(...))``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import Tensor

from dapseg.registry import MASK_GENERATORS

# The value of padded window pixels in a cropped region map (CorrCLIP's forward_slide pads with 10000).
PAD_SENTINEL = 10000


class MaskGenerator(Protocol):
    def __call__(self, image: np.ndarray, *, name: str | None = None) -> Tensor: ...


@dataclass(frozen=True)
class MaskBuild:
    """How to build a generator's model: the same switches as every other model of the segmenter."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    random_weights: bool = False  # the full-size architecture with random weights (smoke runs)
    tiny: bool = False  # with random_weights: a tiny architecture (tests)
    cache_dir: str | os.PathLike[str] | None = None  # the weights cache (dapseg.weights.cache_dir)


def build_mask_generator(
    name: str, params: Mapping[str, Any] | BaseModel | None = None, build: MaskBuild | None = None
) -> MaskGenerator:
    """Generator ``name`` of ``MASK_GENERATORS`` with its validated ``params``."""
    entry = MASK_GENERATORS.get(name)
    build = build or MaskBuild()
    p = entry.parse_params(params)
    return entry.builder(p, build=build) if entry.params is not None else entry.builder(build=build)


def import_for(module: str, generator: str) -> Any:
    """``module`` for mask generator ``generator``; a clear RuntimeError naming the extra when missing."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise RuntimeError(f"mask generator {generator!r} needs the {module.split('.')[0]} package: "
                           "pip install 'dapseg[masks]'") from e


def check_region_map(arr: Any, size: tuple[int, int], what: str) -> Tensor:
    """``arr`` (an array read back from a file or given by a model) as an (H, W) int64 region map,
    checked: 2-D, integer, of the image's ``size``, values below ``PAD_SENTINEL``. Errors name ``what``."""
    a = np.asarray(arr)
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{what}: a region map must hold integers, got dtype {a.dtype}")
    if a.ndim != 2:
        raise ValueError(f"{what}: a region map must be 2-D (H, W), got shape {tuple(a.shape)}")
    if tuple(a.shape) != tuple(size):
        raise ValueError(f"{what}: region map is {a.shape[0]}x{a.shape[1]} (HxW) but the image is "
                         f"{size[0]}x{size[1]}")
    out = torch.from_numpy(a.astype(np.int64, copy=False).copy())
    if out.numel() and int(out.max()) >= PAD_SENTINEL:
        raise ValueError(f"{what}: region values must be < {PAD_SENTINEL} (the padding sentinel), "
                         f"got {int(out.max())}")
    return out


def region_map_from_masks(
    masks: Iterable[np.ndarray | Tensor], areas: Iterable[float], size: tuple[int, int]
) -> Tensor:
    """Binary masks painted into an (H, W) region map as CorrCLIP paints SAM/SAM2 masks: 0 where no
    mask covers, masks sorted by ascending area get ids 1, 2, ... and are painted in that order, so a
    larger mask painted later overwrites the smaller ones it overlaps (the official comment: "larger
    instances painted later overwrite smaller ones")."""
    out = torch.zeros(size, dtype=torch.int64)
    pairs = list(zip(masks, areas, strict=True))
    order = sorted(range(len(pairs)), key=lambda i: pairs[i][1])  # stable, as Python's sorted in the reference
    for region_id, i in enumerate(order, start=1):
        m = torch.as_tensor(np.asarray(pairs[i][0]), dtype=torch.bool)
        out[m] = region_id
    return out


def resize_region_map(region_map: Tensor, size: tuple[int, int]) -> Tensor:
    """(H, W) region map -> (h, w) by nearest neighbour, exactly as the reference resizes it to the
    processed image (``F.interpolate(map.float(), size, mode="nearest")``, then back to integers)."""
    if tuple(region_map.shape[-2:]) == tuple(size):
        return region_map
    out = F.interpolate(region_map[None, None].float(), size=size, mode="nearest")[0, 0]
    return out.to(torch.int64)
