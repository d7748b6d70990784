"""Stitched last-block attention (``inference.mode: stitch``, after OV-Stitcher).

``slide`` runs the whole CLIP per window, so a patch's last-block attention never sees past its
window. ``stitch`` runs blocks 1..L-1 (and the VFM, for proxy / dap heads) per window, exactly as
slide does, then:

1. maps every window's tokens to image positions on one token grid of the whole image (the
   windows' offsets are multiples of the patch size once the image is aligned, see ``align``);
2. where windows overlap, *averages* the tokens of one position (and the windows' CLS tokens), so
   the image has one token per position: the last block then attends over the image once, with no
   duplicated keys that would weigh overlap regions twice, and with a single window the result is
   exactly ``whole``;
3. runs the head's last-block attention over all stitched tokens, by the head's own stitched form
   (``Head.stitched``, see ``heads/stitched.py``), rows in chunks of ``chunk`` so memory grows as
   heads · chunk · N;
4. LN_post, proj and the text cosine once, bilinear to the image size.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from dapseg.config import InferenceConfig
from dapseg.heads.stitched import StitchedTokens, stitched_form
from dapseg.inference.engine import DenseEngine
from dapseg.inference.preprocess import normalize
from dapseg.inference.strategies import engine_padding
from dapseg.inference.windows import GridAverage, WindowPlan, crop_windows, window_grid
from dapseg.registry import STRATEGIES

# why the stitched last block takes no plug-in (the strategy's ``no_plugins`` extra)
NO_PLUGINS = ("the stitched last block runs each head's own stitched attention over the whole image; "
              "a plug-in's reworked attention has no stitched form (use inference.mode=slide)")


class StitchParams(BaseModel):
    """``inference.params`` of ``mode: stitch``."""

    model_config = ConfigDict(extra="forbid")

    chunk: int = Field(default=1024, ge=1)  # attention rows per chunk (memory ∝ heads · chunk · N)
    align: bool = True  # sides to the nearest multiple of the CLIP patch: windows land exactly on the grid


def aligned_size(h: int, w: int, patch: int) -> tuple[int, int]:
    """Each side rounded to the nearest multiple of ``patch`` (at least one patch).

    With ``crop`` and ``stride`` multiples of the patch too, every window of ``window_grid`` (the
    last one is shifted back to end at the border) then starts on a token boundary. The aspect ratio
    changes by at most half a patch per side.
    """
    return max(patch, round(h / patch) * patch), max(patch, round(w / patch) * patch)


def stitch_plan(size: tuple[int, int], cfg: InferenceConfig, patch: int, align: bool) -> WindowPlan:
    """The working size (the image ``size`` aligned to ``patch`` when ``align``) and its windows."""
    h, w = aligned_size(*size, patch) if align else size
    return WindowPlan((h, w), window_grid(h, w, cfg.crop, cfg.stride))


def stitch_windows(size: tuple[int, int], cfg: InferenceConfig, patch: int) -> WindowPlan:
    """The strategy's window plan (registry extra ``windows``), with ``align`` from ``cfg.params``."""
    return stitch_plan(size, cfg, patch, StitchParams(**cfg.params).align)


def window_tokens(engine: DenseEngine, image01: Tensor, cfg: InferenceConfig, with_vfm: bool) -> StitchedTokens:
    """Blocks 1..L-1 (and, ``with_vfm``, the VFM) per window, averaged onto the image's token grids."""
    _, h, w = image01.shape
    windows = window_grid(h, w, cfg.crop, cfg.stride)
    wh, ww = windows[0].size
    pad = engine_padding(engine, wh, ww, cfg.pad_multiple)
    clip_grid: GridAverage | None = None
    vfm_grid: GridAverage | None = None
    cls_sum: Tensor | None = None
    for start in range(0, len(windows), cfg.max_batch):
        batch = windows[start : start + cfg.max_batch]
        boxes = [(win.y1, win.x1, win.y2, win.x2) for win in batch]
        crops = pad.apply(crop_windows(image01, batch), engine.clip.mean)
        with engine.autocast():
            x, (gh, gw) = engine.clip.tokens_before_last_block(normalize(crops, engine.clip.mean, engine.clip.std))
            feats = engine.vfm(crops).feats if with_vfm else None  # (B, C', h', w')
        cls = x[:, 0].float().sum(0)  # (D,)
        cls_sum = cls if cls_sum is None else cls_sum + cls
        maps = x[:, 1:].float().transpose(1, 2).reshape(len(batch), -1, gh, gw)  # (B, D, gh, gw)
        maps, cell = pad.crop_cells(maps, (wh, ww))
        clip_grid = clip_grid or GridAverage((h, w), cell, maps.shape[1], maps.device)
        for m, box in zip(maps, boxes, strict=True):
            clip_grid.add(m, box)
        if feats is not None:
            f, vcell = pad.crop_cells(feats.float(), (wh, ww))
            vfm_grid = vfm_grid or GridAverage((h, w), vcell, f.shape[1], f.device)
            for m, box in zip(f, boxes, strict=True):
                vfm_grid.add(m, box)
    assert clip_grid is not None and cls_sum is not None
    x_map = clip_grid.mean()  # (D, gh, gw) overlaps averaged
    cls_mean = cls_sum / len(windows)
    x_img = torch.cat([cls_mean[None], x_map.flatten(1).T], dim=0)  # (1 + N, D)
    return StitchedTokens(x=x_img, grid=(x_map.shape[-2], x_map.shape[-1]),
                          vfm_feats=vfm_grid.mean() if vfm_grid is not None else None,  # (C', gh', gw')
                          image=image01, window_area=wh * ww)


def stitch(engine: DenseEngine, image01: Tensor, text: Tensor, cfg: InferenceConfig,
           params: StitchParams | None = None) -> Tensor:
    """Stitched last-block attention: (3, H, W) in [0, 1] -> cosine logits (Q, H, W).

    params: the validated ``inference.params`` (the registered strategy passes them; called directly,
    they are read from ``cfg``)."""
    p = params or StitchParams(**cfg.params)
    if engine.plugin is not None:
        raise ValueError(f"inference.mode=stitch takes no plug-in: {NO_PLUGINS}")
    stitched_fn, needs_vfm = stitched_form(engine.head)
    if needs_vfm and engine.vfm is None:
        raise ValueError(f"head {engine.head.name!r} needs a VFM: configure a `vfm:` section")
    _, H, W = image01.shape
    image01 = image01.to(engine.device)
    h, w = stitch_plan((H, W), cfg, engine.clip.patch_size, p.align).size
    img = image01 if (h, w) == (H, W) else F.interpolate(
        image01[None], (h, w), mode="bilinear", align_corners=False)[0]
    with torch.no_grad():
        stitched = window_tokens(engine, img, cfg, needs_vfm)
        with engine.autocast():
            tokens, grid = stitched_fn(engine.clip.last_block, stitched, p.chunk)  # (n, D)
        logits = engine.patch_logits(tokens[None], grid, text)  # (1, Q, gh, gw)
    return F.interpolate(logits, (H, W), mode="bilinear", align_corners=False)[0]


STRATEGIES.register("stitch", params=StitchParams,
                    description="window tokens averaged onto the image grid, one last-block attention over all",
                    extras={"windows": stitch_windows, "no_plugins": NO_PLUGINS})(
    lambda p: partial(stitch, params=p))
