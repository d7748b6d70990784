"""The Python API: ``Segmenter.from_preset(...).predict(image, classes) -> SegmentationResult``."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dapseg.bundle import ModelBundle, PrebuiltModels
from dapseg.config import SegmenterConfig, load_preset
from dapseg.decoding import Decoded, ImageSource, decode_ahead
from dapseg.images import load_image
from dapseg.inference.engine import DenseEngine, HeadPlugin
from dapseg.inference.preprocess import resize_image, short_side_size, to_tensor01
from dapseg.masks.base import resize_region_map
from dapseg.models.clip import DenseClip
from dapseg.postprocess import class_probs, labels_banded, labels_from_probs, leave_unlabeled
from dapseg.refine import RefineInput, Refiner
from dapseg.registry import HEADS, PLUGINS, REFINERS, STRATEGIES, Need, Registry
from dapseg.result import ImageFailure, SegmentationResult
from dapseg.text import ClassSet, TextEmbedder

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
        max_pixels: int | None = None,
    ) -> None:
        """``models``: models already built (``PrebuiltModels``), used instead of building them.
        ``max_pixels``: an image file declaring more pixels is refused before decoding
        (``images.ImageTooLargeError``); default: the process's limit (``images.pixel_limit``)."""
        self.config = config
        self.max_pixels = max_pixels
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
            self.refiner_needs: frozenset[Need] = frozenset()
            if config.refine.name != REFINERS.none_name:
                self.refiner, self.refiner_needs = self._build(REFINERS, config.refine.name, config.refine.params)
        self.masks_to_head = Need.REGION_MASKS in head_needs | plugin_needs
        self.masks_to_refiner = Need.REGION_MASKS in self.refiner_needs
        if self.masks_to_head and not STRATEGIES.get(config.inference.mode).extras.get("region_masks"):
            raise ValueError(f"preset {config.name!r}: head {config.head.name!r} needs region masks, and "
                             f"inference.mode={config.inference.mode} does not crop them per window; use "
                             "inference.mode=slide or whole")
        self.engine = DenseEngine(self.clip, self.head, self.vfm, plugin, needs=head_needs | plugin_needs,
                                  precision=config.inference.precision)

    @property
    def text(self) -> TextEmbedder:
        """The class embeddings over CLIP's text tower at the configured precision (cached)."""
        return self.models.text

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
        return Segmenter(config, device=self.device, random_weights=self.random_weights, tiny=self.tiny,
                         cache_dir=self.cache_dir, models=self.models.reuse_for(config), max_pixels=self.max_pixels)

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

        ``labels`` of the result hold ``postprocess.UNLABELED`` (-1) where the top probability is below
        ``postprocess.prob_thd`` and on the classes ``classes.unlabeled_classes`` (see
        ``ClassSet.leave_unlabeled``); the benchmarks' class lists (``unsure_class=0``) put the unsure
        pixels in class 0 instead.

        ``name`` identifies the image to a mask generator that reads precomputed masks (``masks: {name:
        folder}``); a path's stem by default, None for arrays and PIL images."""
        class_set = ClassSet.coerce(classes)
        if name is None and isinstance(image, str | os.PathLike):
            name = Path(image).stem
        img = load_image(image, max_pixels=self.max_pixels)
        region_map = self.region_map(img, name)  # once per image, for the head and the refiner
        coarse = self.coarse_logits(img, class_set, region_map=region_map)
        post = self.config.postprocess
        q2c = class_set.query_to_class
        unsure = class_set.unsure_label  # below prob_thd: UNLABELED, or the benchmarks' class 0
        if self.refiner is None:
            labels = labels_banded(coarse, img.shape[:2], post.logit_scale, q2c, post.prob_thd, unsure=unsure)
            return SegmentationResult(img, class_set, coarse, leave_unlabeled(labels, class_set.unlabeled_classes),
                                      post.logit_scale)
        # upsampled on the models' device: the refiners run there (the full-size logits never
        # pass through the CPU on a GPU run)
        full = F.interpolate(coarse[None].to(self.device), size=img.shape[:2], mode="bilinear", align_corners=False)[0]
        text = self.text_embeddings(class_set) if Need.CLASS_TEXT in self.refiner_needs else None
        with self.engine.autocast():  # SAM's prompt decoder at the configured precision
            out = self.refiner(RefineInput(img, full, q2c, post.logit_scale, post.prob_thd, unsure, text=text,
                                           region_masks=region_map if self.masks_to_refiner else None))
        logits = out.logits.float() if out.logits is not None else None
        probs = out.probs.float() if out.probs is not None else None
        if out.labels is not None:
            labels = out.labels
        else:  # on the refiner's device, before the full-size tensors move to the CPU
            labels = labels_from_probs(probs if probs is not None else class_probs(logits, post.logit_scale, q2c),
                                       post.prob_thd, unsure)
        logits = logits.cpu() if logits is not None else None
        probs = probs.cpu() if probs is not None else None
        labels = labels.cpu()
        return SegmentationResult(img, class_set, coarse, leave_unlabeled(labels, class_set.unlabeled_classes),
                                  post.logit_scale, full_logits=logits, full_probs=probs)

    def predict_many(
        self,
        images: Iterable[ImageSource],
        classes: ClassSet | Sequence[str] | str,
        *,
        batch: int = 2,
        workers: int = 0,
        on_error: Literal["raise", "yield"] = "raise",
    ) -> Iterator[SegmentationResult | ImageFailure]:
        """Segment each image into ``classes``; results are yielded in input order while the next
        ``batch`` images are decoded ahead (in a background thread, or in ``workers`` DataLoader
        processes). Images are segmented one at a time: the windows of one image already fill the
        device in batches of ``inference.max_batch``.

        An image that cannot be read or segmented (missing, corrupt, above the pixel limit: an
        ``OSError`` or ``ValueError`` naming the file) raises its error when its turn comes
        (``on_error="raise"``), or is yielded in its place as an ``ImageFailure`` and the next images
        follow (``on_error="yield"``).
        """
        if batch < 1 or workers < 0:
            raise ValueError(f"predict_many: need batch >= 1 and workers >= 0, got {batch} and {workers}")
        if on_error not in ("raise", "yield"):
            raise ValueError(f"predict_many: on_error must be 'raise' or 'yield', got {on_error!r}")
        sources = list(images)
        names = [Path(s).stem if isinstance(s, str | os.PathLike) else None for s in sources]
        decoded = decode_ahead(sources, workers=workers, ahead=batch, max_pixels=self.max_pixels)
        # bad arguments fail here, not at next()
        return self._predict_decoded(decoded, sources, ClassSet.coerce(classes), names, on_error == "yield")

    def _predict_decoded(self, decoded: Iterator[Decoded], sources: list[ImageSource], classes: ClassSet,
                         names: list[str | None], yield_errors: bool) -> Iterator[SegmentationResult | ImageFailure]:
        for item in decoded:
            try:
                if item.error is not None:
                    raise item.error
                result: SegmentationResult | ImageFailure = self.predict(item.image, classes, name=names[item.index])
            except (OSError, ValueError) as e:
                if not yield_errors:
                    raise
                result = ImageFailure(item.index, sources[item.index], e)
            yield result


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

