"""What produced a result: library versions, machine, device and dtype."""

from __future__ import annotations

import datetime as _dt
import platform
from importlib import metadata
from typing import Any

import torch


def _version(dist_name: str) -> str | None:
    try:
        return metadata.version(dist_name)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    import dapseg

    return {
        "dapseg": dapseg.__version__,
        "torch": torch.__version__,
        "open_clip": _version("open_clip_torch") or _version("open-clip-torch"),
        "timm": _version("timm"),
        "segment_anything": _version("segment_anything") or _version("segment-anything"),
        "python": platform.python_version(),
    }


def machine(device: str | torch.device | None = None,
            dtype: str | torch.dtype | None = None) -> dict[str, Any]:
    dev = str(device) if device is not None else "cpu"
    info: dict[str, Any] = {
        "device": dev,
        "dtype": str(dtype).replace("torch.", "") if dtype is not None else "float32",
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "hostname": platform.node(),
        "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if dev.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(dev))
        info["cuda"] = torch.version.cuda
    return info


def provenance(device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
               world_size: int = 1) -> dict[str, Any]:
    return {"versions": versions(), "machine": machine(device, dtype), "world_size": world_size}
