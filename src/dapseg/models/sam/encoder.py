"""SAM (segment-anything) on the whole image: a memory-bounded encoder forward.

``encode_image`` is our own forward over segment-anything's ``ImageEncoderViT`` modules (no patching):
windowed blocks run as the library runs them; global blocks run the same attention in chunks of query
rows, so no (heads, G, G) matrix is ever formed (G = 4096 at 1024: the library's forward would hold
~0.8 GB per matrix for ViT-B and ~1 GB for ViT-H). It returns the neck features that
``SamPredictor`` uses and the last block's q, k, v for the global affinity.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, Sam
from segment_anything.modeling.image_encoder import Attention, Block, get_rel_pos
from segment_anything.utils.transforms import ResizeLongestSide
from torch import Tensor, nn

from dapseg.models.sam.attention import add_rel_pos_rows_, rel_pos_bias
from dapseg.models.sam.build import SAM_PIXEL_MEAN, SAM_PIXEL_STD, image_encoder_of


@dataclass
class SamLastAttention:
    """q, k, v of SAM's last (global) encoder block on its padded G = gh · gw grid, one image.

    Attention rows are recomputed on demand exactly as segment-anything's ``Attention`` computes them
    (scaled q·k plus decomposed relative positions, softmax over all G keys), never all at once.
    """

    q: Tensor  # (heads, G, d) unscaled queries
    k: Tensor  # (heads, G, d)
    v: Tensor  # (heads, G, d)
    grid: tuple[int, int]  # (gh, gw), 64 × 64 for SAM at 1024
    scale: float  # d ** -0.5
    rel_pos_h: Tensor | None = None  # the block's (2·gh − 1, d) table, or None without rel. positions
    rel_pos_w: Tensor | None = None

    def attention_rows(self, rows: Tensor) -> Tensor:
        """Softmax attention of the query tokens ``rows`` (n,) over all G keys: (heads, n, G)."""
        gh, gw = self.grid
        q = self.q[:, rows].float()  # (heads, n, d)
        logits = (q * self.scale) @ self.k.float().transpose(-2, -1)  # (heads, n, G)
        if self.rel_pos_h is not None and self.rel_pos_w is not None:
            rh = get_rel_pos(gh, gh, self.rel_pos_h.float())  # (gh, gh, d)
            rw = get_rel_pos(gw, gw, self.rel_pos_w.float())  # (gw, gw, d)
            add_rel_pos_rows_(logits, q, rh, rw, rows, (gh, gw))
        return logits.softmax(-1)


@dataclass
class SamEncoding:
    """One image through SAM's encoder."""

    features: Tensor  # (1, C, gh, gw) neck output, as SamPredictor.features
    last: SamLastAttention  # q, k, v of the last block on the (gh, gw) grid
    input_size: tuple[int, int]  # (h, w) of the image resized to long side img_size (before padding)
    original_size: tuple[int, int]  # (H, W) of the image given


def _chunked_global_attention(attn: Attention, x: Tensor, chunk: int, keep: bool) -> tuple[Tensor, tuple]:
    """segment-anything's ``Attention.forward`` for x (B, H, W, C), in chunks of query rows."""
    b, h, w, _ = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x).reshape(b, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, heads, G, d)
    q, k, v = qkv.unbind(0)
    rh = get_rel_pos(h, h, attn.rel_pos_h) if attn.use_rel_pos else None  # (h, h, d)
    rw = get_rel_pos(w, w, attn.rel_pos_w) if attn.use_rel_pos else None  # (w, w, d)
    out = torch.empty_like(q)
    for s in range(0, h * w, chunk):
        e = min(s + chunk, h * w)
        qc = q[:, :, s:e]  # (B, heads, n, d)
        bias = None
        if rh is not None and rw is not None:
            bias = rel_pos_bias(qc, rh, rw, torch.arange(s, e, device=x.device), (h, w))  # (B, heads, n, G)
        # softmax(q·kᵀ·scale + bias)·v in one fused kernel: no separate (B, heads, n, G) probabilities
        out[:, :, s:e] = F.scaled_dot_product_attention(qc, k, v, attn_mask=bias, scale=attn.scale)
    y = out.view(b, heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
    extra = (q, k, v) if keep else ()
    return attn.proj(y), extra


def _block_forward(blk: Block, x: Tensor, chunk: int, keep: bool) -> tuple[Tensor, tuple]:
    if blk.window_size > 0:
        if keep:
            raise ValueError("the last SAM block is windowed; the global affinity needs global attention")
        return blk(x), ()
    y, extra = _chunked_global_attention(blk.attn, blk.norm1(x), chunk, keep)
    x = x + y
    return x + blk.mlp(blk.norm2(x)), extra


def preprocess(encoder: ImageEncoderViT, image: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """(3, H, W) in [0, 1] -> SAM input (1, 3, S, S) and the resized size (h, w) before padding.

    As ``SamPredictor.set_image``: long side resized to S = img_size, SAM's pixel mean/std (0–255
    scale), zero padding at the bottom/right.
    """
    s = encoder.img_size
    device = next(encoder.parameters()).device
    x = (image.float().clamp(0, 1) * 255.0)[None].to(device)
    # The library's size rule; not its ``apply_image_torch``, which reads the size from the batch and
    # channel axes (B, C) of a BCHW tensor instead of (H, W).
    h, w = ResizeLongestSide.get_preprocess_shape(image.shape[-2], image.shape[-1], s)
    x = nn.functional.interpolate(x, (h, w), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(SAM_PIXEL_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(SAM_PIXEL_STD, device=device).view(1, 3, 1, 1)
    x = nn.functional.pad((x - mean) / std, (0, s - w, 0, s - h))
    return x, (h, w)


def reference_sam_image(image: np.ndarray, multiple: int) -> np.ndarray:
    """The image Trident's reference gives SAM: (H, W, 3) uint8 RGB as loaded -> each side rounded up
    to a multiple of ``multiple`` (the CLIP patch size), resized with cv2's default INTER_LINEAR.

    An image whose sides are already multiples is returned unchanged (the reference's cv2.resize to
    the same size is the identity).
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"SAM input must be an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
    h, w = image.shape[:2]
    th, tw = -(-h // multiple) * multiple, -(-w // multiple) * multiple
    if (th, tw) == (h, w):
        return image
    return cv2.resize(image, (tw, th), interpolation=cv2.INTER_LINEAR)


def library_preprocess(sam: object, image: np.ndarray) -> tuple[Tensor, tuple[int, int]]:
    """(H, W, 3) uint8 RGB -> SAM input (1, 3, S, S) and the resized size (h, w), exactly as
    ``SamPredictor.set_image``: ``ResizeLongestSide(S).apply_image`` (PIL, uint8), then
    ``Sam.preprocess`` (pixel mean/std, zero padding at the bottom/right)."""
    enc = image_encoder_of(sam)
    device = next(enc.parameters()).device
    resized = ResizeLongestSide(enc.img_size).apply_image(image)  # (h, w, 3) uint8
    x = torch.as_tensor(resized, device=device).permute(2, 0, 1).contiguous()[None]  # (1, 3, h, w) uint8
    if isinstance(sam, Sam):
        model: Any = sam
    else:  # the bare encoder: Sam.preprocess only needs its pixel statistics and the encoder's size
        model = SimpleNamespace(
            pixel_mean=torch.tensor(SAM_PIXEL_MEAN, device=device).view(-1, 1, 1),
            pixel_std=torch.tensor(SAM_PIXEL_STD, device=device).view(-1, 1, 1),
            image_encoder=enc,
        )
    return Sam.preprocess(model, x), (int(resized.shape[0]), int(resized.shape[1]))


@torch.no_grad()
def encode_image(sam: object, image: Tensor | np.ndarray, chunk: int = 512) -> SamEncoding:
    """Run SAM's image encoder on one image; global attention in row chunks.

    image: an (H, W, 3) uint8 RGB array goes through segment-anything's own preprocessing
    (``library_preprocess``, as the Trident reference); a (3, H, W) tensor in [0, 1] through
    ``preprocess`` (torch resize, no uint8 rounding). ``sam``: an ImageEncoderViT, a ``Sam`` or the
    VFM registry's SAM (see ``image_encoder_of``).
    """
    enc = image_encoder_of(sam)
    if isinstance(image, np.ndarray):
        x, input_size = library_preprocess(sam, image)
        original_size = (int(image.shape[0]), int(image.shape[1]))
    else:
        x, input_size = preprocess(enc, image)
        original_size = (int(image.shape[-2]), int(image.shape[-1]))
    dtype = next(enc.parameters()).dtype
    x = enc.patch_embed(x.to(dtype))  # (1, gh, gw, C)
    if enc.pos_embed is not None:
        x = x + enc.pos_embed
    qkv: tuple = ()
    for i, blk in enumerate(enc.blocks):
        x, extra = _block_forward(blk, x, chunk, keep=i == len(enc.blocks) - 1)
        qkv = extra or qkv
    feats = enc.neck(x.permute(0, 3, 1, 2))  # (1, C_out, gh, gw)
    last_attn: Attention = enc.blocks[-1].attn
    q, k, v = (t[0].float() for t in qkv)  # (heads, G, d) each
    last = SamLastAttention(
        q=q, k=k, v=v, grid=(x.shape[1], x.shape[2]), scale=float(last_attn.scale),
        rel_pos_h=last_attn.rel_pos_h.detach().float() if last_attn.use_rel_pos else None,
        rel_pos_w=last_attn.rel_pos_w.detach().float() if last_attn.use_rel_pos else None,
    )
    return SamEncoding(features=feats, last=last, input_size=input_size, original_size=original_size)
