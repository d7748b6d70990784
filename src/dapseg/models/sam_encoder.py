"""SAM (segment-anything) for the whole image: building it and a memory-bounded encoder forward.

``encode_image`` is our own forward over segment-anything's ``ImageEncoderViT`` modules (no patching):
windowed blocks run as the library runs them; global blocks run the same attention in chunks of query
rows, so no (heads, G, G) matrix is ever formed (G = 4096 at 1024: the library's forward would hold
~0.8 GB per matrix for ViT-B and ~1 GB for ViT-H). It returns the neck features that
``SamPredictor`` uses and the last block's q, k, v for the global affinity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from segment_anything.modeling.image_encoder import Attention, Block, get_rel_pos
from segment_anything.utils.transforms import ResizeLongestSide
from torch import Tensor, nn

# variant -> (official release file, params in millions, heads, width): segment-anything's build_sam
SAM_MODELS: dict[str, tuple[str, int, int, int]] = {
    "vit_b": ("sam_vit_b_01ec64.pth", 94, 12, 768),
    "vit_l": ("sam_vit_l_0b3195.pth", 312, 16, 1024),
    "vit_h": ("sam_vit_h_4b8939.pth", 641, 16, 1280),
}
SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)  # segment-anything's Sam defaults (ImageNet × 255)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


def sam_variant(name: str) -> str:
    """'vit_b' | 'vit_l' | 'vit_h' for a config name ("sam_vitb", "sam_vit_b", "vit-b", ...)."""
    key = name.lower().replace("-", "").replace("_", "").removeprefix("sam")
    variant = {"vitb": "vit_b", "vitl": "vit_l", "vith": "vit_h"}.get(key)
    if variant is None:
        raise ValueError(f"unknown SAM model {name!r}; valid: sam_vitb, sam_vitl, sam_vith")
    return variant


def tiny_sam(img_size: int = 128) -> Sam:
    """A small random SAM of the library's own modules (tests): ViT width 32, 2 blocks, 16-px patches."""
    encoder = ImageEncoderViT(
        img_size=img_size, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
        out_chans=32, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), use_abs_pos=True,
        use_rel_pos=True, window_size=4, global_attn_indexes=(1,),
    )
    return sam_with_decoder(encoder)


def _encode_bytes(tokens: int, width: int, heads: int, chunk: int, dtype_bytes: int) -> int:
    """Encoder activations (a few token maps, one MLP hidden map) + one chunk of attention rows
    (logits, probabilities and relative-position terms, fp32) + the mask decoder's per-class batch."""
    acts = tokens * width * (8 + 4) * dtype_bytes
    attn = 3 * heads * min(chunk, tokens) * tokens * 4
    decoder = 64 * 256 * 256 * 4 * 4
    return acts + attn + decoder


def estimate_sam_bytes(name: str, *, dtype_bytes: int = 4, chunk: int = 512, img_size: int = 1024) -> int:
    """A rough upper estimate of the memory SAM ``name`` needs for one image, weights included (×1.25)."""
    _, params_m, heads, width = SAM_MODELS[sam_variant(name)]
    tokens = (img_size // 16) ** 2
    weights = params_m * 1_000_000 * dtype_bytes
    return int(1.25 * (weights + _encode_bytes(tokens, width, heads, chunk, dtype_bytes)))


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` (CUDA: free device memory; CPU: MemAvailable), None if unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _fail(what: str, need: int, have: int, device: torch.device) -> None:
    raise MemoryError(
        f"{what} needs about {need / 2**30:.1f} GiB on {device} but only {have / 2**30:.1f} GiB is free; "
        f"use sam.name=sam_vitb, a device with more memory, or a smaller chunk (inference.params.chunk / "
        f"refine.params.chunk)"
    )


def check_memory(name: str, device: torch.device | str, *, chunk: int = 512) -> None:
    """Before building SAM ``name``: fail at once when it clearly will not fit on ``device``."""
    device = torch.device(device)
    need = estimate_sam_bytes(name, chunk=chunk, dtype_bytes=2 if device.type == "cuda" else 4)
    have = available_bytes(device)
    if have is not None and need > have:
        _fail(f"SAM {name!r}", need, have, device)


def check_encode_memory(sam: object, *, chunk: int = 512) -> None:
    """With SAM loaded: fail before any image when encoding one (plus decoding) clearly will not fit."""
    enc = image_encoder_of(sam)
    prm = next(enc.parameters())
    tokens = (enc.img_size // enc.patch_embed.proj.stride[0]) ** 2
    width = enc.patch_embed.proj.out_channels
    need = int(1.25 * _encode_bytes(tokens, width, enc.blocks[-1].attn.num_heads, chunk, prm.element_size()))
    have = available_bytes(prm.device)
    if have is not None and need > have:
        _fail(f"SAM ({width}-wide encoder) at {enc.img_size}px", need, have, prm.device)


def image_encoder_of(sam: object) -> ImageEncoderViT:
    """segment-anything's ImageEncoderViT inside ``sam``: the encoder itself, a ``Sam``, or the VFM
    registry's SAM wrapper (which keeps it as ``.encoder``)."""
    if isinstance(sam, ImageEncoderViT):
        return sam
    for attr in ("image_encoder", "encoder"):
        enc = getattr(sam, attr, None)
        if isinstance(enc, ImageEncoderViT):
            return enc
    raise TypeError(f"{type(sam).__name__} holds no segment-anything ImageEncoderViT (is `sam:` a SAM model?)")


def sam_decoder_file(cfg: Any, *, random_weights: bool, cache_dir: Any = None) -> Path | None:
    """The SAM release file that holds the prompt encoder / mask decoder of VFM config ``cfg``
    (the local ``weights`` file, else the cached download); None for random weights or no SAM."""
    if cfg is None or random_weights:
        return None
    if cfg.weights is not None:
        return Path(cfg.weights)
    from dapseg.models.vfm_loading import fetch_weights  # the VFM registry's cache / download

    return fetch_weights(cfg.name, cache_dir)


def sam_with_decoder(sam: object, *, weights: Path | None = None) -> Sam:
    """A full ``Sam`` (prompt encoder + mask decoder) around the image encoder of ``sam``.

    The decoder matches the encoder's neck width and grid (256 and 64 × 64 for the released models).
    With ``weights`` (the official release file) its prompt_encoder.* and mask_decoder.* tensors are
    loaded; without, the decoder keeps random weights (smoke runs, tests).
    """
    if isinstance(sam, Sam):
        return sam
    enc = image_encoder_of(sam)
    dim = enc.neck[0].out_channels
    grid = enc.img_size // enc.patch_embed.proj.stride[0]
    heads = 8 if dim >= 256 else 2
    prompt = PromptEncoder(
        embed_dim=dim, image_embedding_size=(grid, grid), input_image_size=(enc.img_size, enc.img_size),
        mask_in_chans=16 if dim >= 256 else 4,
    )
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=8 * dim, num_heads=heads),
        transformer_dim=dim, iou_head_depth=3, iou_head_hidden_dim=dim,
    )
    model = Sam(image_encoder=enc, prompt_encoder=prompt, mask_decoder=decoder)
    if weights is not None:
        from dapseg.weights import load_state_dict_file

        state = load_state_dict_file(weights)
        part = {k: v for k, v in state.items() if k.startswith(("prompt_encoder.", "mask_decoder."))}
        if not part:
            raise ValueError(f"{weights} has no prompt_encoder / mask_decoder tensors: not a SAM release file")
        missing = [k for k in model.state_dict() if k.startswith(("prompt_encoder.", "mask_decoder."))
                   and k not in part]
        if missing:
            raise ValueError(f"{weights} lacks SAM decoder tensors, e.g. {missing[0]}")
        model.load_state_dict(part, strict=False)
    device = next(enc.parameters()).device
    return model.eval().to(device)


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
            rh = get_rel_pos(gh, gh, self.rel_pos_h.float())[rows // gw]  # (n, gh, d)
            rw = get_rel_pos(gw, gw, self.rel_pos_w.float())[rows % gw]  # (n, gw, d)
            rel_h = torch.einsum("hnc,nkc->hnk", q, rh)  # (heads, n, gh)
            rel_w = torch.einsum("hnc,nkc->hnk", q, rw)  # (heads, n, gw)
            grid_logits = logits.view(-1, len(rows), gh, gw)  # in place: no (heads, n, G) temporaries
            grid_logits.add_(rel_h[..., None]).add_(rel_w[..., None, :])
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
            rows = torch.arange(s, e, device=x.device)
            rel_h = torch.einsum("bhnc,nkc->bhnk", qc, rh[rows // w])  # (B, heads, n, h)
            rel_w = torch.einsum("bhnc,nkc->bhnk", qc, rw[rows % w])  # (B, heads, n, w)
            bias = (rel_h[..., None] + rel_w[..., None, :]).view(b, heads, e - s, h * w)  # (B, heads, n, G)
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
