"""Loading images of any common mode as (H, W, 3) uint8 RGB arrays, with errors that name the file.

Every image file is opened by ``open_image``, which reads the header only and refuses an image that
declares more pixels than the pixel limit before a byte of it is decoded (a small PNG can declare
50000×50000: a decompression bomb). The limit is ``max_pixels`` where given, else the process's
(``set_pixel_limit``, the CLI's ``--max-pixels``), else Pillow's ``PIL.Image.MAX_IMAGE_PIXELS``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


class ImageTooLargeError(ValueError):
    """An image declares more pixels than the pixel limit (a decompression bomb, or a huge scan)."""


_UNSET = object()
_process_limit: object = _UNSET  # set_pixel_limit's value (None: no limit); unset: Pillow's setting


def pixel_limit(max_pixels: int | None = None) -> int | None:
    """The pixel limit in force: ``max_pixels`` if given (0: none), else the process's
    (``set_pixel_limit``), else Pillow's ``PIL.Image.MAX_IMAGE_PIXELS`` (None: no limit)."""
    if max_pixels is not None:
        return max_pixels or None
    if _process_limit is not _UNSET:
        return _process_limit  # type: ignore[return-value]
    return Image.MAX_IMAGE_PIXELS


def set_pixel_limit(max_pixels: int | None) -> None:
    """Every image this process reads (``load_image``, label maps, DataLoader workers forked after
    this call) is refused above ``max_pixels`` (0 or None: no limit).

    Pillow refuses images above twice its own ``MAX_IMAGE_PIXELS`` when it opens them; where ours is
    higher, Pillow's is raised to it (never lowered), so that the limit asked for is the one applied."""
    global _process_limit
    if max_pixels is not None and max_pixels < 0:
        raise ValueError(f"--max-pixels must be >= 0 (0: no limit), got {max_pixels}")
    limit = max_pixels or None
    _process_limit = limit
    if Image.MAX_IMAGE_PIXELS is not None and (limit is None or limit > Image.MAX_IMAGE_PIXELS):
        Image.MAX_IMAGE_PIXELS = limit


def check_pixels_before_pillow() -> None:
    """Keep the limit in force as the process's and switch Pillow's own check off, for a process where a
    library opens uploads with Pillow before dapseg reads them (the demo's Gradio widget opens each
    upload's header): there Pillow's exception would end the request with a generic error, where
    dapseg's refusal names the file and the limit. Every dapseg read still checks the size first."""
    set_pixel_limit(pixel_limit() or 0)
    Image.MAX_IMAGE_PIXELS = None


def check_pixels(size: tuple[int, int], source: str, max_pixels: int | None = None) -> None:
    """Raise ``ImageTooLargeError`` naming ``source`` and the limit where ``size`` (W, H) exceeds it.
    For any reader that learns an image's size before decoding it (``open_image`` does this)."""
    limit = pixel_limit(max_pixels)
    w, h = size
    if limit is not None and w * h > limit:
        raise ImageTooLargeError(
            f"image {source} declares {w}x{h} = {w * h:,} pixels, more than the limit of {limit:,} pixels "
            "(a decompression bomb?); not decoded. Raise the limit with --max-pixels N (Python: "
            "max_pixels=N) if the image is genuine")


@contextmanager
def open_image(path: str | os.PathLike[str], max_pixels: int | None = None) -> Iterator[Image.Image]:
    """The image at ``path`` opened with Pillow (header read, nothing decoded), its declared size checked
    (``check_pixels``); errors name the path. The caller decodes (``img.load()``) inside the block."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"expected an image file, got a directory: {path}")
    try:
        img = Image.open(path)
    except Image.DecompressionBombError as e:  # above twice Pillow's own limit: refused while opening
        limit = pixel_limit(max_pixels)
        declared = re.search(r"\((\d+) pixels\)", str(e))
        n = int(declared.group(1)) if declared else None
        if n is not None and limit is not None and n > limit:
            why = f"declares {n:,} pixels, more than the limit of {limit:,} pixels"
        else:  # a limit above Pillow's was asked for without raising Pillow's (set_pixel_limit does)
            why = f"declares more pixels than Pillow opens ({e})"
        raise ImageTooLargeError(
            f"image {path} {why} (a decompression bomb?); not decoded. Raise the limit with --max-pixels N "
            "(Python: images.set_pixel_limit(N), which also raises Pillow's own) if the image is genuine") from e
    except PermissionError as e:
        raise PermissionError(f"cannot read image {path}: permission denied") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot decode image {path}: corrupt or not an image ({e})") from e
    with img:
        check_pixels(img.size, str(path), max_pixels)
        yield img


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


def load_image(image: str | os.PathLike[str] | Image.Image | np.ndarray, *,
               max_pixels: int | None = None) -> np.ndarray:
    """A path, PIL image or array -> (H, W, 3) uint8 RGB. Errors name the path; a file or a PIL image
    (maybe not decoded yet) larger than the pixel limit (``pixel_limit(max_pixels)``) is an
    ``ImageTooLargeError`` raised before decoding. An array is already in memory and is not checked."""
    if isinstance(image, np.ndarray):
        return array_to_rgb(image)
    if isinstance(image, Image.Image):
        check_pixels(image.size, "(PIL image)", max_pixels)
        return to_rgb_array(image)
    with open_image(image, max_pixels) as img:
        try:
            img.load()
            return to_rgb_array(img, str(image))
        except PermissionError as e:
            raise PermissionError(f"cannot read image {image}: permission denied") from e
        except (OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"cannot decode image {image}: corrupt or not an image ({e})") from e
