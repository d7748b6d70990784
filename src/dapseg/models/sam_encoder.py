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

import torch
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

from dapseg.inference.global_affinity import SamLastAttention

# name -> (segment-anything registry key, release file, params in millions, heads, width, depth)
SAM_MODELS: dict[str, tuple[str, str, int, int, int, int]] = {
    "sam_vit_b": ("vit_b", "sam_vit_b_01ec64.pth", 94, 12, 768, 12),
    "sam_vit_l": ("vit_l", "sam_vit_l_0b3195.pth", 312, 16, 1024, 24),
    "sam_vit_h": ("vit_h", "sam_vit_h_4b8939.pth", 641, 16, 1280, 32),
}
SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"


def sam_key(name: str) -> str:
    """Our SAM name for a config name ("sam_vit_b", "sam-vit-b", "vit_b" all mean ViT-B)."""
    key = name.lower().replace("-", "_")
    if not key.startswith("sam_"):
        key = f"sam_{key}"
    if key not in SAM_MODELS:
        raise ValueError(f"unknown SAM model {name!r}; valid: {', '.join(SAM_MODELS)}")
    return key


def tiny_sam(img_size: int = 128) -> Sam:
    """A small random SAM of the library's own modules (tests): ViT width 32, 2 blocks, 16-px patches."""
    grid = img_size // 16
    encoder = ImageEncoderViT(
        img_size=img_size, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
        out_chans=32, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), use_abs_pos=True,
        use_rel_pos=True, window_size=4, global_attn_indexes=(1,),
    )
    prompt = PromptEncoder(
        embed_dim=32, image_embedding_size=(grid, grid), input_image_size=(img_size, img_size),
        mask_in_chans=4,
    )
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=1, embedding_dim=32, mlp_dim=64, num_heads=2),
        transformer_dim=32, iou_head_depth=2, iou_head_hidden_dim=32,
    )
    return Sam(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder).eval()


def estimate_sam_bytes(name: str, *, dtype_bytes: int = 4, chunk: int = 512, img_size: int = 1024) -> int:
    """A rough upper estimate of the memory SAM ``name`` needs for one image at ``img_size``.

    Weights + encoder activations (a few token maps and one MLP hidden map) + one chunk of attention
    logits/probabilities + the mask decoder's per-class batch; a 1.25 margin on top.
    """
    _, _, params_m, heads, width, _ = SAM_MODELS[sam_key(name)]
    tokens = (img_size // 16) ** 2
    weights = params_m * 1_000_000 * dtype_bytes
    acts = tokens * width * 8 * dtype_bytes + tokens * width * 4 * dtype_bytes
    attn = 3 * heads * min(chunk, tokens) * tokens * 4
    decoder = 64 * 256 * 256 * 4 * 4
    return int(1.25 * (weights + acts + attn + decoder))


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


def check_memory(name: str, device: torch.device, *, dtype_bytes: int = 4, chunk: int = 512) -> None:
    """Fail before any work when SAM ``name`` will clearly not fit on ``device``."""
    need = estimate_sam_bytes(name, dtype_bytes=dtype_bytes, chunk=chunk)
    have = available_bytes(device)
    if have is not None and need > have:
        raise MemoryError(
            f"SAM {name!r} needs about {need / 2**30:.1f} GiB on {device} but only {have / 2**30:.1f} GiB "
            f"is free; use sam.name=sam_vit_b, a device with more memory, or a smaller inference.params.chunk"
        )


def build_sam(
    name: str,
    *,
    weights: Path | None = None,
    random_weights: bool = False,
    tiny: bool = False,
    cache_dir: Path | None = None,
    device: torch.device | str = "cpu",
    check_mem: bool = True,
) -> Sam:
    """segment-anything's ``Sam`` for config name ``name`` (sam_vit_b | sam_vit_l | sam_vit_h).

    ``tiny`` builds ``tiny_sam()``; ``random_weights`` skips loading; otherwise the official release
    file is taken from ``weights`` or the cache directory, and its absence raises WeightsMissingError.
    Memory is checked up front (a clear MemoryError rather than a failure halfway through a dataset).
    """
    from segment_anything import sam_model_registry

    device = torch.device(device)
    key = sam_key(name)
    if tiny:
        return tiny_sam().to(device)
    if check_mem:
        check_memory(key, device)
    registry_key, filename, *_ = SAM_MODELS[key]
    state = None
    if not random_weights:
        path = Path(weights) if weights is not None else None
        if path is None:
            from dapseg.weights import cache_dir as _cache_dir

            path = _cache_dir(cache_dir) / "sam" / filename
        if not path.is_file():
            from dapseg.weights import WeightsMissingError

            raise WeightsMissingError(
                f"SAM {key} weights ({path})",
                f"download {SAM_URL}{filename} to {path} (or run `dapseg download` on a connected machine), "
                f"or pass --sam-weights PATH",
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
    sam = sam_model_registry[registry_key](checkpoint=None)
    if state is not None:
        sam.load_state_dict(state)
    return sam.eval().to(device)


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
        logits = (qc * attn.scale) @ k.transpose(-2, -1)  # (B, heads, n, G)
        if rh is not None and rw is not None:
            rows = torch.arange(s, e, device=x.device)
            rel_h = torch.einsum("bhnc,nkc->bhnk", qc, rh[rows // w])
            rel_w = torch.einsum("bhnc,nkc->bhnk", qc, rw[rows % w])
            logits = (logits.view(b, heads, e - s, h, w) + rel_h[..., None] + rel_w[..., None, :])
            logits = logits.view(b, heads, e - s, h * w)
        out[:, :, s:e] = logits.softmax(-1) @ v
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


def preprocess(sam: Sam, image: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """(3, H, W) in [0, 1] -> SAM input (1, 3, S, S) and the resized size (h, w) before padding."""
    img_size = sam.image_encoder.img_size
    x = (image.float().clamp(0, 1) * 255.0)[None]
    h, w = ResizeLongestSide.get_preprocess_shape(image.shape[-2], image.shape[-1], img_size)
    x = nn.functional.interpolate(x, (h, w), mode="bilinear", align_corners=False, antialias=True)
    return sam.preprocess(x.to(sam.pixel_mean.device)), (h, w)  # normalise with SAM's mean/std, pad


@torch.no_grad()
def encode_image(sam: Sam, image: Tensor, chunk: int = 512) -> SamEncoding:
    """Run SAM's image encoder on one image (3, H, W) in [0, 1]; global attention in row chunks."""
    enc: ImageEncoderViT = sam.image_encoder
    x, input_size = preprocess(sam, image)
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
    return SamEncoding(features=feats, last=last, input_size=input_size,
                       original_size=(int(image.shape[-2]), int(image.shape[-1])))
