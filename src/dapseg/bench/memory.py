"""Peak memory of a run: CUDA's allocator statistics, or the kernel's RSS high-water mark (Linux)."""

from __future__ import annotations

import resource
from pathlib import Path

import torch


def _proc_status_mib(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        return None
    return None


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak: CUDA's allocator stats, or the kernel's RSS high-water mark (Linux).

    Returns False where the peak cannot be reset (then it covers the whole process so far).
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def peak_memory_mib(device: torch.device) -> float:
    """Peak since ``reset_peak_memory``: max_memory_allocated on CUDA, peak RSS (VmHWM) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    hwm = _proc_status_mib("VmHWM")
    if hwm is not None:
        return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def peak_memory_kind(device: torch.device, reset_ok: bool) -> str:
    """What ``peak_memory_mib`` measured, for the report."""
    kind = "max_memory_allocated" if device.type == "cuda" else "peak RSS"
    return kind + ("" if reset_ok else " (whole process, incl. build)")
