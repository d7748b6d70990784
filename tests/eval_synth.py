"""Synthetic benchmark trees in the exact on-disk layouts, written by the eval tests (not a test file)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from dapseg.data.spec import DatasetSpec, load_dataset_spec

SIZES = [(24, 32), (32, 24), (20, 20), (28, 36), (16, 40), (30, 22)]  # (H, W), small and varied


def stored_label(rng: np.random.Generator, spec: DatasetSpec, h: int, w: int) -> np.ndarray:
    """Values as they are on disk: 1..C plus 0 with reduce_zero_label, else 0..C-1; some ignore pixels."""
    lo, hi = (0, spec.num_classes + 1) if spec.reduce_zero_label else (0, spec.num_classes)
    lab = rng.integers(lo, hi, size=(h, w))
    lab[rng.random((h, w)) < 0.1] = spec.ignore_index
    return lab


def write_label(path: Path, lab: np.ndarray, spec: DatasetSpec) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if spec.seg_suffix.endswith(".tif"):
        Image.fromarray(lab.astype(np.uint16)).save(path)
    elif spec.name.startswith("voc"):
        im = Image.fromarray(lab.astype(np.uint8), mode="P")  # VOC ships palette PNGs
        im.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
        im.save(path)
    else:
        Image.fromarray(lab.astype(np.uint8), mode="L").save(path)


def make_dataset(data_root: Path, name: str | DatasetSpec, n: int = 4, seed: int = 0,
                 extra_unlisted: int = 0) -> dict[str, np.ndarray]:
    """Write ``n`` images + labels for dataset ``name`` under ``data_root`` in its layout.

    Returns {image name: stored label}. With a split file, ``extra_unlisted`` images exist on disk but
    are not listed (they must not be read).
    """
    spec = load_dataset_spec(name) if isinstance(name, str) else name
    rng = np.random.default_rng(seed)
    root = data_root / spec.root
    out: dict[str, np.ndarray] = {}
    names = []
    for i in range(n + extra_unlisted):
        stem = f"img_{i:03d}"
        if spec.name == "cityscapes":
            stem = f"{'aachen' if i % 2 else 'bonn'}/{stem}"
        h, w = SIZES[i % len(SIZES)]
        img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        ip = root / spec.img_dir / f"{stem}{spec.img_suffix}"
        ip.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(ip, format="PNG" if spec.img_suffix.endswith(".png") else "JPEG")
        lab = stored_label(rng, spec, h, w)
        write_label(root / spec.ann_dir / f"{stem}{spec.seg_suffix}", lab, spec)
        if i < n:
            names.append(stem)
            out[stem] = lab
    if spec.split:
        sp = root / spec.split
        sp.parent.mkdir(parents=True, exist_ok=True)
        sp.write_text("\n".join(names) + "\n")
    elif extra_unlisted:
        raise ValueError("extra_unlisted needs a split file")
    return out


def expected_classes(stored: np.ndarray, spec: DatasetSpec) -> np.ndarray:
    """The decoded label written independently of the reader: reduce_zero_label by hand."""
    out = stored.astype(np.int64).copy()
    if spec.reduce_zero_label:
        out = np.where(stored == 0, spec.ignore_index, np.where(stored == spec.ignore_index, spec.ignore_index,
                                                                  stored - 1))
    return out


class FakePredictor:
    """Deterministic 'model': labels from the image pixels (no state), so any order/sharding agrees."""

    def __init__(self, num_classes: int, fail_after: int | None = None) -> None:
        self.num_classes = num_classes
        self.fail_after = fail_after
        self.calls = 0

    def __call__(self, image: np.ndarray):
        import torch

        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        return torch.from_numpy((image.astype(np.int64).sum(-1) * 7) % self.num_classes)
