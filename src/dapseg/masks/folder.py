"""``folder``: precomputed region masks read from a directory, one file per image.

Two formats, looked up in this order for an image named ``name`` (a path's stem, the mirrored name
of ``dapseg segment``, a dataset sample's name):

- ``<root>/<name>.npz`` holding an ``instance_mask`` array: CorrCLIP's released masks (written by
  ``np.savez_compressed(..., instance_mask=...)``);
- ``<root>/<name>.png``: a single-channel 8- or 16-bit PNG whose pixel values are the region ids.

A name with folders (``frankfurt/frankfurt_000000_000294_leftImg8bit``) is looked up as given, then
by its last part alone: CorrCLIP's released masks are flat, one folder per dataset.

Every file is untrusted: paths are confined to ``root`` (``files.resolve_inside``), ``.npz`` files
are read with ``allow_pickle=False`` (an object array is refused, never unpickled), and the map is
checked (2-D, integer, the image's size, values below the padding sentinel).
"""

from __future__ import annotations

import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import UnidentifiedImageError
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from dapseg.files import resolve_inside
from dapseg.images import open_image
from dapseg.masks.base import MaskBuild, check_region_map
from dapseg.registry import MASK_GENERATORS

SUFFIXES = (".npz", ".png")


class FolderParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    root: Path | None = None  # the folder of mask files (required; --masks-dir DIR)
    key: str = "instance_mask"  # the array of a .npz file holding the map (CorrCLIP's name)


class FolderMasks:
    """Reads ``<root>/<name>.npz`` or ``<root>/<name>.png`` (see the module docstring)."""

    def __init__(self, params: FolderParams) -> None:
        if params.root is None:
            raise ValueError("masks: the folder generator needs the folder of precomputed masks: "
                             "set masks.params.root (or --masks-dir DIR)")
        root = Path(params.root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"masks.params.root: {root} is not a folder")
        self.root = root
        self.key = params.key

    def candidates(self, name: str) -> list[Path]:
        """The files that may hold ``name``'s map, in lookup order (each confined to ``root``)."""
        stems = [name]
        base = PurePosixPath(name.replace("\\", "/")).name
        if base and base != name:
            stems.append(base)
        return [resolve_inside(self.root, stem + suffix, what=f"region mask of image {name!r}")
                for stem in stems for suffix in SUFFIXES]

    def __call__(self, image: np.ndarray, *, name: str | None = None) -> Tensor:
        if not name:
            raise ValueError(f"masks: the folder generator ({self.root}) finds an image's mask by the image's "
                             "name, and this image has none (an array or PIL image); pass a file path, or "
                             "Segmenter.predict(image, classes, name=...)")
        paths = self.candidates(name)
        path = next((p for p in paths if p.is_file()), None)
        if path is None:
            looked = ", ".join(str(p.relative_to(self.root.resolve())) for p in paths)
            raise FileNotFoundError(f"no region mask for image {name!r} in {self.root} (looked for {looked})")
        arr = read_npz(path, self.key) if path.suffix == ".npz" else read_png(path)
        return check_region_map(arr, image.shape[:2], f"region mask {path}")


def read_npz(path: Path, key: str) -> np.ndarray:
    """Array ``key`` of the ``.npz`` file ``path``, never unpickling anything."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive (np.savez / np.savez_compressed)")
        with loaded as npz:
            if key not in npz.files:
                raise ValueError(f"no array {key!r} (it holds {', '.join(npz.files) or 'none'})")
            return npz[key]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        if "allow_pickle" in str(e):
            e = ValueError("it holds Python objects (pickled); only plain integer arrays are read")
        raise ValueError(f"cannot read region mask {path}: {e}") from e


def read_png(path: Path) -> np.ndarray:
    """The pixel values of a single-channel (8- or 16-bit) PNG."""
    try:
        with open_image(path) as img:  # the one reader: size checked against the pixel limit before decoding
            if img.format != "PNG":
                raise ValueError(f"not a PNG ({img.format})")
            if img.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
                raise ValueError(f"a region mask PNG must be single-channel 8- or 16-bit, got mode {img.mode}")
            img.load()
            return np.array(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read region mask {path}: {e}") from e


@MASK_GENERATORS.register("folder", params=FolderParams,
                          description="precomputed masks: <root>/<name>.npz (instance_mask) or 16-bit .png")
def build_folder(params: FolderParams, *, build: MaskBuild) -> FolderMasks:
    return FolderMasks(params)
