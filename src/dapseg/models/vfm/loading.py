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
* Stable Diffusion: a *folder* in the diffusers layout (``unet/``, ``vae/``, ``text_encoder/``
  safetensors), read by the family (``sd.py``) into one state dict.

Loading is strict; a file that does not fit raises ValueError naming it and the missing /
unexpected keys. Files are read with ``torch.load(weights_only=True)`` or safetensors.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from dapseg import weights as W
from dapseg.config import VfmConfig
from dapseg.models.vfm.base import FamilyTraits, VfmFamily, VfmSpec, VisionFoundationModel
from dapseg.registry import VFM_FAMILIES


def family_of(spec: VfmSpec) -> VfmFamily:
    """The registered family that contributes ``spec``."""
    return VFM_FAMILIES.build(spec.family)


def _all_specs() -> dict[str, VfmSpec]:
    return {s.name: s for fam in VFM_FAMILIES.names() for s in VFM_FAMILIES.build(fam).specs}


def vfm_traits(name: str) -> FamilyTraits:
    """What the family of VFM ``name`` declares about itself (``FamilyTraits``)."""
    return family_of(vfm_spec(name)).traits


def list_vfms() -> list[str]:
    """Names accepted by ``build_vfm`` (``VfmConfig.name``): the specs of every registered family."""
    return list(_all_specs())


def vfm_spec(name: str) -> VfmSpec:
    """The spec of VFM ``name``; ValueError listing the valid names otherwise."""
    specs = _all_specs()
    try:
        return specs[name]
    except KeyError:
        raise ValueError(f"unknown VFM {name!r}; valid names: {', '.join(specs)}") from None


def how_to_get(spec: VfmSpec) -> str:
    """The instruction printed when ``spec``'s weights are missing."""
    local = "folder" if family_of(spec).weights.folder else "file"
    release = f"the official release {spec.official_file}" if spec.official_file else f"a weights {local} of it"
    return (
        f"{W.how_to_fetch(None)} For {spec.name} (any preset whose vfm is {spec.name!r}) the local {local} "
        f"is {release} (--vfm-weights PATH)."
    )


def _what(spec: VfmSpec) -> str:
    source = family_of(spec).weights.describe(spec)
    return f"{spec.description or spec.name} ({spec.name}) pretrained weights from {source}"


def cached_weights(name: str, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The cached pretrained file (or folder) of VFM ``name``, or None; never touches the network."""
    spec = vfm_spec(name)
    return family_of(spec).weights.cached(spec, cache_dir)


def fetch_weights(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The pretrained file (or folder) of VFM ``name``: cached, else downloaded, else ``WeightsMissingError``.

    Offline-ness is checked (env HF_HUB_OFFLINE, then a short connection probe) before any download,
    so a machine without network fails at once instead of waiting out client retries.
    """
    spec = vfm_spec(name)
    source = family_of(spec).weights
    hit = source.cached(spec, cache_dir)
    if hit is not None:
        return hit
    host = source.host(spec)  # "" : a source that never downloads (its download says why)
    if host and W.is_offline(host):
        raise W.WeightsMissingError(_what(spec), how_to_get(spec), "no network and nothing in the cache")
    try:
        return source.download(spec, cache_dir)
    except Exception as err:  # hub / HTTP errors come in many types; the message names the weights
        raise W.WeightsMissingError(_what(spec), how_to_get(spec), str(err)) from err


def load_into(spec: VfmSpec, module: nn.Module, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load the checkpoint ``path`` (a file, or a folder for folder families) into ``module`` strictly;
    ValueError names the file and keys.

    Returns the tensors the family keeps beside the module (``VfmFamily.checkpoint_extras``)."""
    family = family_of(spec)
    raw = (family.read_weights or W.load_state_dict_file)(Path(path))
    missing, unexpected = module.load_state_dict(family.filter_checkpoint(raw, module), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"VFM weights file {path} does not fit {spec.name}: missing keys {missing[:12]}"
            f"{' ...' if len(missing) > 12 else ''}, unexpected keys {unexpected[:12]}"
            f"{' ...' if len(unexpected) > 12 else ''}"
        )
    return family.checkpoint_extras(raw) if family.checkpoint_extras is not None else {}


def build_with_weights(
    spec: VfmSpec,
    *,
    weights: str | os.PathLike | None,
    random_weights: bool,
    tiny: bool,
    cache_dir: str | os.PathLike | None,
    window_size: int,
    params: dict | None = None,
) -> VisionFoundationModel:
    """Resolve the weights first (a missing file fails before any large allocation), then build."""
    family = family_of(spec)
    path: Path | None = None
    if weights is not None:
        path = Path(weights)
        if not (path.is_dir() if family.weights.folder else path.is_file()):
            kind = "folder" if family.weights.folder else "file"
            raise FileNotFoundError(f"VFM weights {kind} not found: {path} (for {spec.name})")
    elif not random_weights:
        path = fetch_weights(spec.name, cache_dir)
    family_params = VFM_FAMILIES.get(family.name).parse_params(params)
    module = family.make_module(spec, tiny)
    extras: dict[str, torch.Tensor] = {}
    if path is not None:
        extras = load_into(spec, module, path)
    elif family.init_random is not None:
        family.init_random(module)
    model = family.wrap(spec, module, family_params, window_size)
    model.traits = family.traits
    model.checkpoint_extras = extras
    return model


def build_vfm(
    cfg: VfmConfig,
    *,
    random_weights: bool = False,
    tiny: bool = False,
    cache_dir: str | os.PathLike | None = None,
    window_size: int = 336,
    device: str | torch.device | None = None,
) -> VisionFoundationModel:
    """Build the VFM ``cfg.name`` in eval mode with frozen parameters: resolve its spec and weights,
    build its family's architecture, filter the checkpoint onto it, load strictly, wrap.

    Weights: ``cfg.weights`` (an official release file) if given; else ``random_weights`` (random
    init, never the network); else the pretrained weights from the cache, downloaded when online
    (``dapseg.weights.WeightsMissingError`` when offline and not cached). ``tiny`` builds a small
    variant of the same family for tests: random weights unless ``cfg.weights`` names a file of
    that tiny shape (no tiny checkpoints are published).
    ``window_size`` matters only for families built at the window size (``FamilyTraits``; MAE, which
    ProxyCLIP builds at the sliding-window size). ``cfg.params``: the family's own settings.
    """
    spec = vfm_spec(cfg.name)
    if window_size < spec.patch_size:
        raise ValueError(f"window_size {window_size} is smaller than the patch size {spec.patch_size}")
    model = build_with_weights(
        spec,
        weights=cfg.weights,
        random_weights=random_weights or (tiny and cfg.weights is None),
        tiny=tiny,
        cache_dir=cache_dir,
        window_size=window_size,
        params=cfg.params,
    )
    model.eval().requires_grad_(False)
    return model.to(device) if device is not None else model


__all__ = [
    "build_vfm",
    "build_with_weights",
    "cached_weights",
    "fetch_weights",
    "how_to_get",
    "list_vfms",
    "vfm_spec",
    "vfm_traits",
]
