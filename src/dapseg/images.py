"""Loading images of any common mode as (H, W, 3) uint8 RGB arrays, with errors that name the file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


def to_rgb_array(img: Image.Image, source: str = "image") -> np.ndarray:
    """Any PIL mode -> (H, W, 3) uint8. 16-bit and float images are scaled to their range."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        # I;16 images are 16-bit by definition: scale by 65535 even when the image is dark.
        return _gray_float_to_rgb(arr, source, 65535.0 if img.mode.startswith("I;16") else None)
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on white so transparent regions do not turn black.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8))


def _gray_float_to_rgb(arr: np.ndarray, source: str, hi: float | None = None) -> np.ndarray:
    """(H, W) values in [0, hi] -> (H, W, 3) uint8; ``hi`` unknown (None): guessed from the maximum."""
    if arr.ndim != 2:
        raise ValueError(f"{source}: unsupported image array of shape {arr.shape}")
    if hi is None:
        hi = 65535.0 if arr.max(initial=0) > 255 else 255.0
    arr8 = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return np.repeat(arr8[:, :, None], 3, axis=2)


def array_to_rgb(arr: np.ndarray, source: str = "array") -> np.ndarray:
    """(H, W), (H, W, 1|3|4) arrays of uint8/uint16/float in [0, 1] -> (H, W, 3) uint8."""
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        if arr.dtype == np.uint8:
            return np.repeat(arr[:, :, None], 3, axis=2)
        if np.issubdtype(arr.dtype, np.floating) and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        return _gray_float_to_rgb(arr.astype(np.float64), source, 65535.0 if arr.dtype == np.uint16 else None)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"{source}: expected an (H, W, 3) image array, got shape {arr.shape}")
    if arr.shape[2] == 4:
        return to_rgb_array(Image.fromarray(arr.astype(np.uint8), mode="RGBA"), source)
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if np.issubdtype(arr.dtype, np.floating):
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        return np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8)
    if arr.dtype == np.uint16:
        return (arr.astype(np.float64) / 65535.0 * 255.0 + 0.5).astype(np.uint8)
    return np.clip(arr, 0, 255).astype(np.uint8)


def load_image(image: str | os.PathLike[str] | Image.Image | np.ndarray) -> np.ndarray:
    """A path, PIL image or array -> (H, W, 3) uint8 RGB. Errors name the path."""
    if isinstance(image, np.ndarray):
        return array_to_rgb(image)
    if isinstance(image, Image.Image):
        return to_rgb_array(image)
    path = Path(image)
    if not path.exists():
        raise FileNotFoundError(f"image not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"expected an image file, got a directory: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb_array(img, str(path))
    except PermissionError as e:
        raise PermissionError(f"cannot read image {path}: permission denied") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot decode image {path}: corrupt or not an image ({e})") from e
