"""A benchmark dataset on disk (MMSegmentation layout) as a map-style torch Dataset."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from dapseg.data.io import DataError, read_image, read_label, reduce_zero_label
from dapseg.data.spec import DatasetSpec, load_dataset_spec
from dapseg.files import resolve_inside


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
    """Samples sorted by name; ``limit`` keeps the first N (the same N on every run).

    Image names (split-file lines, files found on disk) are untrusted: each image must resolve inside
    the image folder and each label inside the label folder (no absolute name, no ``..``, no symlink
    leading out), else a ``DataError`` names the split file and line. With ``skip_bad``, a sample that
    cannot be used (unreadable file, label of the wrong size or mode, label value outside the classes)
    comes back with ``error`` set instead of raising.
    """

    def __init__(self, spec: DatasetSpec | str, data_root: str | Path, *, limit: int | None = None,
                 skip_bad: bool = False) -> None:
        self.spec = load_dataset_spec(spec) if isinstance(spec, str) else spec
        self.root = resolve_root(self.spec, data_root)
        self.skip_bad = skip_bad
        sources = self._list_names()  # name -> where it was listed (for error messages)
        names = sorted(sources)
        if limit is not None:
            if limit < 1:
                raise ValueError(f"--limit must be >= 1, got {limit}")
            names = names[:limit]
        self.names = names
        self._paths = {n: self._confined_paths(n, sources[n]) for n in names}
        self._check_files()

    # ------------------------------------------------------------------ listing

    def _list_names(self) -> dict[str, str]:
        """{image name: where it was listed}, e.g. {"2008_000123": "line 4 of split file <path>"}."""
        spec, img_dir = self.spec, self.root / self.spec.img_dir
        names: dict[str, str] = {}
        if spec.split:
            split = self.root / spec.split
            if not split.is_file():
                raise DataError(
                    f"dataset {spec.name!r}: split file {split} not found.\nExpected layout:\n{spec.layout()}"
                )
            try:
                lines = split.read_text(encoding="utf-8-sig").splitlines()  # a BOM is not a name
            except (OSError, UnicodeDecodeError) as e:
                raise DataError(f"dataset {spec.name!r}: cannot read split file {split}: {e}") from e
            for k, line in enumerate(lines, 1):
                if line.strip():
                    names.setdefault(line.strip(), f"line {k} of split file {split}")
        else:
            for p in img_dir.rglob(f"*{spec.img_suffix}"):
                if p.is_file():
                    names[str(p.relative_to(img_dir))[: -len(spec.img_suffix)]] = f"file {p}"
        if not names:
            raise DataError(f"dataset {spec.name!r}: no images found under {img_dir}.\n"
                            f"Expected layout:\n{spec.layout()}")
        return names

    def _confined_paths(self, name: str, source: str) -> tuple[Path, Path]:
        spec = self.spec
        try:
            return (resolve_inside(self.root / spec.img_dir, f"{name}{spec.img_suffix}", what=f"{source} (image)"),
                    resolve_inside(self.root / spec.ann_dir, f"{name}{spec.seg_suffix}", what=f"{source} (label)"))
        except ValueError as e:
            raise DataError(f"dataset {spec.name!r}: {e}; image names must stay inside the dataset's "
                            "image and label folders") from e

    def _check_files(self) -> None:
        missing = [p for n in self.names for p in self.paths(n) if not p.is_file()]
        if missing:
            shown = "\n  ".join(str(p) for p in missing[:5])
            more = f"\n  ... and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise DataError(f"dataset {self.spec.name!r}: {len(missing)} file(s) missing:\n  {shown}{more}\n"
                            f"Expected layout:\n{self.spec.layout()}")

    def paths(self, name: str) -> tuple[Path, Path]:
        """(image, label) of ``name``, resolved and checked to lie inside their folders."""
        return self._paths[name]

    # ------------------------------------------------------------------ reading

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> Sample:
        return self.sample(index, capture_errors=self.skip_bad)

    def sample(self, index: int, *, capture_errors: bool = False) -> Sample:
        """Sample ``index``; with ``capture_errors`` a DataError comes back as ``Sample.error``."""
        name = self.names[index]
        try:
            image, label = self._read(name)
        except DataError as e:
            if capture_errors:
                return Sample(index, name, None, None, error=str(e))
            raise
        return Sample(index, name, image, label)

    def _read(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        img_path, ann_path = self.paths(name)
        image = read_image(img_path)
        raw = read_label(ann_path)
        if raw.shape != image.shape[:2]:
            raise DataError(f"label {ann_path} is {raw.shape[1]}x{raw.shape[0]} but image {img_path} is "
                            f"{image.shape[1]}x{image.shape[0]}")
        return image, self.decode_label(raw, ann_path)

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
