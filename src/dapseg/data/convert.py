"""Label converters that produce the layouts the readers expect.

- ``coco-stuff``: raw COCO-Stuff164k PNGs (ids 0..181 with gaps, 255 unlabeled) -> 171 train ids
  (``<stem>_labelTrainIds.png``), as MMSegmentation's coco_stuff164k converter does.
- ``coco-object``: raw COCO-Stuff164k PNGs -> background 0 + 80 thing classes 1..80
  (``<stem>_instanceTrainIds.png``); stuff ids (> 90) and unlabeled (255) become background 0, as the
  references' ``cvt_coco_object.py`` does.
- ``cityscapes``: ``*_gtFine_labelIds.png`` -> ``*_gtFine_labelTrainIds.png`` (19 train ids, 255 ignore),
  the cityscapesscripts table.

Each converter is idempotent: an output identical to what it would write is left alone; a different
existing output is an error unless ``force``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from dapseg.data.io import DataError, atomic_save_image, read_label

# COCO-Stuff raw ids that exist (91 things ids with 11 unused + 91 stuff ids), in train-id order.
_COCO_UNUSED = {11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90}
COCO_STUFF_IDS = [i for i in range(182) if i not in _COCO_UNUSED]  # 171 ids
assert len(COCO_STUFF_IDS) == 171


def coco_stuff_lut() -> np.ndarray:
    """(256,) raw id -> 171-class train id; unlabeled and unused ids -> 255."""
    lut = np.full(256, 255, dtype=np.uint8)
    for train_id, raw in enumerate(COCO_STUFF_IDS):
        lut[raw] = train_id
    return lut


def coco_object_lut() -> np.ndarray:
    """(256,) raw id -> COCO-Object id: things (raw <= 90) -> 1..80, everything else -> 0."""
    lut = np.zeros(256, dtype=np.uint8)
    for train_id, raw in enumerate(COCO_STUFF_IDS[:80]):
        lut[raw] = train_id + 1
    return lut


# cityscapesscripts labels.py: label id -> train id for the 19 evaluated classes.
CITYSCAPES_ID_TO_TRAIN = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                          25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def cityscapes_lut() -> np.ndarray:
    lut = np.full(256, 255, dtype=np.uint8)
    for label_id, train_id in CITYSCAPES_ID_TO_TRAIN.items():
        lut[label_id] = train_id
    return lut


@dataclass
class ConvertReport:
    written: list[Path] = field(default_factory=list)
    unchanged: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        return f"{len(self.written)} written, {len(self.unchanged)} already up to date"


@dataclass(frozen=True)
class Converter:
    name: str
    description: str
    find: Callable[[Path], list[tuple[Path, Path]]]  # root -> [(input, output)]
    lut: Callable[[], np.ndarray]


def _coco_pairs(suffix: str) -> Callable[[Path], list[tuple[Path, Path]]]:
    def find(root: Path) -> list[tuple[Path, Path]]:
        ann = root / "annotations"
        if not ann.is_dir():
            raise DataError(f"no annotations/ folder under {root}; expected COCO-Stuff164k:\n"
                            f"{root}/images/{{train2017,val2017}}/*.jpg\n"
                            f"{root}/annotations/{{train2017,val2017}}/*.png  (raw COCO-Stuff labels)")
        pairs = []
        for split in ("train2017", "val2017"):
            for p in sorted((ann / split).glob("*.png")):
                if "TrainIds" not in p.name:
                    pairs.append((p, p.with_name(p.stem + suffix)))
        return pairs
    return find


def _cityscapes_pairs(root: Path) -> list[tuple[Path, Path]]:
    gt = root / "gtFine"
    if not gt.is_dir():
        raise DataError(f"no gtFine/ folder under {root}; expected Cityscapes:\n"
                        f"{root}/leftImg8bit/{{train,val}}/<city>/*_leftImg8bit.png\n"
                        f"{root}/gtFine/{{train,val}}/<city>/*_gtFine_labelIds.png")
    return [(p, p.with_name(p.name.replace("_gtFine_labelIds.png", "_gtFine_labelTrainIds.png")))
            for p in sorted(gt.rglob("*_gtFine_labelIds.png"))]


CONVERTERS: dict[str, Converter] = {
    "coco-stuff": Converter("coco-stuff", "COCO-Stuff164k raw labels -> 171 train ids",
                            _coco_pairs("_labelTrainIds.png"), coco_stuff_lut),
    "coco-object": Converter("coco-object", "COCO-Stuff164k raw labels -> COCO-Object (bg + 80 things)",
                             _coco_pairs("_instanceTrainIds.png"), coco_object_lut),
    "cityscapes": Converter("cityscapes", "Cityscapes label ids -> 19 train ids",
                            _cityscapes_pairs, cityscapes_lut),
}


def convert(name: str, root: str | Path, *, force: bool = False, progress: bool = True) -> ConvertReport:
    """Convert every label under ``root`` with converter ``name``; see the module docstring."""
    if name not in CONVERTERS:
        raise ValueError(f"unknown converter {name!r}; valid: {', '.join(CONVERTERS)}")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist")
    conv = CONVERTERS[name]
    pairs = conv.find(root)
    if not pairs:
        raise DataError(f"{name}: no input labels found under {root}")
    lut = conv.lut()
    report = ConvertReport()
    for src, dst in _progress(pairs, progress, name):
        raw = read_label(src)
        if raw.max(initial=0) > 255 or raw.min(initial=0) < 0:
            raise DataError(f"label {src}: values outside 0..255 (found {raw.min()}..{raw.max()})")
        out = lut[raw]
        if dst.exists():
            old = read_label(dst)
            if old.shape == out.shape and np.array_equal(old, out):
                report.unchanged.append(dst)
                continue
            if not force:
                raise DataError(f"{dst} exists and differs from the conversion of {src}; "
                                "pass --force to overwrite")
        atomic_save_image(Image.fromarray(out), dst)
        report.written.append(dst)
    return report


def _progress(items: list, enabled: bool, desc: str) -> Iterable:
    return tqdm(items, desc=desc, unit="label", disable=not enabled)
