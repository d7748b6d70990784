"""The models of a segmenter, built once and handed to each component according to its declared needs.

``ModelBundle`` holds CLIP, the VFM and SAM (its image encoder, plus the full ``Sam`` with prompt
encoder and mask decoder, built on first request and then shared: DAP's SAM regions and SAM
refinement use one decoder). ``provide(needs)`` returns the builder keywords of ``registry.BUILDER_NEEDS``
that a component declared, so a component never receives the segmenter itself.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dapseg.config import SegmenterConfig, VfmConfig
from dapseg.models.clip import DenseClip, build_clip
from dapseg.registry import Backbone, Need
from dapseg.weights import WeightsMissingError, how_to_fetch


@dataclass(frozen=True)
class PrebuiltModels:
    """Models already built, handed to ``Segmenter(config, models=...)`` instead of being built from the
    config (e.g. a benchmark's own SAM, or the models of another segmenter). Each is used as given;
    the others are built as usual.

    ``sam`` may be given without a ``sam:`` section in the config; ``sam_decoder`` must be the full
    ``Sam`` around the given ``sam`` (or around a given SAM ``vfm``); ``text`` is a ``TextEmbedder``
    over the given ``clip``.
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
        """Build every model ``config`` names that ``reuse`` does not already hold."""
        reuse = reuse or PrebuiltModels()

        def vfm(cfg: VfmConfig | None) -> nn.Module | None:
            if cfg is None:
                return None
            from dapseg.models.vfm import build_vfm

            return build_vfm(cfg, random_weights=random_weights, tiny=tiny, cache_dir=cache_dir,
                             window_size=config.inference.crop, device=device)

        try:
            clip = reuse.clip or build_clip(config.clip, random_weights=random_weights, tiny=tiny,
                                                   cache_dir=cache_dir, device=device)
            vfm_model = reuse.vfm or vfm(config.vfm)
            if config.sam is not None and reuse.sam is None and not tiny:
                from dapseg.models.sam.memory import check_memory

                check_memory(config.sam.name, device)  # fail before loading a SAM that cannot fit
            sam = reuse.sam or vfm(config.sam)
            masks = reuse.mask_generator
            if masks is None and config.masks is not None:
                from dapseg.masks.base import MaskBuild, build_mask_generator

                masks = build_mask_generator(config.masks.name, config.masks.params,
                                             MaskBuild(device, random_weights, tiny, cache_dir))
        except WeightsMissingError as e:
            raise WeightsMissingError(e.what, how_to_fetch(config.name)) from e
        return cls(clip, vfm_model, sam, config.sam, config.vfm, random_weights or tiny, cache_dir,
                   reuse.sam_decoder, masks)

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


def _traits(vfm: nn.Module) -> Any:
    """The ``FamilyTraits`` of a VFM built by ``build_vfm`` (a module handed in without them has none)."""
    from dapseg.models.vfm.base import FamilyTraits

    return getattr(vfm, "traits", None) or FamilyTraits()
