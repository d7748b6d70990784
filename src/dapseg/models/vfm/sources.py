"""Where a VFM family's pretrained weights come from: one file on the Hugging Face hub (timm's
releases), one file at a URL (SAM's releases) or a folder of files of a hub repository (Stable
Diffusion). Each source knows its cache location (under the weights cache, ``dapseg.weights``) and
downloads atomically; ``loading.fetch_weights`` checks the network first and turns failures into
``WeightsMissingError``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dapseg import weights as W
from dapseg.models.vfm.base import VfmSpec

_TIMM_HUB_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class TimmHubFile:
    """``spec.hub`` is a timm hub tag: the file is ``timm/<tag>``'s safetensors."""

    folder: bool = False

    def describe(self, spec: VfmSpec) -> str:
        return f"Hugging Face hub timm/{spec.hub}"

    def host(self, spec: VfmSpec) -> str:
        return "huggingface.co"

    def cached(self, spec: VfmSpec, cache_dir: str | os.PathLike[str] | None) -> Path | None:
        return W.cached_hf_file(f"timm/{spec.hub}", list(_TIMM_HUB_FILES), cache_dir)

    def download(self, spec: VfmSpec, cache_dir: str | os.PathLike[str] | None) -> Path:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(f"timm/{spec.hub}", _TIMM_HUB_FILES[0], cache_dir=str(W.hf_cache(cache_dir))))


@dataclass(frozen=True)
class UrlFile:
    """``spec.hub`` is the URL of the release file, cached under the torch cache's checkpoints."""

    folder: bool = False

    def describe(self, spec: VfmSpec) -> str:
        return spec.hub

    def host(self, spec: VfmSpec) -> str:
        return spec.hub.split("/")[2]

    def _path(self, spec: VfmSpec, cache_dir: str | os.PathLike[str] | None) -> Path:
        return W.torch_cache(cache_dir) / "checkpoints" / spec.hub.rsplit("/", 1)[-1]

    def cached(self, spec: VfmSpec, cache_dir: str | os.PathLike[str] | None) -> Path | None:
        path = self._path(spec, cache_dir)
        return path if path.is_file() else None

    def download(self, spec: VfmSpec, cache_dir: str | os.PathLike[str] | None) -> Path:
        import torch.hub

        from dapseg.files import atomic_write

        dest = self._path(spec, cache_dir)  # a partial download is never taken for the checkpoint
        return atomic_write(dest, lambda tmp: torch.hub.download_url_to_file(spec.hub, str(tmp), progress=True))


@dataclass(frozen=True)
class HubFolder:
    """``spec.hub`` is a hub repository; the weights are ``files`` (paths inside it) and the weights
    path handed to the family's reader is the folder holding them (the repository's snapshot)."""

    files: tuple[str, ...]
    folder: bool = True

    def describe(self, spec: VfmSpec) -> str:
        return f"Hugging Face hub {spec.hub} ({', '.join(self.files)})"

    def host(self, spec: VfmSpec) -> str:
        return "huggingface.co"

    def cached(self, spec: VfmSpec, cache_dir: str | os.PathLike[str] | None) -> Path | None:
        roots = set()
        for name in self.files:
            hit = W.cached_hf_file(spec.hub, [name], cache_dir)
            if hit is None:
                return None
            roots.add(hit.parents[len(Path(name).parts) - 1])  # .../snapshots/<revision>
        return roots.pop() if len(roots) == 1 else None  # files of one revision only

    def download(self, spec: VfmSpec, cache_dir: str | os.PathLike[str] | None) -> Path:
        from huggingface_hub import snapshot_download

        root = Path(snapshot_download(spec.hub, allow_patterns=list(self.files), cache_dir=str(W.hf_cache(cache_dir))))
        missing = [name for name in self.files if not (root / name).is_file()]
        if missing:
            raise FileNotFoundError(f"hub repository {spec.hub} has no {', '.join(missing)}")
        return root
