"""SAM's memory needs: a rough estimate, checked before building SAM and before the first image."""

from __future__ import annotations

import os

import torch

from dapseg.models.sam.build import SAM_VARIANTS, image_encoder_of, sam_variant


def _encode_bytes(tokens: int, width: int, heads: int, chunk: int, dtype_bytes: int) -> int:
    """Encoder activations (a few token maps, one MLP hidden map) + one chunk of attention rows
    (logits, probabilities and relative-position terms, fp32) + the mask decoder's per-class batch."""
    acts = tokens * width * (8 + 4) * dtype_bytes
    attn = 3 * heads * min(chunk, tokens) * tokens * 4
    decoder = 64 * 256 * 256 * 4 * 4
    return acts + attn + decoder


def estimate_sam_bytes(name: str, *, dtype_bytes: int = 4, chunk: int = 512, img_size: int = 1024) -> int:
    """A rough upper estimate of the memory SAM ``name`` needs for one image, weights included (×1.25)."""
    v = SAM_VARIANTS[sam_variant(name)]
    tokens = (img_size // 16) ** 2
    weights = v.params_m * 1_000_000 * dtype_bytes
    heads, width = v.num_heads, v.embed_dim
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
