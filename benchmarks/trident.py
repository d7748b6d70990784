"""Trident benchmark: memory and time of splice + SAM global aggregation, chunked vs unchunked.

Random weights, full-size models. Each measurement runs in a fresh subprocess so that peak memory
(Linux VmHWM, reset after the models are built) belongs to that measurement alone.

    PYTHONPATH=src python benchmarks/trident.py               # 1024x2048 chunked/unchunked + 448x448 speed
    PYTHONPATH=src python benchmarks/trident.py --quick       # smaller image (512x1024), 1 speed repeat

Prints the machine, the figures and the ratios measured side by side in this one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")


def child(args: argparse.Namespace) -> None:
    """One measurement, printed as a JSON line."""
    import numpy as np
    import torch

    from dapseg.api import Segmenter
    from dapseg.text import ClassSet

    torch.set_num_threads(os.cpu_count() or 1)
    overrides = {"inference.short_side": None}
    if args.chunk:
        overrides["inference.params.chunk"] = args.chunk
    if args.direct:
        seg = direct_segmenter(args.preset, overrides, args.device)
    else:
        seg = Segmenter.from_preset(args.preset, random_weights=True, device=args.device, overrides=overrides)
    h, w = args.size
    image = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    classes = ClassSet.parse("road, car, person, building, sky, tree")
    seg.text_embeddings(classes)  # text encoding is not what we measure
    cuda = seg.device.type == "cuda"
    if args.warmup:
        seg.coarse_logits(image, classes)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_peak()
    base = _status_kib("VmRSS")
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        seg.coarse_logits(image, classes)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**30
        kind = "cuda max_memory_allocated"
    else:
        peak = (_status_kib("VmHWM") - base) / 2**20
        kind = "CPU RSS above the loaded models (VmHWM - VmRSS)"
    print(json.dumps({"preset": args.preset, "size": [h, w], "chunk": args.chunk, "seconds": min(times),
                      "peak_gib": peak, "peak_kind": kind}))


def direct_segmenter(preset: str, overrides: dict, device: str | None):
    """Without the VFM registry: the preset with a NACLIP head (no VFM) and SAM ViT-B built directly
    from segment-anything (random), handed to the segmenter as a prebuilt model, so the splice + SAM
    path can still be measured."""
    import torch
    from segment_anything import sam_model_registry

    from dapseg.api import PrebuiltModels, Segmenter
    from dapseg.config import load_preset

    base = load_preset(preset, overrides)
    cfg = base.with_overrides({"vfm": None, "sam": None, "head.name": "naclip", "head.params": {"sigma": 5.0},
                               "refine.name": "none"})
    sam = sam_model_registry["vit_b"](checkpoint=None).eval().requires_grad_(False)
    seg = Segmenter(cfg, random_weights=True, device=device, models=PrebuiltModels(sam=sam))
    sam.to(seg.device)  # the preset's splice affinity, this SAM
    torch.manual_seed(0)
    return seg


def run_child(preset: str, size: tuple[int, int], chunk: int | None, repeat: int, warmup: bool,
              device: str | None, direct: bool = False) -> dict | None:
    cmd = [sys.executable, __file__, "--child", "--preset", preset, "--size", str(size[0]), str(size[1]),
           "--repeat", str(repeat)]
    if direct:
        cmd.append("--direct")
    if chunk:
        cmd += ["--chunk", str(chunk)]
    if warmup:
        cmd.append("--warmup")
    if device:
        cmd += ["--device", device]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        print(f"  {preset} {size} chunk={chunk}: FAILED\n{out.stderr[-2000:]}")
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def unchunked_fits(size: tuple[int, int], device: str | None) -> tuple[bool, str]:
    """Whether all attention rows at once (heads · N · G floats, three live copies) fit in memory."""
    import torch

    from dapseg.models.sam.memory import available_bytes

    g = 64 * 64
    need = 3 * 12 * g * g * 4 * 2  # encoder attention (G rows) and affinity rows (≤ G), fp32
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    have = available_bytes(dev) or 0
    return need < 0.8 * have, f"needs ~{need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB free on {dev}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--preset", default="trident")
    ap.add_argument("--size", type=int, nargs=2, default=None)
    ap.add_argument("--chunk", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--warmup", action="store_true")
    ap.add_argument("--device", default=None)
    ap.add_argument("--direct", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="512x1024 instead of 1024x2048, 1 speed repeat")
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}, device {args.device or 'auto'}")
    big = (512, 1024) if args.quick else (1024, 2048)
    print(f"\n1) trident splice + SAM global aggregation on a {big[0]}x{big[1]} image (random weights, "
          f"short side kept, windows 336 / stride 224)")
    try:
        import dapseg.models.vfm  # noqa: F401
        direct = False
    except ImportError:
        direct = True
        print("  (no VFM registry in this checkout: NACLIP head in the windows instead of DINO proxy "
              "attention, SAM ViT-B built directly; the splice and SAM stages are the same)")
    chunked = run_child("trident", big, 512, 1, False, args.device, direct)
    fits, why = unchunked_fits(big, args.device)
    unchunked = run_child("trident", big, 64 * 64, 1, False, args.device, direct) if fits else None
    for name, r in (("chunked (512 rows)", chunked), ("unchunked (all 4096 rows)", unchunked)):
        if r:
            print(f"  {name:28s} {r['seconds']:8.1f} s   peak {r['peak_gib']:.2f} GiB ({r['peak_kind']})")
        elif name.startswith("unchunked") and not fits:
            print(f"  {name:28s} skipped: {why}")
    if chunked and unchunked:
        print(f"  unchunked / chunked: time x{unchunked['seconds'] / chunked['seconds']:.2f}, "
              f"peak memory x{unchunked['peak_gib'] / max(chunked['peak_gib'], 1e-9):.2f}")

    repeat = 1 if args.quick else 3
    print(f"\n2) images/s on a 448x448 image (best of {repeat}, after one warm-up)")
    speeds = {}
    if direct:
        print("  skipped: proxyclip and trident need the VFM registry (DINO), absent in this checkout")
        return
    for preset in ("proxyclip", "trident"):
        r = run_child(preset, (448, 448), None, repeat, True, args.device)
        if r:
            speeds[preset] = 1.0 / r["seconds"]
            print(f"  {preset:10s} {speeds[preset]:8.3f} images/s   ({r['seconds']:.2f} s/image)")
    if len(speeds) == 2:
        print(f"  trident / proxyclip speed: x{speeds['trident'] / speeds['proxyclip']:.2f}")


if __name__ == "__main__":
    main()
