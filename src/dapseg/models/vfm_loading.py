"""Building a VFM architecture and filling it: random init, the hub cache, or an official file.

Official release files and their conversion to the module keys:

* DINO ``dino_vitbase8_pretrain.pth`` etc.: a plain state dict with timm's key names already
  (``module.`` / ``backbone.`` prefixes stripped, projection ``head.*`` dropped).
* DINOv2 ``dinov2_vitb14[_reg4]_pretrain.pth``: timm's ``checkpoint_filter_fn`` (drops
  ``mask_token``; with registers: ``register_tokens`` -> ``reg_token`` and the CLS position folded
  into ``cls_token``, since timm's register layout gives CLS/registers no position entries).
* MAE ``mae_pretrain_vit_base.pth``: ``{"model": state dict}`` with timm's key names; the model is
  built at 224 (the checkpoint's 14×14 grid), loaded, then its position embedding is resized to the
  window grid the way MAE's ``interpolate_pos_embed`` does.
* SAM ``sam_vit_b_01ec64.pth``: the whole SAM; the ``image_encoder.`` entries are kept, prefix stripped.
* DINOv3 official ``.pth``: timm's Eva ``checkpoint_filter_fn``.

Loading is strict; a file that does not fit raises ValueError naming it and the missing /
unexpected keys. Files are read with ``torch.load(weights_only=True)`` or safetensors.
"""

from __future__ import annotations

import os
from pathlib import Path

import timm
import torch
from torch import nn

from dapseg import weights as W
from dapseg.models.vfm import VfmSpec, VisionFoundationModel, list_vfms, vfm_spec
from dapseg.models.vfm_dinov3 import Dinov3Vfm
from dapseg.models.vfm_sam import SamVfm, make_sam_encoder, randomize_position_terms
from dapseg.models.vfm_vit import TimmVitVfm, resize_pos_embed_mae

_HUB_FILES = ("model.safetensors", "pytorch_model.bin")


def how_to_get(spec: VfmSpec) -> str:
    """The instruction printed when ``spec``'s weights are missing."""
    return (
        f"{W.how_to_fetch(None)} For {spec.name} (any preset whose vfm is {spec.name!r}) the local file "
        f"is the official release {spec.official_file} (--vfm-weights PATH)."
    )


def _what(spec: VfmSpec) -> str:
    src = spec.hub if spec.family == "sam" else f"Hugging Face hub timm/{spec.hub}"
    return f"{spec.description} ({spec.name}) pretrained weights from {src}"


def _url_cache_path(spec: VfmSpec, cache_dir: str | os.PathLike | None) -> Path:
    return W.torch_cache(cache_dir) / "checkpoints" / spec.hub.rsplit("/", 1)[-1]


def cached_weights(name: str, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The cached pretrained file of VFM ``name``, or None; never touches the network."""
    spec = vfm_spec(name)
    if spec.family == "sam":
        path = _url_cache_path(spec, cache_dir)
        return path if path.is_file() else None
    return W.cached_hf_file(f"timm/{spec.hub}", list(_HUB_FILES), cache_dir)


def fetch_weights(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The pretrained file of VFM ``name``: cached, else downloaded, else ``WeightsMissingError``.

    Offline-ness is checked (env HF_HUB_OFFLINE, then a short connection probe) before any download,
    so a machine without network fails at once instead of waiting out client retries.
    """
    spec = vfm_spec(name)
    hit = cached_weights(name, cache_dir)
    if hit is not None:
        return hit
    host = spec.hub.split("/")[2] if spec.family == "sam" else "huggingface.co"
    if W.is_offline(host):
        raise W.WeightsMissingError(_what(spec), how_to_get(spec), "no network and nothing in the cache")
    try:
        if spec.family == "sam":
            return _download_url(spec.hub, _url_cache_path(spec, cache_dir))
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(f"timm/{spec.hub}", _HUB_FILES[0], cache_dir=str(W.hf_cache(cache_dir))))
    except Exception as err:  # hub / HTTP errors come in many types; the message names the weights
        raise W.WeightsMissingError(_what(spec), how_to_get(spec), str(err)) from err


def _download_url(url: str, dest: Path) -> Path:
    """Download ``url`` to ``dest`` atomically (a partial file is never taken for the checkpoint)."""
    import torch.hub

    from dapseg.files import atomic_write

    return atomic_write(dest, lambda tmp: torch.hub.download_url_to_file(url, str(tmp), progress=True))


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, read safely (``dapseg.weights.load_state_dict_file``)."""
    return W.load_state_dict_file(path)


def _strip(sd: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p) :]
        out[k] = v
    return out


def convert_state_dict(
    spec: VfmSpec, module: nn.Module, sd: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Official (or timm hub) keys -> the keys of ``module`` (timm ViT / Eva, or SAM's encoder)."""
    if spec.family == "sam":
        if any(k.startswith("image_encoder.") for k in sd):
            return {k[len("image_encoder.") :]: v for k, v in sd.items() if k.startswith("image_encoder.")}
        return dict(sd)
    sd = _strip(sd, ("module.", "backbone."))
    if spec.family == "dinov3":
        from timm.models.eva import checkpoint_filter_fn as eva_filter

        return eva_filter(sd, module)
    from timm.models.vision_transformer import checkpoint_filter_fn as vit_filter

    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}  # DINO / MAE heads are unused
    return vit_filter(sd, module)


def load_into(spec: VfmSpec, module: nn.Module, path: str | os.PathLike) -> None:
    """Load the checkpoint ``path`` into ``module`` strictly; ValueError names the file and keys."""
    sd = convert_state_dict(spec, module, read_state_dict(path))
    missing, unexpected = module.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"VFM weights file {path} does not fit {spec.name}: missing keys {missing[:12]}"
            f"{' ...' if len(missing) > 12 else ''}, unexpected keys {unexpected[:12]}"
            f"{' ...' if len(unexpected) > 12 else ''}"
        )


def _make_module(spec: VfmSpec, tiny: bool) -> nn.Module:
    """The bare architecture (random init, no network) at its checkpoint's native size."""
    if spec.family == "sam":
        return make_sam_encoder(spec.arch, tiny=tiny)
    kwargs = dict(spec.tiny) if tiny else {}
    if spec.family == "dinov3":
        return timm.create_model(spec.arch, pretrained=False, num_classes=0, **kwargs)
    # timm's own init takes ~10 s for a ViT-B on 2 cores; with 'skip' the layers keep PyTorch's
    # default random init (LayerScale its constant), but pos_embed / cls / reg tokens are left as
    # uninitialised memory, so we draw them here (timm: std 0.02 for positions).
    vit = timm.create_model(spec.arch, pretrained=False, num_classes=0, weight_init="skip", **kwargs)
    with torch.no_grad():
        for tok in (vit.pos_embed, vit.cls_token, vit.reg_token):
            if tok is not None:
                tok.normal_(0.0, 0.02)
    return vit


def _wrap(spec: VfmSpec, module: nn.Module, tiny: bool, window_size: int) -> VisionFoundationModel:
    if spec.family == "sam":
        return SamVfm(spec, module, tiny=tiny)
    if spec.family == "dinov3":
        return Dinov3Vfm(spec, module, tiny=tiny)
    if spec.built_at_window_size:
        # MAE: built at the window size: resize the (checkpoint's) position grid once, MAE-style
        grid = window_size // spec.patch_size
        module.pos_embed = nn.Parameter(
            resize_pos_embed_mae(module.pos_embed.data, module.num_prefix_tokens, grid)
        )
    return TimmVitVfm(spec, module, tiny=tiny, window_size=window_size)


def build_with_weights(
    spec: VfmSpec,
    *,
    weights: str | os.PathLike | None,
    random_weights: bool,
    tiny: bool,
    cache_dir: str | os.PathLike | None,
    window_size: int,
) -> VisionFoundationModel:
    """Resolve the weights first (a missing file fails before any large allocation), then build."""
    path: Path | None = None
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"VFM weights file not found: {path} (for {spec.name})")
    elif not random_weights:
        path = fetch_weights(spec.name, cache_dir)
    module = _make_module(spec, tiny)
    if path is not None:
        load_into(spec, module, path)
    elif spec.family == "sam":
        randomize_position_terms(module)
    return _wrap(spec, module, tiny, window_size)


__all__ = [
    "build_with_weights",
    "cached_weights",
    "fetch_weights",
    "how_to_get",
    "list_vfms",
    "read_state_dict",
]
