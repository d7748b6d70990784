"""One cache directory for every model's weights, and the error raised when they are missing.

The cache directory is ``--cache-dir``, else ``$DAPSEG_CACHE``, else ``~/.cache/dapseg``. Hugging Face
hub files live under ``<cache>/hf`` and torch-hub / URL files under ``<cache>/torch``, so copying
the one directory to an offline machine is enough.
"""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import torch


class WeightsMissingError(RuntimeError):
    """Weights are not in the cache and cannot be downloaded (offline)."""

    def __init__(self, what: str, how: str, cause: str = "") -> None:
        self.what, self.how = what, how
        msg = f"weights missing: {what}. {how}"
        if cause:
            msg += f" (last error: {cause})"
        super().__init__(msg)


def cache_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The weights cache directory (not created)."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get("DAPSEG_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "dapseg"


def hf_cache(explicit: str | os.PathLike[str] | None = None) -> Path:
    return cache_dir(explicit) / "hf"


def torch_cache(explicit: str | os.PathLike[str] | None = None) -> Path:
    return cache_dir(explicit) / "torch"


def how_to_fetch(preset: str | None) -> str:
    target = preset or "<preset>"
    return (
        f"Run `dapseg download {target}` on a machine with internet and copy the cache directory "
        f"(--cache-dir / $DAPSEG_CACHE) here, or pass a local weights file; "
        f"`--random-weights` runs without any weights (smoke mode)."
    )


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A state dict from a local checkpoint, loaded safely.

    safetensors, or ``torch.load(weights_only=True)``; a TorchScript archive (the format of the
    OpenAI CLIP release files) is opened with ``torch.jit.load`` only to read its tensors. Common
    wrappers (``state_dict``, ``model``, ``module.`` prefixes) are unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(path), device="cpu")
        elif _is_torchscript(path):
            obj = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            with warnings.catch_warnings():  # e.g. "pickle protocol 4": the error below says what matters
                warnings.simplefilter("ignore")
                obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused a Python object: never executed
        refused = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line), "")
        why = f" ({refused})" if refused else ""
        raise ValueError(
            f"refusing weights file {path}: it holds Python objects besides tensors, and loading them could run "
            f"code from the file; only plain state dicts (or safetensors) are read{why}"
        ) from e
    except Exception as e:  # the message must name the file whatever the library raised
        detail = " ".join(str(e).split())[:300]
        raise ValueError(f"cannot read weights file {path} (truncated, corrupt or not a weights file): {detail}") from e
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"weights file {path} holds no state dict")
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _is_torchscript(path: Path) -> bool:
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(name.endswith("constants.pkl") for name in z.namelist())


def is_offline(host: str = "huggingface.co") -> bool:
    """True when downloads cannot work: HF_HUB_OFFLINE is set, or ``host`` does not resolve / connect.

    Checked before any download so that a machine without internet fails in about a second instead
    of waiting out the hub client's retries.
    """
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return True
    try:
        with socket.create_connection((host, 443), timeout=3):
            return False
    except OSError:
        return True


def cached_hf_file(repo_id: str, filenames: list[str], explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The first of ``filenames`` of hub repo ``repo_id`` already in the cache, else None."""
    from huggingface_hub import try_to_load_from_cache

    for name in filenames:
        hit = try_to_load_from_cache(repo_id, name, cache_dir=str(hf_cache(explicit)))
        if isinstance(hit, str):
            return Path(hit)
    return None
