"""Where the mask generators' weights come from: a release file at a URL (SAM2) or a folder of a
Hugging Face hub repository (Mask2Former, EoMT), both cached under the one weights cache
(``dapseg.weights``) so that ``dapseg download PRESET`` fills it for offline machines."""

from __future__ import annotations

import os
from pathlib import Path

from dapseg import weights as W


def _how(what: str) -> str:
    return (f"Run `dapseg download <preset>` on a machine with internet and copy the cache directory "
            f"(--cache-dir / $DAPSEG_CACHE) here, or set masks.params.weights to a local copy of {what}; "
            "`--random-weights` runs without any weights (smoke mode).")


def fetch_url(url: str, cache_dir: str | os.PathLike[str] | None) -> Path:
    """The release file at ``url``: cached under ``<cache>/torch/checkpoints``, else downloaded
    (atomically), else ``WeightsMissingError``."""
    path = W.torch_cache(cache_dir) / "checkpoints" / url.rsplit("/", 1)[-1]
    if path.is_file():
        return path
    if W.is_offline(url.split("/")[2]):
        raise W.WeightsMissingError(url, _how(url), "no network and nothing in the cache")
    try:
        import torch.hub

        from dapseg.files import atomic_write

        return atomic_write(path, lambda tmp: torch.hub.download_url_to_file(url, str(tmp), progress=True))
    except Exception as err:  # HTTP errors come in many types; the message names the file
        raise W.WeightsMissingError(url, _how(url), str(err)) from err


def fetch_hub_folder(repo: str, patterns: list[str], cache_dir: str | os.PathLike[str] | None) -> Path:
    """The snapshot folder of hub repository ``repo`` holding the files matching ``patterns``: cached
    under ``<cache>/hf``, else downloaded, else ``WeightsMissingError``."""
    from huggingface_hub import snapshot_download

    what = f"Hugging Face hub {repo}"
    kwargs = {"allow_patterns": patterns, "cache_dir": str(W.hf_cache(cache_dir))}
    try:
        return Path(snapshot_download(repo, local_files_only=True, **kwargs))
    except Exception:  # not (completely) cached: download below
        pass
    if W.is_offline("huggingface.co"):
        raise W.WeightsMissingError(what, _how(what), "no network and nothing in the cache")
    try:
        return Path(snapshot_download(repo, **kwargs))
    except Exception as err:
        raise W.WeightsMissingError(what, _how(what), str(err)) from err
