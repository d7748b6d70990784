"""Building SAM (segment-anything) the way its ``build_sam`` does: one table of the released variants,
the image encoder, the full ``Sam`` with prompt encoder and mask decoder, and the tiny test SAM.

segment-anything's own modules are used throughout (``ImageEncoderViT``, ``PromptEncoder``,
``MaskDecoder``, ``TwoWayTransformer``), so official release files load by their own key names.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from torch import nn

SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
SAM_IMAGE_SIZE = 1024
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)  # segment-anything's Sam defaults (ImageNet × 255)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class SamVariant:
    """One released SAM: segment-anything's ``build_sam`` hyper-parameters and its release file."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    release_file: str  # the official file (``SAM_URL`` + this)
    params_m: int  # parameters in millions (memory estimate)


SAM_VARIANTS: dict[str, SamVariant] = {
    "vit_b": SamVariant(768, 12, 12, (2, 5, 8, 11), "sam_vit_b_01ec64.pth", 94),
    "vit_l": SamVariant(1024, 24, 16, (5, 11, 17, 23), "sam_vit_l_0b3195.pth", 312),
    "vit_h": SamVariant(1280, 32, 16, (7, 15, 23, 31), "sam_vit_h_4b8939.pth", 641),
}


def sam_variant(name: str) -> str:
    """'vit_b' | 'vit_l' | 'vit_h' for a config name ("sam_vitb", "sam_vit_b", "vit-b", ...)."""
    key = name.lower().replace("-", "").replace("_", "").removeprefix("sam")
    variant = {"vitb": "vit_b", "vitl": "vit_l", "vith": "vit_h"}.get(key)
    if variant is None:
        raise ValueError(f"unknown SAM model {name!r}; valid: sam_vitb, sam_vitl, sam_vith")
    return variant


def make_image_encoder(
    variant: str, *, tiny: bool, img_size: int = SAM_IMAGE_SIZE, window_size: int = 14
) -> ImageEncoderViT:
    """An ``ImageEncoderViT`` as segment-anything's ``_build_sam`` builds it (tiny: 2 blocks, width 32,
    the last global). The one place a SAM encoder is built, the tiny one included."""
    if tiny:
        dim, depth, heads, global_idx, out_chans = 32, 2, 2, (1,), 32
    else:
        v = SAM_VARIANTS[variant]
        dim, depth, heads, global_idx, out_chans = v.embed_dim, v.depth, v.num_heads, v.global_attn_indexes, 256
    return ImageEncoderViT(
        img_size=img_size,
        patch_size=16,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=4,
        out_chans=out_chans,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=window_size,
        global_attn_indexes=global_idx,
    )


def randomize_position_terms(enc: ImageEncoderViT, std: float = 0.02) -> None:
    """segment-anything zero-initialises pos_embed and rel_pos; random weights get small noise
    instead, so that random models depend on position as trained ones do."""
    with torch.no_grad():
        if enc.pos_embed is not None:
            enc.pos_embed.normal_(0.0, std)
        for blk in enc.blocks:
            if blk.attn.use_rel_pos:
                blk.attn.rel_pos_h.normal_(0.0, std)
                blk.attn.rel_pos_w.normal_(0.0, std)


def tiny_sam(img_size: int = 128) -> Sam:
    """A small random full SAM (tests): the tiny image encoder of ``make_image_encoder`` at
    ``img_size``, with 4-token windows so that small images still have several, and its decoder."""
    return sam_with_decoder(make_image_encoder("vit_b", tiny=True, img_size=img_size, window_size=4))


def image_encoder_of(sam: object) -> ImageEncoderViT:
    """segment-anything's ImageEncoderViT inside ``sam``: the encoder itself, a ``Sam``, or the VFM
    registry's SAM wrapper (which keeps it as ``.encoder``)."""
    if isinstance(sam, ImageEncoderViT):
        return sam
    for attr in ("image_encoder", "encoder"):
        enc = getattr(sam, attr, None)
        if isinstance(enc, ImageEncoderViT):
            return enc
        inner = getattr(enc, "encoder", None)  # a module running it (heads.regions: at its weights' dtype)
        if isinstance(inner, ImageEncoderViT):
            return inner
    raise TypeError(f"{type(sam).__name__} holds no segment-anything ImageEncoderViT (is `sam:` a SAM model?)")


def sam_decoder_file(cfg: Any, *, random_weights: bool, cache_dir: Any = None) -> Path | None:
    """The SAM release file that holds the prompt encoder / mask decoder of VFM config ``cfg``
    (the local ``weights`` file, else the cached download); None for random weights or no SAM."""
    if cfg is None or random_weights:
        return None
    if cfg.weights is not None:
        return Path(cfg.weights)
    from dapseg.models.vfm.loading import fetch_weights  # the VFM registry's cache / download

    return fetch_weights(cfg.name, cache_dir)


DECODER_PREFIXES = ("prompt_encoder.", "mask_decoder.")


def decoder_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The prompt encoder / mask decoder entries of a SAM release file's state dict."""
    return {k: v for k, v in state.items() if k.startswith(DECODER_PREFIXES)}


def sam_with_decoder(sam: object, *, weights: Path | None = None,
                     decoder_state: dict[str, torch.Tensor] | None = None) -> Sam:
    """A full ``Sam`` (prompt encoder + mask decoder) around the image encoder of ``sam``.

    The decoder matches the encoder's neck width and grid (256 and 64 × 64 for the released models).
    Its prompt_encoder.* and mask_decoder.* tensors come from ``decoder_state`` (kept when the
    encoder was loaded, so the release file is read once) or from ``weights`` (the official release
    file); without either, the decoder keeps random weights (smoke runs, tests).
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
    if decoder_state is None and weights is not None:
        from dapseg.weights import load_state_dict_file

        decoder_state = decoder_tensors(load_state_dict_file(weights))
    if decoder_state is not None:
        source = weights or "the SAM weights file"
        if not decoder_state:
            raise ValueError(f"{source} has no prompt_encoder / mask_decoder tensors: not a SAM release file")
        missing = [k for k in model.state_dict() if k.startswith(DECODER_PREFIXES) and k not in decoder_state]
        if missing:
            raise ValueError(f"{source} lacks SAM decoder tensors, e.g. {missing[0]}")
        model.load_state_dict(decoder_state, strict=False)
    device = next(enc.parameters()).device
    return model.eval().to(device)


def sam_around(sam: Sam, encoder_source: object) -> Sam:
    """The full SAM ``sam`` with the image encoder of ``encoder_source`` in place of its own (e.g. the
    same encoder held in another dtype); the prompt encoder and mask decoder are shared, not copied.
    ``sam`` itself when it already holds that encoder."""
    enc = image_encoder_of(encoder_source)
    if sam.image_encoder is enc:
        return sam
    model = Sam(image_encoder=enc, prompt_encoder=sam.prompt_encoder, mask_decoder=sam.mask_decoder,
                pixel_mean=sam.pixel_mean.flatten().tolist(), pixel_std=sam.pixel_std.flatten().tolist())
    return model.eval().to(sam.pixel_mean.device)
