"""The models of a segmenter, built once, held at the config's precision and handed to each component
according to its declared needs.

``ModelBundle`` holds CLIP, the VFM and SAM (its image encoder, plus the full ``Sam`` with prompt
encoder and mask decoder, built on first request and then shared: DAP's SAM regions and SAM
refinement use one decoder), the region-mask generator and the text embedder over CLIP's text
tower. CLIP, the VFM and the SAM encoder hold their weights in ``precision.inference_dtype`` of
``inference.precision`` (``precision.hold_weights``), so autocast never re-casts them per call.
``provide(needs)`` returns the builder keywords of ``registry.BUILDER_NEEDS`` that a component
declared, so a component never receives the segmenter itself. ``reuse_for(config)`` says which of its
models a bundle for another setting can take over (``Segmenter.derive``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dapseg.config import SegmenterConfig, VfmConfig
from dapseg.models.clip import DenseClip, build_clip
from dapseg.precision import autocast_context, hold_weights, inference_dtype, weights_copy, weights_dtype
from dapseg.registry import Backbone, Need
from dapseg.text import TextEmbedder
from dapseg.weights import WeightsMissingError, cache_dir, how_to_fetch


@dataclass(frozen=True)
class PrebuiltModels:
    """Models already built, handed to ``Segmenter(config, models=...)`` instead of being built from the
    config (e.g. a benchmark's own SAM, or the models of another segmenter). Each is used as given,
    except at a half precision (``precision.inference_dtype`` bf16/fp16) where its weights are in another
    dtype: then as a converted copy (the module handed in is left untouched). The others are built as
    usual.

    ``sam`` may be given without a ``sam:`` section in the config; ``sam_decoder`` must be the full
    ``Sam`` around the given ``sam`` (or around a given SAM ``vfm``); ``text`` is a ``TextEmbedder``
    over the given ``clip`` at the config's dtype.
    """

    clip: DenseClip | None = None
    vfm: nn.Module | None = None
    sam: nn.Module | None = None
    sam_decoder: Any = None
    text: Any = None
    mask_generator: Any = None  # the generator of the config's `masks:` section


@dataclass
class ModelBundle:
    """CLIP, VFM and SAM of one config (None where the config has none)."""

    clip: DenseClip
    vfm: nn.Module | None = None
    sam: nn.Module | None = None  # the VFM registry's SAM: its image encoder (``.encoder``)
    sam_config: VfmConfig | None = None
    vfm_config: VfmConfig | None = None
    random_weights: bool = False
    cache_dir: str | os.PathLike[str] | None = None
    _sam_decoder: Any = field(default=None, repr=False)
    # the `masks:` section's generator: image (H, W, 3) uint8 -> region map (H, W) int64 (dapseg.masks)
    mask_generator: Any = None
    config: SegmenterConfig | None = None  # what it was built for (None: put together by hand)
    device: torch.device | None = None
    text: TextEmbedder | None = None  # the class embeddings over CLIP's text tower, at the dtype

    @property
    def dtype(self) -> torch.dtype | None:
        """The dtype CLIP, the VFM and the SAM encoder hold their weights in (None: float32)."""
        if self.config is None or self.device is None:
            return None
        return inference_dtype(self.device, self.config.inference.precision)

    @classmethod
    def build(
        cls,
        config: SegmenterConfig,
        *,
        device: torch.device,
        random_weights: bool = False,
        tiny: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
        reuse: PrebuiltModels | None = None,
    ) -> ModelBundle:
        """Build every model ``config`` names that ``reuse`` does not already hold, and hold CLIP, the VFM
        and the SAM encoder in the config's dtype (a model in ``reuse`` in another dtype: a converted copy)."""
        reuse = reuse or PrebuiltModels()
        dtype = inference_dtype(device, config.inference.precision)  # an impossible setting fails before building

        def vfm(cfg: VfmConfig | None) -> nn.Module | None:
            if cfg is None:
                return None
            from dapseg.models.vfm import build_vfm

            return build_vfm(cfg, random_weights=random_weights, tiny=tiny, cache_dir=cache_dir,
                             window_size=config.inference.crop, device=device)

        def held(given: nn.Module | None, make: Any) -> Any:
            """``make()``'s model converted in place; a ``given`` one as it is (float32 precision: whatever
            its dtype, e.g. a float64 model of a test) or as a converted copy in the half dtype."""
            if given is None:
                model = make()
                return hold_weights(model, dtype) if model is not None else None
            return given if dtype is None or weights_dtype(given) == dtype else weights_copy(given, dtype)

        try:
            clip = held(reuse.clip, lambda: build_clip(config.clip, random_weights=random_weights, tiny=tiny,
                                                       cache_dir=cache_dir, device=device))
            vfm_model = held(reuse.vfm, lambda: vfm(config.vfm))
            if config.sam is not None and reuse.sam is None and not tiny:
                from dapseg.models.sam.memory import check_memory

                check_memory(config.sam.name, device)  # fail before loading a SAM that cannot fit
            sam = held(reuse.sam, lambda: vfm(config.sam))
            masks = reuse.mask_generator
            if masks is None and config.masks is not None:
                from dapseg.masks.base import MaskBuild, build_mask_generator

                masks = build_mask_generator(config.masks.name, config.masks.params,
                                             MaskBuild(device, random_weights, tiny, cache_dir))
        except WeightsMissingError as e:
            raise WeightsMissingError(e.what, how_to_fetch(config.name)) from e
        bundle = cls(clip, vfm_model, sam, config.sam, config.vfm, random_weights or tiny, cache_dir,
                     None, masks, config, device)
        bundle._sam_decoder = _around_held(reuse.sam_decoder, ((reuse.sam, sam), (reuse.vfm, vfm_model)))
        # random weights (or a local CLIP file) differ from the released ones: never share their
        # text embeddings on disk
        bundle.text = reuse.text or TextEmbedder(
            functools.partial(_encode_text, clip, device, config.inference.precision),
            # embeddings from a lower precision are their own cache entries
            model_id=f"{clip.name}:{clip.tag}" + (f":{dtype}" if dtype is not None else ""),
            templates=config.templates,
            cache_root=None if random_weights or config.clip.weights else _text_cache(cache_dir),
            dim=clip.embed_dim,
        )
        return bundle

    def reuse_for(self, config: SegmenterConfig) -> PrebuiltModels:
        """The models of this bundle that a bundle for ``config`` (this bundle's config with other
        settings) takes over instead of building them again, model by model:

        ==============  =====================================================================
        CLIP            the same `clip:` section (another CLIP: nothing at all is taken over)
        VFM             the same `vfm:` section, and the same ``inference.crop`` where the family
                        is built at the window size (``FamilyTraits.built_at_window_size``, MAE)
        SAM encoder     the same `sam:` section
        SAM decoder     its encoder (the SAM encoder, else a SAM VFM) is taken over
        mask generator  the same `masks:` section (it runs outside ``inference.precision``)
        text embedder   CLIP taken over as it is (same dtype), the same ``templates``
        ==============  =====================================================================

        A model is taken over only where it can be held in the new dtype exactly: in the same dtype,
        or in float32 (the new bundle converts a copy, as a fresh build would be converted); a model
        held in bf16/fp16 is rebuilt for float32 or the other half type (an up-cast keeps its rounding).
        """
        if self.config is None or self.device is None:
            raise ValueError("ModelBundle.reuse_for: this bundle was put together by hand (no config); "
                             "build it with ModelBundle.build")
        old = self.config
        if config.clip != old.clip:
            return PrebuiltModels()
        target = inference_dtype(self.device, config.inference.precision) or torch.float32

        def exact(model: nn.Module | None) -> bool:
            return model is not None and weights_dtype(model) in (target, torch.float32)

        keep_vfm = config.vfm == old.vfm and exact(self.vfm) and not (
            config.inference.crop != old.inference.crop and _built_at_window_size(config.vfm))
        keep_sam = config.sam == old.sam and exact(self.sam)
        keep_clip = exact(self.clip)
        source = self._decoder_source()[0]  # the new bundle's source too: the same `sam:` section
        keep_decoder = source is not None and config.sam == old.sam and (
            (keep_sam and source is self.sam) or (keep_vfm and source is self.vfm))
        same_dtype = keep_clip and weights_dtype(self.clip) == target
        return PrebuiltModels(
            clip=self.clip if keep_clip else None,
            vfm=self.vfm if keep_vfm else None,
            sam=self.sam if keep_sam else None,
            sam_decoder=self._sam_decoder if keep_decoder else None,
            mask_generator=self.mask_generator if config.masks == old.masks else None,
            text=self.text if same_dtype and config.templates == old.templates else None,
        )

    def _decoder_source(self) -> tuple[nn.Module | None, VfmConfig | None]:
        """The SAM a decoder goes around: the ``sam:`` model, else a SAM the config loaded as its VFM."""
        if self.sam is not None:
            return self.sam, self.sam_config
        if self.vfm is not None and _traits(self.vfm).sam_decoder:
            return self.vfm, self.vfm_config
        return None, None

    @property
    def built_sam_decoder(self) -> Any:
        """The SAM decoder if it was built already (None otherwise); never builds it."""
        return self._sam_decoder

    def sam_decoder(self) -> Any:
        """The full segment-anything ``Sam`` around the SAM encoder, its decoder from the release file
        (kept when the encoder was loaded, so the file is read once; random with random weights);
        built once."""
        if self._sam_decoder is None:
            encoder, cfg = self._decoder_source()
            if encoder is None:
                raise ValueError("no SAM model configured")
            from dapseg.models.sam.build import sam_decoder_file, sam_with_decoder

            kept = getattr(encoder, "checkpoint_extras", None)  # read with the encoder: no second read
            if kept:
                self._sam_decoder = sam_with_decoder(encoder, decoder_state=kept)
            else:
                weights = sam_decoder_file(cfg, random_weights=self.random_weights, cache_dir=self.cache_dir)
                self._sam_decoder = sam_with_decoder(encoder, weights=weights)
        return self._sam_decoder

    def backbone(self, config: SegmenterConfig) -> Backbone:
        family = getattr(self.vfm, "family", None) if self.vfm is not None else None
        vfm_name = config.vfm.name if config.vfm is not None else None
        lam = _traits(self.vfm).fsa_lambda if self.vfm is not None else None
        return Backbone(clip_model=config.clip.model, vfm_name=vfm_name, vfm_family=family,
                        clip_patch_size=int(self.clip.patch_size), vfm_fsa_lambda=lam)

    def check(self, needs: Iterable[Need], what: str, config: SegmenterConfig) -> None:
        """A clear error when ``what`` (e.g. "head 'dap'") needs a model the config does not name."""
        needs = set(needs)
        if needs & {Need.VFM_FEATURES, Need.VFM_ATTENTION} and self.vfm is None:
            raise ValueError(f"preset {config.name!r}: {what} needs a VFM; configure a `vfm:` section "
                             "(e.g. --set vfm.name=dino_vitb16)")
        if (Need.SAM_ENCODER in needs and self.sam is None) or (
            Need.SAM_DECODER in needs and self._decoder_source()[0] is None
        ):
            raise ValueError(f"preset {config.name!r}: {what} needs a SAM model; add e.g. "
                             "--set sam.name=sam_vitb (or a `sam:` section in the config)")
        if Need.REGION_MASKS in needs and self.mask_generator is None:
            raise ValueError(f"preset {config.name!r}: {what} needs region masks; configure a `masks:` section "
                             "(e.g. --set masks.name=sam2, or --masks-dir DIR for precomputed masks)")

    def provide(self, needs: Iterable[Need], config: SegmenterConfig) -> dict[str, Any]:
        """The builder keywords for ``needs``: only the models declared, built on first request."""
        out: dict[str, Any] = {}
        for need in set(needs):
            if need is Need.SAM_ENCODER and self.sam is not None:
                out[need.value] = self.sam
            elif need is Need.SAM_DECODER and self._decoder_source()[0] is not None:
                out[need.value] = self.sam_decoder()
            elif need is Need.BACKBONE:
                out[need.value] = self.backbone(config)
        return out


def _encode_text(clip: DenseClip, device: torch.device, precision: str, texts: list[str]) -> torch.Tensor:
    """CLIP's text tower at ``precision``: (len(texts), E) float32."""
    with autocast_context(device, precision):
        return clip.encode_text(texts).float()


def _around_held(decoder: Any, given_and_held: tuple[tuple[Any, Any], ...]) -> Any:
    """The given SAM decoder around the bundle's encoder: where the SAM it was given around was held as
    a converted copy (another dtype), the same decoder around that copy; else as given."""
    if decoder is None:
        return None
    from dapseg.models.sam.build import image_encoder_of, sam_around

    for given, held in given_and_held:
        if given is None or held is given:
            continue
        try:
            if image_encoder_of(given) is decoder.image_encoder:
                return sam_around(decoder, held)
        except TypeError:  # not a SAM (e.g. a DINO VFM)
            continue
    return decoder


def _built_at_window_size(cfg: VfmConfig | None) -> bool:
    """Whether the VFM of ``cfg`` is built for ``inference.crop`` (its family's trait)."""
    if cfg is None:
        return False
    from dapseg.models.vfm import vfm_traits

    return vfm_traits(cfg.name).built_at_window_size


def _text_cache(explicit: str | os.PathLike[str] | None) -> Path:
    return cache_dir(explicit) / "text"


def _traits(vfm: nn.Module) -> Any:
    """The ``FamilyTraits`` of a VFM built by ``build_vfm`` (a module handed in without them has none)."""
    from dapseg.models.vfm.base import FamilyTraits

    return getattr(vfm, "traits", None) or FamilyTraits()
