"""The machine's matmul rate: square fp32 (or the device's compute dtype) products, timed.

The figure every preset is compared against: what this device reaches on large, well-shaped
matmuls with the same torch and thread settings as the run itself.
"""

from __future__ import annotations

import statistics
import time

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock times cover it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def matmul_rate(
    device: str | torch.device = "cpu",
    *,
    size: int = 1024,
    repeats: int = 5,
    dtype: torch.dtype = torch.float32,
) -> dict[str, float]:
    """GFLOP/s of (size × size) @ (size × size) products: {"gflops_per_s" (median), "min", "max", "size"}.

    One warm-up product, then ``repeats`` timed rounds of a few products each (2·size³ FLOPs each).
    """
    if size < 1 or repeats < 1:
        raise ValueError(f"matmul probe: size and repeats must be >= 1, got {size}, {repeats}")
    dev = torch.device(device)
    a = torch.randn(size, size, device=dev, dtype=dtype)
    b = torch.randn(size, size, device=dev, dtype=dtype)
    out = torch.empty(size, size, device=dev, dtype=dtype)
    torch.mm(a, b, out=out)
    synchronize(dev)
    per_round = 4 if dev.type == "cpu" else 50
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(per_round):
            torch.mm(a, b, out=out)
        synchronize(dev)
        dt = time.perf_counter() - t0
        rates.append(2.0 * size**3 * per_round / dt / 1e9)
    return {"gflops_per_s": statistics.median(rates), "min": min(rates), "max": max(rates), "size": float(size)}
