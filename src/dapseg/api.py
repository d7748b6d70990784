"""The Python API: ``Segmenter.from_preset(...).predict(image, classes) -> SegmentationResult``."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dapseg.config import SegmenterConfig, load_preset
from dapseg.heads.base import build_head
from dapseg.images import load_image
from dapseg.inference.engine import DenseEngine, HeadPlugin
from dapseg.inference.preprocess import resize_image, short_side_size, to_tensor01
from dapseg.inference.strategies import get_strategy, strategy_needs_original
from dapseg.models.clip import build_clip
from dapseg.postprocess import class_probs, labels_banded, labels_from_probs
from dapseg.refine import Refiner, build_refiner
from dapseg.text import ClassSet, TextEmbedder
from dapseg.viz import heatmap, label_image, overlay
from dapseg.weights import WeightsMissingError, cache_dir, how_to_fetch

PathLike = str | os.PathLike[str]


class SegmentationResult:
    """One image's segmentation. Full-resolution tensors are computed on first access.

    ``labels`` (H, W) int64 is computed eagerly, in row bands, so images of any size fit in memory;
    ``logits`` (Q, H, W) and ``probs`` (C, H, W) are upsampled on demand (large for big images).
    """

    def __init__(
        self,
        image: np.ndarray,
        classes: ClassSet,
        coarse_logits: torch.Tensor,
        labels: torch.Tensor,
        logit_scale: float,
        full_logits: torch.Tensor | None = None,
    ) -> None:
        self.image = image  # (H, W, 3) uint8
        self.class_set = classes
        self.coarse_logits = coarse_logits  # (Q, h, w) at the processing resolution
        self.labels = labels
        self.logit_scale = logit_scale
        if full_logits is not None:
            self.__dict__["logits"] = full_logits

    @property
    def classes(self) -> list[str]:
        return self.class_set.names

    @cached_property
    def logits(self) -> torch.Tensor:
        """(Q, H, W) cosine logits per query, before the logit scale."""
        size = self.image.shape[:2]
        return F.interpolate(self.coarse_logits[None], size=size, mode="bilinear", align_corners=False)[0]

    @cached_property
    def probs(self) -> torch.Tensor:
        """(C, H, W) class probabilities after softmax and synonym merge."""
        return class_probs(self.logits, self.logit_scale, self.class_set.query_to_class)

    def pixel_shares(self) -> dict[str, float]:
        counts = torch.bincount(self.labels.flatten(), minlength=len(self.classes)).double()
        shares = counts / counts.sum()
        return {name: float(s) for name, s in zip(self.classes, shares, strict=True)}

    def label_image(self) -> Image.Image:
        return label_image(self.labels.numpy(), len(self.classes))

    def overlay(self, alpha: float = 0.5) -> Image.Image:
        return overlay(self.image, self.labels.numpy(), self.classes, alpha=alpha)

    def heatmap(self, class_index: int) -> Image.Image:
        if not 0 <= class_index < len(self.classes):
            raise IndexError(f"class index {class_index} out of range for {len(self.classes)} classes")
        return heatmap(self.image, self.probs[class_index].numpy())

    def summary(self) -> dict[str, Any]:
        h, w = self.image.shape[:2]
        return {"size": [h, w], "classes": self.classes, "pixel_share": self.pixel_shares()}

    def save(self, out_dir: PathLike, stem: str, extra: dict[str, Any] | None = None) -> dict[str, Path]:
        """Write <stem>_labels.png, <stem>_overlay.png and <stem>.json atomically into ``out_dir``."""
        out = Path(out_dir)
        paths = {
            "labels": out / f"{stem}_labels.png",
            "overlay": out / f"{stem}_overlay.png",
            "json": out / f"{stem}.json",
        }
        summary = {**self.summary(), **(extra or {})}
        writers = {
            "labels": lambda p: self.label_image().save(p, format="PNG"),
            "overlay": lambda p: self.overlay().save(p, format="PNG"),
            "json": lambda p: p.write_text(json.dumps(summary, indent=2), encoding="utf-8"),
        }
        out.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        try:
            for key, write in writers.items():
                _atomic_write(paths[key], write)
                written.append(paths[key])
        except BaseException:  # all three files or none: no partial result of a failed image
            for path in written:
                path.unlink(missing_ok=True)
            raise
        return paths


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OSError(f"cannot write {path}: {e.strerror or e}") from e
        raise


class Segmenter:
    """A configured segmentation method with its models loaded."""

    def __init__(
        self,
        config: SegmenterConfig,
        *,
        device: str | torch.device | None = None,
        random_weights: bool = False,
        tiny: bool = False,
        cache_dir: PathLike | None = None,
        _models: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.random_weights = random_weights
        self.tiny = tiny
        self.cache_dir = cache_dir
        models = _models or {}
        # Random weights are seeded so smoke runs repeat; the caller's RNG state is left untouched.
        with torch.random.fork_rng(devices=[], enabled=random_weights):
            if random_weights:
                torch.manual_seed(0)
            self._build_models(config, models)
            self.head = build_head(config.head.name, config.head.params).to(self.device)
            if getattr(self.head, "needs_sam", False):
                self._bind_sam_regions()  # SAM's decoder: random too with random weights
            self.refiner: Refiner | None = build_refiner(
                config.refine.name, config.refine.params, sam=self.sam, segmenter=self
            )
        self.engine = DenseEngine(self.clip, self.head, self.vfm, self._build_plugin(), sam=self.sam)
        self.strategy = get_strategy(config.inference.mode)
        self.text = models.get("text") or TextEmbedder(
            self.clip.encode_text,
            model_id=f"{self.clip.name}:{self.clip.tag}",
            templates=config.templates,
            # Random weights differ from real ones: never share their text embeddings on disk.
            cache_root=None if random_weights or config.clip.weights else _text_cache(cache_dir),
        )

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
        models = {
            key: getattr(self, key)
            for key in ("clip", "vfm", "sam")
            if getattr(config, key) == getattr(self.config, key)
        }
        if "clip" not in models:
            models = {}
        elif config.templates == self.config.templates:
            models["text"] = self.text  # same encoder, same prompts: keep the embedding cache
        if config.inference.crop != self.config.inference.crop and _built_at_window_size(config.vfm):
            models.pop("vfm", None)  # e.g. MAE is built at the window size
        return Segmenter(
            config,
            device=self.device,
            random_weights=self.random_weights,
            tiny=self.tiny,
            cache_dir=self.cache_dir,
            _models=models,
        )

    def _build_models(self, config: SegmenterConfig, models: dict[str, Any]) -> None:
        """CLIP, VFM and SAM: reused from ``models`` where given, else built (or loaded)."""
        try:
            self.clip = models.get("clip") or build_clip(
                config.clip, random_weights=self.random_weights, tiny=self.tiny, cache_dir=self.cache_dir,
                device=self.device,
            )
            self.vfm = models.get("vfm") or self._build_vfm(config.vfm)
            if config.sam is not None and "sam" not in models and not self.tiny:
                from dapseg.models.sam_encoder import check_memory

                check_memory(config.sam.name, self.device)  # fail before loading a SAM that cannot fit
            self.sam = models.get("sam") or self._build_vfm(config.sam)
        except WeightsMissingError as e:
            raise WeightsMissingError(e.what, how_to_fetch(config.name)) from e

    def _bind_sam_regions(self) -> None:
        """DAP with regions=sam: SAM's automatic masks (a full Sam around the configured encoder)."""
        if self.sam is None:
            raise ValueError(
                f"preset {self.config.name!r}: head.params.regions=sam needs a SAM model; "
                "add e.g. --set sam.name=sam_vitb (or a `sam:` section in the config)"
            )
        from dapseg.models.sam_encoder import sam_decoder_file, sam_with_decoder

        weights = sam_decoder_file(self.config.sam, random_weights=self.random_weights or self.tiny,
                                   cache_dir=self.cache_dir)
        self.head.bind_sam(sam_with_decoder(self.sam, weights=weights))

    def _build_vfm(self, cfg: Any) -> torch.nn.Module | None:
        if cfg is None:
            return None
        from dapseg.models.vfm import build_vfm

        return build_vfm(
            cfg,
            random_weights=self.random_weights,
            tiny=self.tiny,
            cache_dir=self.cache_dir,
            window_size=self.config.inference.crop,
            device=self.device,
        )

    def _build_plugin(self) -> HeadPlugin | None:
        if not self.config.fsa.enabled:
            return None
        from dapseg.plugins.fsa import build_fsa

        return build_fsa(self.config)

    # ------------------------------------------------------------------ inference
    def text_embeddings(self, classes: ClassSet) -> torch.Tensor:
        """(Q, E) normalised text embeddings of the classes' queries (cached)."""
        return self.text(classes).to(self.device)

    def coarse_logits(self, image: np.ndarray, classes: ClassSet) -> torch.Tensor:
        """(Q, h, w) cosine logits at the processing resolution (after the short-side resize)."""
        cfg = self.config.inference
        h, w = image.shape[:2]
        size = short_side_size(h, w, cfg.short_side) if cfg.short_side else (h, w)
        processed = to_tensor01(resize_image(image, size))
        # splice hands the original (not the resized working image) to SAM, as the Trident reference
        extra = {"original": image} if strategy_needs_original(cfg.mode) else {}
        return self.strategy(self.engine, processed, self.text_embeddings(classes), cfg, **extra).float().cpu()

    def predict(
        self, image: PathLike | Image.Image | np.ndarray, classes: ClassSet | Sequence[str] | str
    ) -> SegmentationResult:
        """Segment ``image`` into ``classes`` (see ``ClassSet``: synonyms with ';')."""
        class_set = ClassSet.coerce(classes)
        img = load_image(image)
        coarse = self.coarse_logits(img, class_set)
        post = self.config.postprocess
        q2c = class_set.query_to_class
        if self.refiner is None:
            labels = labels_banded(coarse, img.shape[:2], post.logit_scale, q2c, post.prob_thd)
            return SegmentationResult(img, class_set, coarse, labels, post.logit_scale)
        full = F.interpolate(coarse[None], size=img.shape[:2], mode="bilinear", align_corners=False)[0]
        refined = self.refiner(img, full, q2c)
        if isinstance(refined, tuple):  # a label-level refiner (SAM prompts) decides the labels itself
            full, labels = refined[0].float().cpu(), refined[1].cpu()
        else:
            full = refined.float().cpu()
            labels = labels_from_probs(class_probs(full, post.logit_scale, q2c), post.prob_thd)
        return SegmentationResult(img, class_set, coarse, labels, post.logit_scale, full_logits=full)


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
    from dapseg.models.vfm import vfm_spec

    return vfm_spec(cfg.name).family == "mae"


def _text_cache(explicit: PathLike | None) -> Path:
    return cache_dir(explicit) / "text"
