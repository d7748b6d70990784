"""SLIC regions: the torch SLIC against scikit-image's, alone and inside `dapseg bench --preset dap`.

1. Three 336 × 336 windows (photos), 64 superpixels, compactness 10 (DAP's defaults): torch
   ``slic_labels`` vs ``slic_skimage``, alternating repeat by repeat; wall and CPU seconds.
2. ``bench --preset dap`` (random weights, chelsea) with ``head.params.regions`` = ``slic`` (torch) and
   ``slic_skimage`` (scikit-image's, what DAP ran before): the regions stage's share of the image time.

    PYTHONPATH=src python benchmarks/slic.py            # both parts
    PYTHONPATH=src python benchmarks/slic.py --no-bench # part 1 only
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
from PIL import Image
from skimage import data

from dapseg.heads.slic import slic_labels, slic_skimage


def windows(side: int = 336) -> torch.Tensor:
    photos = [data.chelsea(), data.coffee(), data.astronaut()]
    arr = np.stack([np.asarray(Image.fromarray(p).resize((side, side))) for p in photos])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255


def timed(fn) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def part1(repeats: int) -> None:
    x = windows()
    runs = {"torch": [], "skimage": []}
    slic_labels(x, 64, 10.0)  # warm-up
    for _ in range(repeats):
        runs["torch"].append(timed(lambda: slic_labels(x, 64, 10.0)))
        runs["skimage"].append(timed(lambda: slic_skimage(x, 64, 10.0)))
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in runs.items()}
    print(f"1. three 336x336 windows, 64 superpixels, median of {repeats} alternating repeats")
    for k, (w, c) in med.items():
        print(f"   {k:<8} {1000 * w:8.1f} ms wall {1000 * c:8.1f} ms CPU")
    print(f"   torch is {med['skimage'][0] / med['torch'][0]:.1f}x faster (wall), "
          f"{med['skimage'][1] / med['torch'][1]:.1f}x (CPU)")


def part2(repeats: int) -> None:
    from dapseg.bench.runner import BenchSettings, bench_preset
    from dapseg.commands.bench import load_bench_image

    image = load_bench_image(None)
    print(f"2. bench --preset dap, random weights, chelsea {image.shape[1]}x{image.shape[0]}, {repeats} repeats")
    for regions in ("slic", "slic_skimage"):
        settings = BenchSettings(random_weights=True, device="cpu", warmup=1, repeats=repeats, compare_batching=False,
                                 count_flops=False, overrides={"head.params.regions": regions})
        row = bench_preset("dap", image, ["cat", "wall", "floor", "sofa"], settings, probe_size=None)
        total = row["seconds"]["median"]
        reg = row["stages_s"].get("regions", 0.0)
        print(f"   regions={regions:<13} image {total:7.3f} s, regions {reg:7.3f} s = {100 * reg / total:5.1f} %")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bench-repeats", type=int, default=3)
    ap.add_argument("--no-bench", dest="bench", action="store_false")
    args = ap.parse_args()
    print(f"machine: {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"load {[round(v, 2) for v in os.getloadavg()]}")
    part1(args.repeats)
    if args.bench:
        part2(args.bench_repeats)


if __name__ == "__main__":
    main()
