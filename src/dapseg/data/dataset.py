"""A benchmark dataset on disk (MMSegmentation layout) as a map-style torch Dataset."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from dapseg.data.io import DataError, UnreadableFileError, read_image, read_label, reduce_zero_label
from dapseg.data.spec import DatasetSpec, load_dataset_spec


@dataclass
class Sample:
    index: int
    name: str
    image: np.ndarray | None  # (H, W, 3) uint8; None when unreadable and skipping
    label: np.ndarray | None  # (H, W) int64, classes 0..C-1 or spec.ignore_index
    error: str | None = None  # why the sample could not be read (only with skip_bad)


def resolve_root(spec: DatasetSpec, data_root: str | Path) -> Path:
    """``data_root/spec.root`` if it exists, else ``data_root`` itself if it has the layout."""
    data_root = Path(data_root)
    for cand in (data_root / spec.root, data_root):
        if (cand / spec.img_dir).is_dir():
            return cand
    raise DataError(
        f"dataset {spec.name!r}: no {spec.img_dir}/ under {data_root / spec.root} or {data_root}.\n"
        f"Expected layout:\n{spec.layout()}"
    )


def dataset_present(spec: DatasetSpec, data_root: str | Path) -> bool:
    """Whether ``data_root`` holds this dataset at all: its image folder and at least one label of its
    kind (datasets share trees: Context-60/59/459 one VOC2010 folder, COCO-Stuff/Object one folder)."""
    try:
        root = resolve_root(spec, data_root)
    except DataError:
        return False
    ann = root / spec.ann_dir
    return ann.is_dir() and next(ann.rglob(f"*{spec.seg_suffix}"), None) is not None


class SegDataset(Dataset):
    """Samples sorted by name; ``limit`` keeps the first N (the same N on every run)."""

    def __init__(self, spec: DatasetSpec | str, data_root: str | Path, *, limit: int | None = None,
                 skip_bad: bool = False) -> None:
        self.spec = load_dataset_spec(spec) if isinstance(spec, str) else spec
        self.root = resolve_root(self.spec, data_root)
        self.skip_bad = skip_bad
        names = self._list_names()
        if limit is not None:
            if limit < 1:
                raise ValueError(f"--limit must be >= 1, got {limit}")
            names = names[:limit]
        self.names = names
        self._check_files()

    # ------------------------------------------------------------------ listing

    def _list_names(self) -> list[str]:
        spec, img_dir = self.spec, self.root / self.spec.img_dir
        if spec.split:
            split = self.root / spec.split
            if not split.is_file():
                raise DataError(
                    f"dataset {spec.name!r}: split file {split} not found.\nExpected layout:\n{spec.layout()}"
                )
            names = [line.strip() for line in split.read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            names = [
                str(p.relative_to(img_dir))[: -len(spec.img_suffix)]
                for p in img_dir.rglob(f"*{spec.img_suffix}")
                if p.is_file()
            ]
        if not names:
            raise DataError(f"dataset {spec.name!r}: no images found under {img_dir}.\n"
                            f"Expected layout:\n{spec.layout()}")
        return sorted(set(names))

    def _check_files(self) -> None:
        missing = [p for n in self.names for p in self.paths(n) if not p.is_file()]
        if missing:
            shown = "\n  ".join(str(p) for p in missing[:5])
            more = f"\n  ... and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise DataError(f"dataset {self.spec.name!r}: {len(missing)} file(s) missing:\n  {shown}{more}\n"
                            f"Expected layout:\n{self.spec.layout()}")

    def paths(self, name: str) -> tuple[Path, Path]:
        spec = self.spec
        return (self.root / spec.img_dir / f"{name}{spec.img_suffix}",
                self.root / spec.ann_dir / f"{name}{spec.seg_suffix}")

    # ------------------------------------------------------------------ reading

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> Sample:
        name = self.names[index]
        img_path, ann_path = self.paths(name)
        try:
            image = read_image(img_path)
            raw = read_label(ann_path)
        except UnreadableFileError as e:
            if self.skip_bad:
                return Sample(index, name, None, None, error=str(e))
            raise
        if raw.shape != image.shape[:2]:
            raise DataError(f"label {ann_path} is {raw.shape[1]}x{raw.shape[0]} but image {img_path} is "
                            f"{image.shape[1]}x{image.shape[0]}")
        label = self.decode_label(raw, ann_path)
        return Sample(index, name, image, label)

    def decode_label(self, raw: np.ndarray, path: Path | str = "<label>") -> np.ndarray:
        """Stored values -> class indices 0..C-1 or ignore; values out of range are an error."""
        spec = self.spec
        label = reduce_zero_label(raw, spec.ignore_index) if spec.reduce_zero_label else raw
        bad = (label != spec.ignore_index) & ((label < 0) | (label >= spec.num_classes))
        if bad.any():
            stored = int(raw[bad].flat[0])
            stored_as = ", stored as 1..C with 0 ignored" if spec.reduce_zero_label else ""
            raise DataError(
                f"label {path}: value {stored} is outside the {spec.num_classes} classes of {spec.name!r} "
                f"(0..{spec.num_classes - 1}{stored_as}; {spec.ignore_index} = ignore). "
                "Was the dataset converted (dapseg convert)?"
            )
        return label
