"""Splice-then-segment (Trident): windows -> dense features -> one full-image map -> global affinity.

Unlike ``slide`` (segment each window, then stitch logits), ``splice`` stitches the windows' *features*
(the head's output tokens after out_proj, before LN_post / proj — where the reference splices them),
averages overlaps, moves the whole map with an affinity computed over the whole image by SAM
(``global_affinity``) and only then applies LN_post, proj and the text cosine, once.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from dapseg.config import InferenceConfig
from dapseg.inference.engine import DenseEngine
from dapseg.inference.global_affinity import AffinityParams, GlobalAffinity, aggregate_map, valid_grid
from dapseg.inference.preprocess import resize_image, short_side_size
from dapseg.inference.strategies import engine_padding, image_affinity_mean
from dapseg.inference.windows import GridAverage, WindowPlan, crop_windows, window_grid
from dapseg.models.sam.build import image_encoder_of
from dapseg.models.sam.encoder import encode_image, reference_sam_image
from dapseg.models.sam.memory import available_bytes, check_encode_memory
from dapseg.registry import STRATEGIES, Need


def splice_features(
    feats: list[Tensor], boxes: list[tuple[int, int, int, int]], image_size: tuple[int, int], cell: float
) -> Tensor:
    """Average window feature maps onto the full-image grid.

    feats[i]: (D, h_i, w_i) features of window i covering pixels boxes[i] = (y1, x1, y2, x2) of an
    image of ``image_size`` (H, W); ``cell`` = pixels per feature cell (e.g. 16 for ViT-B/16 on a
    336 window with a 21 × 21 grid). Output: (D, ceil(H / cell), ceil(W / cell)); a window whose grid
    does not match its box on that grid (padding, odd sizes) is bilinearly resized onto it.
    Cells no window covers (none, for the usual window layouts) stay zero.
    """
    if len(feats) != len(boxes) or not feats:
        raise ValueError(f"need one box per window feature map, got {len(feats)} maps and {len(boxes)} boxes")
    avg = GridAverage(image_size, cell, feats[0].shape[0], feats[0].device)
    for f, box in zip(feats, boxes, strict=True):
        avg.add(f, box)
    return avg.mean()


class SpliceParams(AffinityParams):
    """``inference.params`` of ``mode: splice`` (the affinity settings plus these)."""

    kind: Literal["cos", "attn", "aff", "none"] = "aff"  # none: splice only, no global aggregation
    sam_splits: int = Field(default=1, ge=1)  # SAM on this many vertical strips (reference: 2 for Cityscapes)
    align: bool = True  # resize the image to multiples of the patch size (>= crop), as the reference
    # What SAM sees. original (reference): the image as loaded, sides rounded up to multiples of the
    # CLIP patch with cv2, then segment-anything's ResizeLongestSide + Sam.preprocess. short_side: the
    # same after resizing the original to the dataset's short side with cv2. processed: the spliced
    # working image, resized in torch (no uint8 rounding).
    sam_input: Literal["original", "short_side", "processed"] = "original"


def splice_size(h: int, w: int, patch: int, crop: int) -> tuple[int, int]:
    """The reference's resize before splicing: sides multiples of ``patch`` and at least ``crop``.

    An image already a multiple of the patch size is kept (even when smaller than a window: it is then
    one window of its own size). Otherwise the long side is rounded up to a multiple of the patch, the
    short side scaled with it and rounded up too, and both raised to at least ``crop``.
    """
    if h % patch == 0 and w % patch == 0:
        return h, w
    long = max(h, w)
    dst = -(-long // patch) * patch
    nh, nw = int(h * dst / long), int(w * dst / long)
    nh, nw = -(-nh // patch) * patch, -(-nw // patch) * patch
    return max(nh, crop), max(nw, crop)


def splice_plan(size: tuple[int, int], cfg: InferenceConfig, patch: int, align: bool) -> WindowPlan:
    """The working size (``splice_size`` of the image ``size`` when ``align``) and its windows."""
    h, w = splice_size(*size, patch, cfg.crop) if align else size
    return WindowPlan((h, w), window_grid(h, w, cfg.crop, cfg.stride))


def splice_windows(size: tuple[int, int], cfg: InferenceConfig, patch: int) -> WindowPlan:
    """The strategy's window plan (registry extra ``windows``), with ``align`` from ``cfg.params``."""
    return splice_plan(size, cfg, patch, SpliceParams(**cfg.params).align)


def window_features(
    engine: DenseEngine, image01: Tensor, text: Tensor, cfg: InferenceConfig
) -> tuple[list[Tensor], list[tuple[int, int, int, int]], float]:
    """Head features of every window, padding cropped away: ([(D, h_i, w_i)], boxes, pixels per cell)."""
    _, h, w = image01.shape
    windows = window_grid(h, w, cfg.crop, cfg.stride)
    wh, ww = windows[0].size
    pad = engine_padding(engine, wh, ww, cfg.pad_multiple)
    mean, vfm_outs = image_affinity_mean(engine, image01, windows, cfg)  # mean_scope="image": all windows
    feats: list[Tensor] = []
    cell = 0.0
    for k, start in enumerate(range(0, len(windows), cfg.max_batch)):
        batch = windows[start : start + cfg.max_batch]
        crops = pad.apply(crop_windows(image01, batch), engine.clip.mean)
        out = engine.head_output(crops, text, vfm_out=vfm_outs[k], affinity_mean=mean)
        if out.branches:  # the spliced map holds one set of tokens before LN_post
            raise ValueError(f"inference.mode=splice cannot splice head {engine.head.name!r}: it fuses several "
                             "branches after LN_post; use inference.mode=slide or whole")
        gh, gw = out.grid
        maps = out.tokens.float().transpose(1, 2).reshape(len(batch), -1, gh, gw)  # (B, D, gh, gw)
        maps, cell = pad.crop_cells(maps, (wh, ww))  # cell: pixels per feature cell (the head grid's patch)
        feats.extend(maps.unbind(0))
    boxes = [(win.y1, win.x1, win.y2, win.x2) for win in windows]
    return feats, boxes, cell


def sam_image(
    image01: Tensor, original: np.ndarray | None, p: SpliceParams, patch: int, short_side: int | None
) -> Tensor | np.ndarray:
    """What SAM encodes (see ``SpliceParams.sam_input``): a uint8 (H, W, 3) array for the
    segment-anything preprocessing, or the working image (3, h, w) in [0, 1] for ``processed``.

    Without ``original`` (a strategy called directly, not through a Segmenter) the working image,
    back in uint8, stands in for it.
    """
    if p.sam_input == "processed":
        return image01
    if original is None:
        original = image01.mul(255).round().clamp(0, 255).byte().permute(1, 2, 0).cpu().numpy()
    if p.sam_input == "short_side" and short_side:
        original = resize_image(original, short_side_size(*original.shape[:2], short_side))
    return reference_sam_image(np.ascontiguousarray(original), patch)


def global_aggregate(
    sam: object, image: Tensor | np.ndarray, spliced: Tensor, p: SpliceParams,
    autocast: Callable[[], AbstractContextManager[object]] = nullcontext,
) -> Tensor:
    """Aggregate the spliced map (D, gh, gw) with SAM's affinity over the image: (D, vh, vw).

    image: what SAM sees (``sam_image``): (H, W, 3) uint8 or (3, H, W) in [0, 1].
    ``sam_splits`` > 1 runs SAM on vertical strips, each strip's features moved by its own affinity.
    ``autocast``: the context SAM's encoder runs in (the engine's precision); the affinity itself is
    float32 whatever it is (it thresholds values near 0).
    """
    check_encode_memory(sam, chunk=p.chunk)
    enc_module = image_encoder_of(sam)
    sam_patch = enc_module.patch_embed.proj.stride[0]
    w = image.shape[1] if isinstance(image, np.ndarray) else image.shape[-1]
    most = enc_module.img_size // sam_patch  # SAM shrinks the long side to img_size: a side more than
    # this many times shorter would vanish below one SAM patch (or to 0 px: "height and width must be > 0")
    gw = spliced.shape[-1]
    k = min(p.sam_splits, w, gw)
    parts = []
    for i in range(k):
        x0, x1 = i * w // k, (i + 1) * w // k
        c0, c1 = i * gw // k, (i + 1) * gw // k
        strip = np.ascontiguousarray(image[:, x0:x1]) if isinstance(image, np.ndarray) else image[:, :, x0:x1]
        with autocast():
            enc = encode_image(enc_module, _at_most_thin(strip, most), chunk=p.chunk)
        aff = GlobalAffinity(enc.last, valid_grid(enc.input_size, sam_patch), p)
        parts.append(aggregate_map(spliced[:, :, c0:c1], aff))
    vh = parts[0].shape[1]
    parts = [t if t.shape[1] == vh else F.interpolate(t[None], (vh, t.shape[2]), mode="bilinear",
                                                       align_corners=False)[0] for t in parts]
    return torch.cat(parts, dim=-1)


def splice_bytes(h: int, w: int, cfg: InferenceConfig, *, patch: int, width: int, heads: int) -> int:
    """A rough upper estimate (×1.25) of the memory splicing an (h, w) working image takes, fp32: the
    image and its resized copy, one batch of windows through the last block (attention logits and
    probabilities, token activations), every window's features and the spliced map."""
    windows = window_grid(h, w, cfg.crop, cfg.stride)
    tokens = -(-cfg.crop // patch) ** 2 + 1
    batch = min(cfg.max_batch, len(windows))
    images = 2 * 3 * h * w * 4
    attn = 3 * batch * heads * tokens * tokens * 4
    acts = 12 * batch * tokens * width * 4
    feats = len(windows) * tokens * width * 4 + 3 * width * (-(-h // patch)) * (-(-w // patch)) * 4
    return int(1.25 * (images + attn + acts + feats))


def check_splice_memory(engine: DenseEngine, h: int, w: int, cfg: InferenceConfig) -> None:
    """Fail before any window when splicing clearly will not fit (as SAM's memory check does)."""
    block = engine.clip.last_block
    need = splice_bytes(h, w, cfg, patch=engine.clip.patch_size, width=int(block.attn.embed_dim),
                        heads=int(block.attn.num_heads))
    have = available_bytes(engine.device)
    if have is not None and need > have:
        raise MemoryError(
            f"splicing a {w}x{h} working image with inference.crop={cfg.crop} needs about {need / 2**30:.1f} GiB "
            f"on {engine.device} but only {have / 2**30:.1f} GiB is free; use a smaller inference.crop (or "
            f"inference.max_batch), or a device with more memory")


def _at_most_thin(image: Tensor | np.ndarray, most: int) -> Tensor | np.ndarray:
    """A very thin image (long side more than ``most`` times the short one) stretched along its short
    side to that ratio; SAM's affinity grid then has at least one row / column, and the spliced map is
    resized onto it as for any other image. Others are returned unchanged (the reference's path)."""
    h, w = image.shape[:2] if isinstance(image, np.ndarray) else image.shape[-2:]
    th, tw = max(h, -(-w // most)), max(w, -(-h // most))
    if (th, tw) == (h, w):
        return image
    if isinstance(image, np.ndarray):
        return resize_image(image, (th, tw))
    return F.interpolate(image[None], (th, tw), mode="bilinear", align_corners=False)[0]


def _splice_needs(p: SpliceParams) -> frozenset[Need]:
    if p.kind == "none":
        return frozenset()
    return frozenset({Need.SAM_ENCODER} if p.sam_input == "processed" else {Need.SAM_ENCODER, Need.ORIGINAL_IMAGE})


@STRATEGIES.register("splice", params=SpliceParams, needs=_splice_needs,
                     description="windows' features spliced, moved by SAM's global affinity, classified once",
                     extras={"windows": splice_windows,
                             # names in this module, timed by `dapseg bench` as their own stages
                             "stages": {"sam": ("encode_image",), "global_affinity": ("aggregate_map",)}})
class SpliceStrategy:
    """Splice-then-segment with its params validated once; ``sam_encoder``: the configured SAM
    (any module ``image_encoder_of`` accepts), needed unless ``kind`` is ``none``."""

    def __init__(self, params: SpliceParams | None = None, *, sam_encoder: object | None = None) -> None:
        self.params = params or SpliceParams()
        if self.params.kind != "none" and sam_encoder is None:
            raise ValueError("inference.mode=splice with a global affinity needs a SAM model: add "
                             "`sam: {name: sam_vitb}` to the config, or set inference.params.kind=none")
        self.sam = sam_encoder

    def __call__(self, engine: DenseEngine, image01: Tensor, text: Tensor, cfg: InferenceConfig,
                 original: np.ndarray | None = None) -> Tensor:
        """(3, H, W) in [0, 1] -> cosine logits (Q, H, W).

        original: the image as loaded, (H0, W0, 3) uint8 RGB, for SAM (``SpliceParams.sam_input``).
        """
        p = self.params
        _, H, W = image01.shape
        h, w = splice_plan((H, W), cfg, engine.clip.patch_size, p.align).size
        check_splice_memory(engine, h, w, cfg)  # before the working image is made (it may be huge)
        image01 = image01.to(engine.device)
        img = image01 if (h, w) == (H, W) else F.interpolate(
            image01[None], (h, w), mode="bilinear", align_corners=False)[0]
        feats, boxes, cell = window_features(engine, img, text, cfg)
        spliced = splice_features(feats, boxes, (h, w), cell)  # (D, gh, gw)
        if p.kind == "none":
            agg = spliced
        else:
            sam_in = sam_image(img, original, p, engine.clip.patch_size, cfg.short_side)
            agg = global_aggregate(self.sam, sam_in, spliced, p, engine.autocast)
        d, gh, gw = agg.shape
        logits = engine.patch_logits(agg.reshape(d, -1).T[None], (gh, gw), text)  # (1, Q, gh, gw)
        return F.interpolate(logits, (H, W), mode="bilinear", align_corners=False)[0]
