"""Cost of stitched attention (``inference.mode: stitch``) and of the ``sam_vote`` refiner.

Full-size models with random weights (speed and memory do not depend on the weights), one photo
(skimage's coffee, 400 × 600), each setting in its own fresh subprocess: build, one warm-up image,
then ``--repeats`` timed images (median reported). Peak memory is inference only: on CUDA
``torch.cuda.max_memory_allocated`` after a reset; on CPU (Linux) the RSS high-water mark reset via
``/proc/self/clear_refs`` after the warm-up, read back as VmHWM.

Settings: slide vs stitch for the naclip and proxyclip presets at their own window settings, and
naclip + ``refine.name=sam_vote`` with SAM ViT-B (automatic masks, ``points_per_side`` 32).

    python benchmarks/stitch.py [--repeats 3] [--device cpu|cuda] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("dapseg") is None:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO / "src"))

CLASSES = ["cup", "saucer", "table", "spoon", "coffee"]
SETTINGS: dict[str, tuple[str, dict[str, Any]]] = {
    "naclip slide": ("naclip", {}),
    "naclip stitch": ("naclip-stitch", {}),
    "proxyclip slide": ("proxyclip", {}),
    "proxyclip stitch": ("proxyclip-stitch", {}),
    "naclip + sam_vote": ("naclip", {"refine.name": "sam_vote", "sam": {"name": "sam_vitb"}}),
}


def run_one(name: str, device: str, repeats: int) -> dict[str, Any]:
    from skimage import data

    from dapseg import Segmenter
    from dapseg.bench.memory import peak_memory_mib, reset_peak_memory
    from dapseg.bench.probe import synchronize

    preset, overrides = SETTINGS[name]
    seg = Segmenter.from_preset(preset, random_weights=True, device=device, overrides=overrides)
    image = data.coffee()
    seg.predict(image, CLASSES)  # warm-up (text embeddings, kernels)
    synchronize(seg.device)
    reset_peak_memory(seg.device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        seg.predict(image, CLASSES)
        synchronize(seg.device)
        times.append(time.perf_counter() - start)
    inf = seg.config.inference
    return {"setting": name, "mode": inf.mode, "crop": inf.crop, "stride": inf.stride, "short_side": inf.short_side,
            "s_per_image": statistics.median(times), "peak_MiB": peak_memory_mib(seg.device)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", nargs="*", choices=list(SETTINGS), help="run only these settings")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one setting in this process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.device, args.repeats)))
        return
    import torch

    where = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"# {where}, {os.cpu_count()} CPUs, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("| setting | mode | window / stride | s / image | peak MiB |")
    print("|---|---|---|---|---|")
    for name in args.only or SETTINGS:
        proc = subprocess.run([sys.executable, __file__, "--one", name, "--device", args.device,
                               "--repeats", str(args.repeats)], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"| {name} | failed: {proc.stderr.strip().splitlines()[-1]} | | | |")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"| {name} | {r['mode']} | {r['crop']} / {r['stride']} | {r['s_per_image']:.2f} | {r['peak_MiB']:.0f} |")


if __name__ == "__main__":
    main()
