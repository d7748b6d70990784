"""Precision: float32 against bf16 with the weights held in bf16 (now) and bf16 autocast over float32
weights (before), end to end per preset, side by side in one process.

Three segmenters per preset on the same weights (random; speed does not depend on them):

- ``fp32``: ``inference.precision=fp32``;
- ``bf16 held``: ``inference.precision=bf16``: CLIP, the VFM and SAM's encoder hold bf16 weights
  (``dapseg.precision.hold_weights``) and run under bf16 autocast;
- ``bf16 autocast``: the float32 models run under bf16 autocast, as before the weights were held:
  autocast converts every weight in every call (the old way, rebuilt here for the comparison).

They run round robin, repeat by repeat, so a shared machine's load drift hits all three alike. Also
printed: the matmul rate of each dtype (is this a CPU/GPU with bf16 units?), labels equal to fp32,
max |Δlogit|, and how many parameter conversions to bf16 one image costs each way (counted in one
extra untimed prediction).

The issue's target: on a machine where a bf16 matmul is about 2x float32, ``bf16 held`` at least
1.3x faster than ``fp32`` for naclip and proxyclip. On a CPU without bf16 units (e.g. AMD Zen 3,
bf16 matmuls ~470x slower than float32) bf16 cannot pay and the full-size run takes hours: there,
``--tiny`` checks the script and counts the conversions only.

    PYTHONPATH=src python benchmarks/precision.py                          # naclip, proxyclip; full size
    PYTHONPATH=src python benchmarks/precision.py --device cuda --dtype fp16
    PYTHONPATH=src python benchmarks/precision.py --tiny --repeats 1       # smoke run, tiny models
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dapseg.api import Segmenter
from dapseg.bench.probe import matmul_rate, synchronize
from dapseg.bench.runner import machine_info
from dapseg.config import parse_override
from dapseg.precision import inference_dtype

CLASSES = ["cat", "wall", "floor", "blanket", "sofa", "plant", "window", "door"]
TINY = {"inference.short_side": 112, "inference.crop": 96, "inference.stride": 64}


class ConversionCount(TorchDispatchMode):
    """Counts conversions (``aten._to_copy``) of the given parameters' storage to ``dtype``, and their elements."""

    def __init__(self, params: list[torch.Tensor], dtype: torch.dtype) -> None:
        super().__init__()
        self.storage = {p.untyped_storage().data_ptr() for p in params}
        self.dtype = dtype
        self.count = self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == self.dtype
                and args[0].untyped_storage().data_ptr() in self.storage):
            self.count += 1
            self.elements += args[0].numel()
        return func(*args, **kwargs)


class AutocastOverFloat32:
    """The old way: ``seg`` (float32 models) with its engine's autocast at ``precision``."""

    def __init__(self, seg: Segmenter, precision: str) -> None:
        self.seg = seg
        seg.engine.precision = precision  # the engine (CLIP, VFM, head, SAM, refiner) under autocast

    def predict(self, image: np.ndarray, classes: list[str]) -> Any:
        return self.seg.predict(image, classes)


def model_params(seg: Segmenter) -> list[torch.Tensor]:
    return [p for m in (seg.clip, seg.vfm, seg.sam) if m is not None for p in m.parameters()]


def timed(runner: Any, image: np.ndarray, device: torch.device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    runner.predict(image, CLASSES)
    synchronize(device)
    return time.perf_counter() - t0


def bench_preset(preset: str, image: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    overrides = {**(TINY if args.tiny else {}), **dict(parse_override(o) for o in args.set),
                 "inference.precision": "fp32"}
    fp32 = Segmenter.from_preset(preset, device=args.device, random_weights=True, tiny=args.tiny, overrides=overrides)
    held = fp32.derive({"inference.precision": args.dtype})  # converted copies of the same weights
    old = AutocastOverFloat32(fp32.derive({}), args.dtype)  # its own engine around the same float32 models
    dtype = inference_dtype(fp32.device, args.dtype)
    runners = {"fp32": fp32, f"{args.dtype} held": held, f"{args.dtype} autocast": old}
    results = {name: r.predict(image, CLASSES) for name, r in runners.items()}  # warm-up: text cached
    conversions = {}
    for name, r in runners.items():
        seg = r.seg if isinstance(r, AutocastOverFloat32) else r
        with ConversionCount(model_params(seg), dtype) as count:
            r.predict(image, CLASSES)
        conversions[name] = {"count": count.count, "elements": count.elements}
    # what the old way pays each time autocast is entered (per batch of windows, per model): converting
    # the float32 weights it uses, here all of them once
    params = [p for p in model_params(fp32) if p.is_floating_point()]
    synchronize(fp32.device)
    t0 = time.perf_counter()
    for p in params:
        p.to(dtype)
    synchronize(fp32.device)
    convert_s = time.perf_counter() - t0
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.repeats):
        for name, r in runners.items():
            times[name].append(timed(r, image, fp32.device))
    base = results["fp32"]
    row: dict[str, Any] = {"preset": preset, "params": sum(p.numel() for p in params), "ways": {},
                           "convert_all_weights_s": convert_s}
    for name in runners:
        res = results[name]
        median = statistics.median(times[name])
        row["ways"][name] = {
            "seconds": times[name], "median_s": median,
            "speed_vs_fp32": statistics.median(times["fp32"]) / median,
            "labels_equal": float((res.labels == base.labels).float().mean()),
            "max_abs_logit": float((res.logits - base.logits).abs().max()),
            "conversions_per_image": conversions[name],
        }
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", dest="presets", action="append", default=[], help="default: naclip, proxyclip")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"], help="the low precision (default bf16)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tiny", action="store_true", help="tiny models and small windows (smoke run)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--probe-size", type=int, default=2048, help="matrix side of the matmul-rate probes")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every preset")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from skimage import data

    image = np.ascontiguousarray(data.chelsea()[::4, ::4] if args.tiny else data.chelsea())
    device = torch.device(args.device)
    low = inference_dtype(device, args.dtype)
    size = 256 if args.tiny else args.probe_size
    probes = {str(d).removeprefix("torch."): matmul_rate(device, size=size, repeats=1, dtype=d)["gflops_per_s"]
              for d in (torch.float32, low)}
    report = {"machine": machine_info(device), "matmul_gflops_per_s": probes, "probe_size": size,
              "image": list(image.shape[:2]), "tiny": args.tiny, "presets": []}
    m = report["machine"]
    print(f"machine: {m.get('gpu') or m['cpu']} ({m['device']}, {m['torch_threads']} threads), torch {m['torch']}")
    print("matmul " + ", ".join(f"{k} {v:.1f}" for k, v in probes.items()) + f" GFLOP/s ({size}²)")
    print(f"{'preset':<12} {'way':<16} {'s/img':>9} {'x fp32':>7} {'labels =':>9} {'max|Δ|':>9} "
          f"{'param conversions/img':>22}")
    for preset in args.presets or ["naclip", "proxyclip"]:
        row = bench_preset(preset, image, args)
        report["presets"].append(row)
        for name, w in row["ways"].items():
            c = w["conversions_per_image"]
            print(f"{preset:<12} {name:<16} {w['median_s']:>9.3f} {w['speed_vs_fp32']:>7.2f} "
                  f"{100 * w['labels_equal']:>8.2f}% {w['max_abs_logit']:>9.2e} "
                  f"{c['count']:>8} ({c['elements'] / 1e6:.1f}M el.)", flush=True)
        print(f"{preset:<12} converting its {row['params'] / 1e6:.1f}M float32 weights to {args.dtype} once: "
              f"{row['convert_all_weights_s']:.3f} s (the old way, per autocast entry)", flush=True)
    if args.json:
        from dapseg.files import atomic_write_text

        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
