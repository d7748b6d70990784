"""GPU check: reduced precision against fp32 on every main preset, then the bench at the papers' settings.

Part 1, agreement: each main preset (every preset that does not name a backbone variant) segments three
``skimage.data`` photos in fp32 and at the reduced precision (``inference.precision``; ``auto`` on CUDA
is bf16, or fp16 without bf16), with the same models; prints max |Δlogit| and the share of equal labels.

Part 2, speed: ``dapseg bench`` (the same runner) at the settings of two papers' efficiency tables,
with the per-stage table and peak memory:

- Trident, Table 8: 448 × 448 input, fp16, CLIP ViT-B/16 alone, + DINO, + SAM, + refinement
  (the paper: 118.8, 68.5, 15.3 and 10.0 images/s on an RTX 4090);
- ProxyCLIP, Table 5: 336 × 336 input, fp16, batch 1 (one window per forward).

On a CUDA machine with the weights cached:

    PYTHONPATH=src python benchmarks/gpu_check.py                      # real weights
    PYTHONPATH=src python benchmarks/gpu_check.py --random-weights     # no weights needed (speed is the same)

On a CPU, with tiny random models (the test suite runs this so the script never rots):

    PYTHONPATH=src python benchmarks/gpu_check.py --device cpu --tiny

``--json PATH`` also writes everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

THRESHOLDS = {"max_abs_logit": 2e-2, "label_agreement": 0.996}  # what CPU bf16 keeps on tiny models
BACKBONE_VARIANTS = ("dino_", "dinov2_", "dinov3_", "mae_", "sam_vit", "-h14", "sd15")
CLASSES = ["cat", "wall", "floor", "person", "sky", "grass", "table", "cup"]
# Small windows for --tiny (seconds on a CPU); real runs keep each preset's own settings.
TINY_OVERRIDES = {"inference.short_side": 112, "inference.crop": 96, "inference.stride": 64}
TINY_SPLICE_OVERRIDES = {"inference.short_side": 112}

# (row label, preset, overrides) at the Trident Table 8 setting: 448 x 448, fp16
TRIDENT_TABLE8 = (
    ("CLIP-B/16 alone", "trident", {"vfm": None, "sam": None, "head": {"name": "vanilla", "params": {}},
                                    "inference.params.kind": "none"}),
    ("+DINO", "trident", {"sam": None, "inference.params.kind": "none"}),
    ("+SAM", "trident", {}),
    ("+refinement", "trident-refine", {}),
)
TRIDENT_PAPER_IMG_S = {"CLIP-B/16 alone": 118.8, "+DINO": 68.5, "+SAM": 15.3, "+refinement": 10.0}
# (row label, preset, overrides) at the ProxyCLIP Table 5 setting: 336 x 336, fp16, batch 1
PROXYCLIP_TABLE5 = (
    ("ProxyCLIP (DINO B/8)", "proxyclip", {}),
    ("ProxyCLIP (DINO B/16)", "proxyclip-dino_vitb16", {}),
    ("NACLIP", "naclip", {}),
    ("DAP", "dap", {}),
)


def main_presets() -> list[str]:
    from dapseg.config import list_presets

    return [p for p in list_presets() if not any(v in p for v in BACKBONE_VARIANTS)]


def photos(side: int | None) -> list[np.ndarray]:
    from skimage import data

    images = [data.chelsea(), data.coffee(), data.astronaut()]
    if side is None:
        return images
    from PIL import Image

    return [np.asarray(Image.fromarray(im).resize((side * im.shape[1] // im.shape[0], side))) for im in images]


def tiny_overrides(preset: str) -> dict[str, Any]:
    from dapseg.config import load_preset

    return TINY_SPLICE_OVERRIDES if load_preset(preset).inference.mode == "splice" else TINY_OVERRIDES


def agreement(presets: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    """fp32 vs ``args.precision`` per preset: max |Δlogit| and label agreement over the photos."""
    import torch

    from dapseg.api import Segmenter
    from dapseg.precision import inference_dtype

    images = photos(64 if args.tiny else None)
    rows = []
    for preset in presets:
        t0 = time.perf_counter()
        overrides = {**(tiny_overrides(preset) if args.tiny else {}), "inference.precision": "fp32"}
        fp32 = Segmenter.from_preset(preset, device=args.device, random_weights=args.random_weights,
                                     tiny=args.tiny, cache_dir=args.cache_dir, overrides=overrides)
        low = fp32.derive({"inference.precision": args.precision})  # the same weights, held in the low dtype
        dtype = inference_dtype(fp32.device, args.precision)
        worst, equal, total = 0.0, 0, 0
        for img in images:
            a, b = fp32.predict(img, CLASSES), low.predict(img, CLASSES)
            worst = max(worst, float((a.logits - b.logits).abs().max()))
            equal += int((a.labels == b.labels).sum())
            total += a.labels.numel()
            if not torch.isfinite(b.logits).all():
                worst = float("inf")
        rows.append({
            "preset": preset, "dtype": str(dtype).removeprefix("torch.") if dtype else "float32",
            "max_abs_logit": worst, "label_agreement": equal / total, "seconds": time.perf_counter() - t0,
        })
        print(format_agreement_row(rows[-1]), flush=True)
    return rows


def format_agreement_row(r: dict[str, Any]) -> str:
    ok = r["max_abs_logit"] <= THRESHOLDS["max_abs_logit"] and r["label_agreement"] >= THRESHOLDS["label_agreement"]
    return (f"{r['preset']:<24} {r['dtype']:>9} {r['max_abs_logit']:>12.2e} {100 * r['label_agreement']:>9.2f}% "
            f"{r['seconds']:>7.1f}s  {'ok' if ok else 'OUTSIDE the CPU-bf16 bounds'}")


def paper_bench(table: tuple, side: int, extra: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """``dapseg bench`` rows for ``table`` on a side x side photo, each row under its own overrides."""
    from PIL import Image
    from skimage import data

    from dapseg.bench.runner import BenchSettings, run_bench

    image = np.asarray(Image.fromarray(data.chelsea()).resize((side, side)))
    rows, report = [], None
    for label, preset, overrides in table:
        settings = BenchSettings(
            device=args.device, random_weights=args.random_weights, tiny=args.tiny, warmup=args.warmup,
            repeats=args.repeats, compare_batching=False, count_flops=not args.no_flops,
            overrides={"inference.short_side": side, "inference.precision": args.bench_precision,
                       **extra, **overrides},
            cache_dir=args.cache_dir,
        )
        report = run_bench([preset], image, CLASSES, settings, probe_size=args.probe_size)
        row = report["presets"][0]
        row["preset"] = label
        row["preset_name"] = preset
        rows.append(row)
    assert report is not None
    report["presets"] = rows
    return report


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from dapseg.bench.table import format_report

    if args.tiny:
        args.random_weights = True
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.precision is None:  # CPU autocast only happens when asked for; bf16 is what a CPU may have
        args.precision = "auto" if args.device.startswith("cuda") else "bf16"
    out: dict[str, Any] = {"device": args.device, "precision": args.precision, "thresholds": THRESHOLDS}
    if args.device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    print(f"device {args.device}" + (f" ({out['gpu']})" if "gpu" in out else "") + f", torch {torch.__version__}")
    presets = args.presets or main_presets()
    print(f"\n1. agreement: fp32 vs inference.precision={args.precision} on {len(presets)} presets, 3 photos")
    print(f"{'preset':<24} {'dtype':>9} {'max|Δlogit|':>12} {'labels':>10} {'time':>8}")
    out["agreement"] = agreement(presets, args)
    side8, side5 = (64, 64) if args.tiny else (448, 336)
    print(f"\n2a. Trident Table 8 setting: {side8}x{side8}, {args.bench_precision} "
          "(paper, RTX 4090: " + ", ".join(f"{k} {v} img/s" for k, v in TRIDENT_PAPER_IMG_S.items()) + ")")
    trident = paper_bench(TRIDENT_TABLE8, side8, {}, args)
    print(format_report(trident))
    print(f"\n2b. ProxyCLIP Table 5 setting: {side5}x{side5}, {args.bench_precision}, batch 1")
    extra = {"inference.max_batch": 1, **({"inference.crop": 64, "inference.stride": 32} if args.tiny else {})}
    proxy = paper_bench(PROXYCLIP_TABLE5, side5, extra, args)
    print(format_report(proxy))
    out["trident_table8"], out["proxyclip_table5"] = trident, proxy
    if args.json:
        from dapseg.files import atomic_write_text

        atomic_write_text(args.json, json.dumps(out, indent=2) + "\n")
        print(f"\nreport written to {args.json}")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    ap.add_argument("--precision", default=None, choices=["auto", "bf16", "fp16"],
                    help="the precision compared with fp32 (default: auto on CUDA, bf16 on CPU)")
    ap.add_argument("--bench-precision", default="fp16", choices=["auto", "fp32", "bf16", "fp16"],
                    help="precision of the speed runs (default fp16, as both papers)")
    ap.add_argument("--presets", nargs="+", default=None, help="agreement presets (default: every main preset)")
    ap.add_argument("--random-weights", action="store_true", help="random weights (speed does not depend on them)")
    ap.add_argument("--tiny", action="store_true", help="tiny random models, small images (a CPU smoke run)")
    ap.add_argument("--cache-dir", default=None, help="weights cache (default: $DAPSEG_CACHE or ~/.cache/dapseg)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--no-flops", action="store_true", help="skip the FLOP-counting run")
    ap.add_argument("--probe-size", type=int, default=4096, help="matrix side of the matmul-rate probe")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    raise SystemExit(main())
