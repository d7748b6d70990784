"""What ``dapseg segment`` saves per image (``--save``), where, and how each kind is written.

Every file of an image is written atomically (``files.atomic_write``) under ``OUT/<stem><suffix>``,
``<stem>`` mirroring the input's path (``dapseg.labeling.inputs``); the path is confined to OUT.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dapseg.files import atomic_write, resolve_inside
from dapseg.labeling import coco
from dapseg.labeling.inputs import Input
from dapseg.result import SegmentationResult

SUFFIXES = {
    "labels": "_labels.png",  # palette PNG, pixel value = class index, 255 = unlabeled
    "overlay": "_overlay.png",  # the image blended with the class colours, with a legend
    "json": ".json",  # size, classes, pixel share per class
    "probs": "_probs.npz",  # class probabilities (C, H, W) float16 at the input resolution
    "rle": "_rle.json",  # COCO-style: one run-length mask per class present (unlabeled pixels in none)
}
DEFAULT_SAVE = ("labels", "overlay", "json")
LABEL_EXTRA = "pip install 'dapseg[label]'"


def parse_save(text: str) -> tuple[str, ...]:
    """``--save labels,probs`` -> ("labels", "probs"); unknown kinds and a missing extra are errors."""
    kinds = tuple(dict.fromkeys(k.strip() for k in text.split(",") if k.strip()))
    unknown = [k for k in kinds if k not in SUFFIXES]
    if unknown or not kinds:
        raise ValueError(f"--save {text!r}: unknown output kind(s) {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(SUFFIXES)}")
    if "rle" in kinds:
        try:
            import pycocotools.mask  # noqa: F401
        except ImportError as e:
            raise RuntimeError(f"--save rle needs pycocotools (the `label` extra): {LABEL_EXTRA}") from e
    return kinds


def output_names(item: Input, kinds: tuple[str, ...]) -> dict[str, str]:
    """Kind -> the output's path relative to OUT, e.g. {"labels": "a/x_labels.png"}."""
    return {kind: item.stem + SUFFIXES[kind] for kind in kinds}


def check_unique_outputs(items: list[Input], kinds: tuple[str, ...], reserved: Callable[[str], bool]) -> None:
    """Two inputs that would write one file, or an output on one of the job's own files: an error
    naming them, before any work. Keeps one entry per input (not per file): a million inputs fit."""
    owner: dict[str, Input] = {}
    for item in items:
        names = output_names(item, kinds)
        for name in names.values():
            if reserved(name):
                raise ValueError(f"{item.source}: its output {name} would overwrite the labeling job's own file "
                                 "of that name; rename the input or label it from another folder")
        other = owner.setdefault(item.stem, item)
        if other is not item:
            _clash(other, item, names[kinds[0]])
    # One kind's suffix may end another's: stem "a_rle" + ".json" is stem "a" + "_rle.json".
    for short in kinds:
        for long in kinds:
            if long != short and SUFFIXES[long].endswith(SUFFIXES[short]):
                infix = SUFFIXES[long][: -len(SUFFIXES[short])]
                for stem, item in owner.items():
                    if (other := owner.get(stem + infix)) is not None:
                        _clash(item, other, other.stem + SUFFIXES[short])


def _clash(first: Input, second: Input, name: str) -> None:
    raise ValueError(f"{first.source} and {second.source} would both be written to {name}; rename one, "
                     "or label them into different --out folders")


def write_outputs(result: SegmentationResult, out: Path, item: Input, kinds: tuple[str, ...],
                  extra: dict[str, Any]) -> list[str]:
    """Write the chosen kinds for one image; all of them or none (a failure removes the ones written).
    Returns their paths relative to OUT."""
    names = output_names(item, kinds)
    written: list[Path] = []
    try:
        for kind, name in names.items():
            path = resolve_inside(out, name, what=f"output of {item.source}")
            atomic_write(path, lambda tmp, kind=kind: WRITERS[kind](result, tmp, item, extra))
            written.append(path)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return list(names.values())


def _labels(result: SegmentationResult, path: Path, item: Input, extra: dict[str, Any]) -> None:
    result.label_image().save(path, format="PNG")


def _overlay(result: SegmentationResult, path: Path, item: Input, extra: dict[str, Any]) -> None:
    result.overlay().save(path, format="PNG")


def _summary(result: SegmentationResult, path: Path, item: Input, extra: dict[str, Any]) -> None:
    path.write_text(json.dumps({**result.summary(), "image": str(item.source), **extra}, indent=2),
                    encoding="utf-8")


def _probs(result: SegmentationResult, path: Path, item: Input, extra: dict[str, Any]) -> None:
    # (C, H, W) float16: soft pseudo-labels; the class names travel along (a unicode array, no pickle)
    np.savez_compressed(path, probs=result.probs.numpy().astype(np.float16), classes=np.array(result.classes))


def _rle(result: SegmentationResult, path: Path, item: Input, extra: dict[str, Any]) -> None:
    doc = coco_rle(result.labels.numpy(), result.classes, item.rel)
    path.write_text(json.dumps(doc), encoding="utf-8")


WRITERS: dict[str, Callable[[SegmentationResult, Path, Input, dict[str, Any]], None]] = {
    "labels": _labels, "overlay": _overlay, "json": _summary, "probs": _probs, "rle": _rle,
}


def coco_rle(labels: np.ndarray, classes: list[str], file_name: str) -> dict[str, Any]:
    """A COCO-style document for one image: every class as a category (id = index + 1) and one
    annotation per class present, its mask as compressed RLE (``pycocotools.mask.encode``); unlabeled
    pixels are in none. ``dapseg export --format coco`` makes one dataset of a whole job."""
    h, w = labels.shape
    return {"images": [{"id": 1, "file_name": file_name, "height": h, "width": w}],
            "categories": coco.categories(classes), "annotations": coco.class_annotations(labels, 1, 1)}
