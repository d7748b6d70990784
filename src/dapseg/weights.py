"""Where pretrained weights live, and the one error raised when they cannot be had.

Every downloaded file goes under one cache directory (``cache_dir()``): the Hugging Face hub cache
is ``<cache>/huggingface/hub`` and plain URL downloads go to ``<cache>/checkpoints``. Offline
(``HF_HUB_OFFLINE=1`` / ``DAPSEG_OFFLINE=1``, or no route to the hub) with nothing cached raises
``WeightsMissingError`` naming the file and the command that fetches it, instead of hanging.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

_TRUE = {"1", "true", "yes", "on"}


class WeightsMissingError(RuntimeError):
    """Pretrained weights are not cached and cannot be downloaded now."""

    def __init__(self, what: str, how: str) -> None:
        self.what = what
        self.how = how
        super().__init__(f"missing weights: {what}. To get them: {how}")


def cache_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The cache directory: ``explicit``, else env ``DAPSEG_CACHE``, else ``~/.cache/dapseg``."""
    if explicit is not None:
        path = Path(explicit)
    elif os.environ.get("DAPSEG_CACHE"):
        path = Path(os.environ["DAPSEG_CACHE"])
    else:
        path = Path.home() / ".cache" / "dapseg"
    return path.expanduser()


def hf_hub_cache(cache: str | os.PathLike | None = None) -> Path:
    """The Hugging Face hub cache inside our cache directory."""
    return cache_dir(cache) / "huggingface" / "hub"


def is_offline(host: str = "huggingface.co", timeout_s: float = 2.0) -> bool:
    """True when told to stay offline (env) or when ``host`` cannot be reached within ``timeout_s``."""
    for var in ("DAPSEG_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return True
    try:
        with socket.create_connection((host, 443), timeout=timeout_s):
            return False
    except OSError:
        return True


def hf_cached_file(
    repo_id: str, filenames: tuple[str, ...], cache: str | os.PathLike | None = None
) -> Path | None:
    """The first of ``filenames`` of hub repo ``repo_id`` already in the cache, else None (no network)."""
    from huggingface_hub import try_to_load_from_cache

    for name in filenames:
        hit = try_to_load_from_cache(repo_id, name, cache_dir=str(hf_hub_cache(cache)))
        if isinstance(hit, str):
            return Path(hit)
    return None


def hf_fetch(
    repo_id: str, filenames: tuple[str, ...], cache: str | os.PathLike | None, *, what: str, how: str
) -> Path:
    """A local path to one of ``filenames`` of ``repo_id``: cached, else downloaded, else the error."""
    hit = hf_cached_file(repo_id, filenames, cache)
    if hit is not None:
        return hit
    if is_offline():
        raise WeightsMissingError(what, how)
    from huggingface_hub import hf_hub_download

    last: Exception | None = None
    for name in filenames:
        try:
            return Path(hf_hub_download(repo_id, name, cache_dir=str(hf_hub_cache(cache))))
        except Exception as err:  # hub errors are many types (HTTP, entry-not-found, connection)
            last = err
    raise WeightsMissingError(what, f"{how} (download failed: {last})")


def url_fetch(url: str, cache: str | os.PathLike | None, *, what: str, how: str) -> Path:
    """A local copy of ``url`` under ``<cache>/checkpoints``: cached, else downloaded, else the error."""
    dest = cache_dir(cache) / "checkpoints" / url.rsplit("/", 1)[-1]
    if dest.is_file():
        return dest
    if is_offline(host=url.split("/")[2]):
        raise WeightsMissingError(what, how)
    import torch.hub

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    try:
        torch.hub.download_url_to_file(url, str(tmp), progress=True)
        os.replace(tmp, dest)  # atomic: a half-written file is never taken for the checkpoint
    except Exception as err:
        tmp.unlink(missing_ok=True)
        raise WeightsMissingError(what, f"{how} (download failed: {err})") from err
    return dest
