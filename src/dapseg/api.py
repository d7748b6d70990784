"""The Python API: ``Segmenter.from_preset(...).predict(image, classes) -> SegmentationResult``."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dapseg.bundle import ModelBundle, PrebuiltModels
from dapseg.config import SegmenterConfig, load_preset
from dapseg.decoding import Decoded, ImageSource, decode_ahead
from dapseg.images import load_image
from dapseg.inference.engine import DenseEngine, HeadPlugin, autocast_dtype
from dapseg.inference.preprocess import resize_image, short_side_size, to_tensor01
from dapseg.masks.base import resize_region_map
from dapseg.models.clip import DenseClip
from dapseg.postprocess import class_probs, labels_banded, labels_from_probs
from dapseg.refine import RefineInput, Refiner
from dapseg.registry import HEADS, PLUGINS, REFINERS, STRATEGIES, Need, Registry
from dapseg.result import SegmentationResult
from dapseg.text import ClassSet, TextEmbedder
from dapseg.weights import cache_dir

PathLike = str | os.PathLike[str]


class Segmenter:
    """A configured segmentation method with its models loaded.

    The models are built once (``ModelBundle``); the head, plug-in, strategy and refiner are built
    from their registries, each handed only the models it declared it needs (``dapseg.registry.Need``).
    """

    def __init__(
        self,
        config: SegmenterConfig,
        *,
        device: str | torch.device | None = None,
        random_weights: bool = False,
        tiny: bool = False,
        cache_dir: PathLike | None = None,
        models: PrebuiltModels | None = None,
    ) -> None:
        """``models``: models already built (``PrebuiltModels``), used instead of building them."""
        self.config = config
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.random_weights = random_weights
        self.tiny = tiny
        self.cache_dir = cache_dir
        models = models or PrebuiltModels()
        # Random weights are seeded so smoke runs repeat; the caller's RNG state is left untouched.
        with torch.random.fork_rng(devices=[], enabled=random_weights):
            if random_weights:
                torch.manual_seed(0)
            self.models = ModelBundle.build(config, device=self.device, random_weights=random_weights,
                                            tiny=tiny, cache_dir=cache_dir, reuse=models)
            head, head_needs = self._build(HEADS, config.head.name, config.head.params)
            self.head = head.to(self.device)
            plugin, plugin_needs = self._build_plugin()
            self.strategy, self.strategy_needs = self._build(STRATEGIES, config.inference.mode,
                                                             config.inference.params)
            self.refiner: Refiner | None = None
            refiner_needs: frozenset[Need] = frozenset()
            if config.refine.name != REFINERS.none_name:
                self.refiner, refiner_needs = self._build(REFINERS, config.refine.name, config.refine.params)
        self.masks_to_head = Need.REGION_MASKS in head_needs | plugin_needs
        self.masks_to_refiner = Need.REGION_MASKS in refiner_needs
        if self.masks_to_head and not STRATEGIES.get(config.inference.mode).extras.get("region_masks"):
            raise ValueError(f"preset {config.name!r}: head {config.head.name!r} needs region masks, and "
                             f"inference.mode={config.inference.mode} does not crop them per window; use "
                             "inference.mode=slide or whole")
        self.engine = DenseEngine(self.clip, self.head, self.vfm, plugin, needs=head_needs | plugin_needs,
                                  precision=config.inference.precision)
        dtype = autocast_dtype(self.device, config.inference.precision)
        self.text = models.text or TextEmbedder(
            self._encode_text,
            # embeddings from a lower precision are their own cache entries
            model_id=f"{self.clip.name}:{self.clip.tag}" + (f":{dtype}" if dtype is not None else ""),
            templates=config.templates,
            # Random weights differ from real ones: never share their text embeddings on disk.
            cache_root=None if random_weights or config.clip.weights else _text_cache(cache_dir),
            dim=self.clip.embed_dim,
        )

    def _encode_text(self, texts: list[str]) -> torch.Tensor:
        """CLIP's text tower at the configured precision: (len(texts), E) float32."""
        with self.engine.autocast():
            return self.clip.encode_text(texts).float()

    @property
    def clip(self) -> DenseClip:
        return self.models.clip

    @property
    def vfm(self) -> torch.nn.Module | None:
        return self.models.vfm

    @property
    def sam(self) -> torch.nn.Module | None:
        return self.models.sam

    @property
    def mask_generator(self) -> Any:
        """The `masks:` section's generator (None without one): image, name -> region map (H, W) int64."""
        return self.models.mask_generator

    def region_map(self, image: np.ndarray, name: str | None = None) -> torch.Tensor | None:
        """The image's (H, W) int64 region map when a component needs one (None otherwise): computed
        once per image, then resized and cropped per window by the strategy."""
        if not (self.masks_to_head or self.masks_to_refiner):
            return None
        return self.mask_generator(image, name=name)

    def _build(self, registry: Registry[Any], name: str, params: dict[str, Any]) -> tuple[Any, frozenset[Need]]:
        """Component ``name`` of ``registry`` built with the models it declared, and its needs
        (checked first against the models the config names)."""
        entry = registry.get(name)
        needs = entry.needs_for(params)
        self.models.check(needs, f"{registry.kind} {name!r}", self.config)
        return entry.build(params, **self.models.provide(needs, self.config)), needs

    def _build_plugin(self) -> tuple[HeadPlugin | None, frozenset[Need]]:
        """The configured head plug-in (at most one, see ``SegmenterConfig``) and its needs."""
        for p in self.config.plugins:
            return self._build(PLUGINS, p.name, p.params)
        return None, frozenset()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_preset(
        cls,
        preset: str,
        *,
        device: str | torch.device | None = None,
        random_weights: bool = False,
        tiny: bool = False,
        cache_dir: PathLike | None = None,
        clip_weights: PathLike | None = None,
        vfm_weights: PathLike | None = None,
        sam_weights: PathLike | None = None,
        overrides: dict[str, Any] | None = None,
        **kw_overrides: Any,
    ) -> Segmenter:
        """Build preset ``preset``; ``overrides`` (dotted or bare keys) and keyword overrides apply."""
        config = load_preset(preset, {**(overrides or {}), **kw_overrides})
        config = with_weight_files(config, clip_weights, vfm_weights, sam_weights)
        return cls(config, device=device, random_weights=random_weights, tiny=tiny, cache_dir=cache_dir)

    def derive(self, overrides: dict[str, Any]) -> Segmenter:
        """A Segmenter with ``overrides`` applied that reuses this one's models where they are unchanged."""
        config = self.config.with_overrides(overrides)
        same = {key: getattr(config, key) == getattr(self.config, key) for key in ("clip", "vfm", "sam")}
        if not same["clip"]:
            return Segmenter(config, device=self.device, random_weights=self.random_weights, tiny=self.tiny,
                             cache_dir=self.cache_dir)
        if config.inference.crop != self.config.inference.crop and _built_at_window_size(config.vfm):
            same["vfm"] = False  # e.g. MAE is built at the window size
        keep_sam = same["sam"] and same["vfm"]
        models = PrebuiltModels(
            clip=self.clip,
            vfm=self.vfm if same["vfm"] else None,
            sam=self.sam if same["sam"] else None,
            sam_decoder=self.models.built_sam_decoder if keep_sam else None,  # around the same encoder
            mask_generator=self.mask_generator if config.masks == self.config.masks else None,
            # same encoder, prompts and precision: keep the embedding cache
            text=self.text if (config.templates, config.inference.precision)
            == (self.config.templates, self.config.inference.precision) else None,
        )
        return Segmenter(config, device=self.device, random_weights=self.random_weights, tiny=self.tiny,
                         cache_dir=self.cache_dir, models=models)

    # ------------------------------------------------------------------ inference
    def text_embeddings(self, classes: ClassSet) -> torch.Tensor:
        """(Q, E) normalised text embeddings of the classes' queries (cached)."""
        return self.text(classes).to(self.device)

    def coarse_logits(
        self, image: np.ndarray, classes: ClassSet, *, region_map: torch.Tensor | None = None, name: str | None = None
    ) -> torch.Tensor:
        """(Q, h, w) cosine logits at the processing resolution (after the short-side resize).

        ``region_map``: the image's (H, W) region map when already computed (``region_map``), else it
        is computed here from ``name`` where the head needs one."""
        cfg = self.config.inference
        h, w = image.shape[:2]
        size = short_side_size(h, w, cfg.short_side) if cfg.short_side else (h, w)
        processed = to_tensor01(resize_image(image, size))
        # splice hands the original (not the resized working image) to SAM, as the Trident reference
        extra: dict[str, Any] = {"original": image} if Need.ORIGINAL_IMAGE in self.strategy_needs else {}
        if self.masks_to_head:
            if region_map is None:
                region_map = self.region_map(image, name)
            # nearest to the processed image, as the reference; the strategy crops it per window
            extra["region_masks"] = resize_region_map(region_map, size)
        return self.strategy(self.engine, processed, self.text_embeddings(classes), cfg, **extra).float().cpu()

    def predict(
        self,
        image: PathLike | Image.Image | np.ndarray,
        classes: ClassSet | Sequence[str] | str,
        *,
        name: str | None = None,
    ) -> SegmentationResult:
        """Segment ``image`` into ``classes`` (see ``ClassSet``: synonyms with ';').

        ``name`` identifies the image to a mask generator that reads precomputed masks (``masks: {name:
        folder}``); a path's stem by default, None for arrays and PIL images."""
        class_set = ClassSet.coerce(classes)
        if name is None and isinstance(image, str | os.PathLike):
            name = Path(image).stem
        img = load_image(image)
        region_map = self.region_map(img, name)  # once per image, for the head and the refiner
        coarse = self.coarse_logits(img, class_set, region_map=region_map)
        post = self.config.postprocess
        q2c = class_set.query_to_class
        if self.refiner is None:
            labels = labels_banded(coarse, img.shape[:2], post.logit_scale, q2c, post.prob_thd)
            return SegmentationResult(img, class_set, coarse, labels, post.logit_scale)
        full = F.interpolate(coarse[None], size=img.shape[:2], mode="bilinear", align_corners=False)[0]
        with self.engine.autocast():  # SAM's prompt decoder at the configured precision
            out = self.refiner(RefineInput(img, full, q2c, post.logit_scale, post.prob_thd,
                                           region_masks=region_map if self.masks_to_refiner else None))
        logits = out.logits.float().cpu() if out.logits is not None else None
        probs = out.probs.float().cpu() if out.probs is not None else None
        if out.labels is not None:
            labels = out.labels.cpu()
        else:
            labels = labels_from_probs(probs if probs is not None else class_probs(logits, post.logit_scale, q2c),
                                       post.prob_thd)
        return SegmentationResult(img, class_set, coarse, labels, post.logit_scale,
                                  full_logits=logits, full_probs=probs)

    def predict_many(
        self,
        images: Iterable[ImageSource],
        classes: ClassSet | Sequence[str] | str,
        *,
        batch: int = 2,
        workers: int = 0,
    ) -> Iterator[SegmentationResult]:
        """Segment each image into ``classes``; results are yielded in input order while the next
        ``batch`` images are decoded ahead (in a background thread, or in ``workers`` DataLoader
        processes). Images are segmented one at a time: the windows of one image already fill the
        device in batches of ``inference.max_batch``.

        An image that cannot be read raises its error (naming the file) when its turn comes.
        """
        if batch < 1 or workers < 0:
            raise ValueError(f"predict_many: need batch >= 1 and workers >= 0, got {batch} and {workers}")
        sources = list(images)
        names = [Path(s).stem if isinstance(s, str | os.PathLike) else None for s in sources]
        return self._predict_decoded(decode_ahead(sources, workers=workers, ahead=batch),
                                     ClassSet.coerce(classes), names)  # bad arguments fail here, not at next()

    def _predict_decoded(
        self, decoded: Iterator[Decoded], classes: ClassSet, names: list[str | None]
    ) -> Iterator[SegmentationResult]:
        for item in decoded:
            if item.error is not None:
                raise item.error
            yield self.predict(item.image, classes, name=names[item.index])


def with_weight_files(
    config: SegmenterConfig,
    clip_weights: PathLike | None = None,
    vfm_weights: PathLike | None = None,
    sam_weights: PathLike | None = None,
) -> SegmenterConfig:
    """``config`` with local weight files set; a VFM/SAM file for a config without one is an error."""
    overrides: dict[str, Any] = {}
    if clip_weights:
        overrides["clip.weights"] = str(clip_weights)
    for key, path in (("vfm", vfm_weights), ("sam", sam_weights)):
        if path:
            if getattr(config, key) is None:
                raise ValueError(f"--{key}-weights given but preset {config.name!r} uses no {key.upper()}")
            overrides[f"{key}.weights"] = str(path)
    return config.with_overrides(overrides)


def _built_at_window_size(cfg: Any) -> bool:
    if cfg is None:
        return False
    from dapseg.models.vfm import vfm_traits

    return vfm_traits(cfg.name).built_at_window_size


def _text_cache(explicit: PathLike | None) -> Path:
    return cache_dir(explicit) / "text"
