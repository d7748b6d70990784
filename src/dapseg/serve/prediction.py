"""A segmentation -> Label Studio's prediction JSON: one ``brushlabels`` result per class present, in
Label Studio's brush RLE, with the image size, a score and the model version."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from dapseg.api import Segmenter
from dapseg.labeling.labelstudio import brush_results as label_map_results
from dapseg.serve.label_config import BrushTarget, Prompts


@dataclass(frozen=True)
class Segmented:
    labels: np.ndarray  # (H, W) int64 index into the target's labels, or postprocess.UNLABELED
    score: float  # mean top-class probability


def model_version(segmenter: Segmenter, prompts: Prompts) -> str:
    """``dapseg-<preset>-<hash>``: the hash covers every setting that changes a prediction (the config,
    random/tiny models, the classes file), so Label Studio asks again when one changes."""
    settings = {"config": segmenter.config.model_dump(mode="json"), "random_weights": segmenter.random_weights,
                "tiny": segmenter.tiny, "prompts": prompts.describe()}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode("utf-8")).hexdigest()[:12]
    return f"dapseg-{segmenter.config.name}-{digest}"


class BrushPredictor:
    """The segmenter with the class prompts; ``segment`` runs on the model thread only."""

    def __init__(self, segmenter: Segmenter, prompts: Prompts) -> None:
        self.segmenter = segmenter
        self.prompts = prompts
        self.model_version = model_version(segmenter, prompts)

    def segment(self, image: np.ndarray, target: BrushTarget) -> Segmented:
        result = self.segmenter.predict(image, self.prompts.class_set(target.labels))
        return Segmented(result.labels.numpy(), result.mean_top_probability())


def brush_results(segmented: Segmented, target: BrushTarget) -> list[dict[str, Any]]:
    """One brushlabels result per label with at least one pixel (unlabeled pixels are in none); region ids
    carry the control's name, unique in a task whose config has several BrushLabels."""
    results = label_map_results(segmented.labels, list(target.labels), from_name=target.from_name,
                                to_name=target.to_name)
    for result in results:
        result["id"] = f"{result['id']}_{target.from_name}"
    return results
