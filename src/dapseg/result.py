"""``SegmentationResult``: one image's segmentation, what ``Segmenter.predict`` returns."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dapseg.files import atomic_write
from dapseg.postprocess import UNLABELED, class_probs, upsample_rows
from dapseg.text import ClassSet
from dapseg.viz import heatmap, label_image, overlay

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class ImageFailure:
    """An image that could not be segmented, in its result's place (``predict_many(on_error="yield")``):
    its position in the input, the source as given, and the error (its message names the file)."""

    index: int
    source: Any
    error: Exception

    @property
    def message(self) -> str:
        return str(self.error)


class SegmentationResult:
    """One image's segmentation. Full-resolution tensors are computed on first access.

    ``labels`` (H, W) int64 is computed eagerly, in row bands, so images of any size fit in memory;
    it holds class indices, and ``postprocess.UNLABELED`` (-1) where a pixel was left unlabeled
    (below ``postprocess.prob_thd``, or in one of ``ClassSet.unlabeled_classes``); the saved label
    PNG has 255 there (65535 in the 16-bit PNG of lists over 255 classes).
    ``logits`` (Q, H, W) and ``probs`` (C, H, W) are upsampled on demand (large for big images).
    A refiner may give refined full-resolution logits or probabilities instead.
    """

    def __init__(
        self,
        image: np.ndarray,
        classes: ClassSet,
        coarse_logits: torch.Tensor,
        labels: torch.Tensor,
        logit_scale: float,
        full_logits: torch.Tensor | None = None,
        full_probs: torch.Tensor | None = None,
    ) -> None:
        self.image = image  # (H, W, 3) uint8
        self.class_set = classes
        self.coarse_logits = coarse_logits  # (Q, h, w) at the processing resolution
        self.labels = labels
        self.logit_scale = logit_scale
        if full_logits is not None:
            self.__dict__["logits"] = full_logits  # (Q, H, W), e.g. refined by PAMR
        if full_probs is not None:
            self.__dict__["probs"] = full_probs  # (C, H, W), e.g. refined by SAM prompts

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

    def mean_top_probability(self, max_elements: int = 1 << 24) -> float:
        """The mean over pixels of the top class probability (a confidence score in [1/C, 1]).

        From the full-resolution probabilities or logits where a refiner gave them, else from the coarse
        logits upsampled in row bands of about ``max_elements`` floats (``labels`` is computed alike)."""
        if "probs" in self.__dict__:
            return float(self.probs.max(dim=0).values.double().mean())
        if "logits" in self.__dict__:
            return float(class_probs(self.logits, self.logit_scale, self.class_set.query_to_class)
                         .max(dim=0).values.double().mean())
        out_h, out_w = self.image.shape[:2]
        rows = max(1, max_elements // max(1, self.coarse_logits.shape[0] * out_w))
        total = 0.0
        for r0 in range(0, out_h, rows):
            band = upsample_rows(self.coarse_logits, (out_h, out_w), r0, min(out_h, r0 + rows))
            probs = class_probs(band, self.logit_scale, self.class_set.query_to_class)
            total += float(probs.max(dim=0).values.double().sum())
        return total / (out_h * out_w)

    def pixel_shares(self) -> dict[str, float]:
        """Each class's share of the image's pixels (the unlabeled pixels' share is ``unlabeled_share``)."""
        flat = self.labels.flatten()
        counts = torch.bincount(flat[flat != UNLABELED], minlength=len(self.classes)).double()
        shares = counts / max(1, flat.numel())
        return {name: float(s) for name, s in zip(self.classes, shares, strict=True)}

    def unlabeled_share(self) -> float:
        """The share of pixels left unlabeled (``postprocess.UNLABELED``)."""
        return float((self.labels == UNLABELED).double().mean()) if self.labels.numel() else 0.0

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
        return {"size": [h, w], "classes": self.classes, "pixel_share": self.pixel_shares(),
                "unlabeled_share": self.unlabeled_share()}

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
        written: list[Path] = []
        try:
            for key, write in writers.items():
                atomic_write(paths[key], write)  # makes the folder
                written.append(paths[key])
        except BaseException:  # all three files or none: no partial result of a failed image
            for path in written:
                path.unlink(missing_ok=True)
            raise
        return paths
