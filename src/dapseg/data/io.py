"""Reading images and label maps from disk, with errors that name the file at fault."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from dapseg.files import atomic_write
from dapseg.images import load_image, open_image


class DataError(ValueError):
    """A dataset file is missing, unreadable or inconsistent; the message names it."""


class UnreadableFileError(DataError):
    """A file could not be decoded (the only kind of error ``--skip-bad`` skips)."""


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB, read by ``dapseg.images.load_image`` (the one image reader)."""
    try:
        return load_image(path)
    except (OSError, ValueError) as e:
        raise UnreadableFileError(f"cannot read image {path}: {e}") from e


def read_label(path: Path) -> np.ndarray:
    """(H, W) int64 class indices exactly as stored (palette PNG indices, 8/16-bit grey, 16-bit TIFF)."""
    try:
        with open_image(path) as im:  # refused before decoding above the pixel limit
            if im.mode not in ("P", "L", "I;16", "I;16B", "I;16L", "I", "1"):
                raise DataError(
                    f"label {path} has mode {im.mode}: expected a single-channel map of class indices "
                    "(palette or greyscale PNG, 16-bit TIFF); colour-coded labels must be converted first"
                )
            arr = np.asarray(im)
    except DataError:
        raise
    except (OSError, ValueError, UnidentifiedImageError, SyntaxError) as e:
        raise UnreadableFileError(f"cannot read label {path}: {e}") from e
    return arr.astype(np.int64)


def reduce_zero_label(label: np.ndarray, ignore_index: int) -> np.ndarray:
    """MMSeg's reduce_zero_label: 0 -> ignore, k -> k-1, ignore stays ignore."""
    out = label - 1
    out[(label == 0) | (label == ignore_index)] = ignore_index
    return out


def write_label_png(path: Path, label: np.ndarray) -> None:
    """Class indices as an 8-bit PNG (16-bit when a value exceeds 255), written atomically."""
    arr = np.asarray(label)
    im = Image.fromarray(arr.astype(np.uint8 if arr.max(initial=0) < 256 else np.uint16))
    atomic_save_image(im, path)


def atomic_save_image(im: Image.Image, path: Path, fmt: str = "PNG") -> None:
    atomic_write(path, lambda tmp: im.save(tmp, format=fmt))
