"""Cost of `dapseg analyze`'s pair counting vs the model forwards it scores, side by side in one run.

One 336x336 window, full-size random-weight models (fp32, CPU): CLIP ViT-B/16 (21x21 grid, its four
last-block affinities) and DINO ViT-B/8 (42x42 grid, 1764 patches, 3.1 M ordered pairs). Reported:
the median time of the forwards (CLIP's tokens and q/k/v; DINO's features) and of the counting (the
labels of both grids and every pair scored and binned), and the largest score block held at once.

    python benchmarks/analyze_pairs.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dapseg.analysis import run as run_mod
from dapseg.analysis.histogram import PairHistogram
from dapseg.analysis.labels import patch_labels
from dapseg.analysis.sources import ClipAttention, VfmCosine
from dapseg.config import ClipConfig, VfmConfig
from dapseg.models.clip import build_clip
from dapseg.models.vfm import build_vfm


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    sources = [ClipAttention(build_clip(ClipConfig(), random_weights=True)),
               VfmCosine(build_vfm(VfmConfig(name="dino_vitb8"), random_weights=True, window_size=336))]
    window = torch.rand(1, 3, 336, 336)
    label = (torch.arange(336)[:, None] // 48 + torch.arange(336)[None, :] // 48) % 5  # blocks of 5 classes
    label[:, :10] = 255
    affinities = [a for s in sources for a in s(window)]

    def forwards() -> None:
        for s in sources:
            s(window)

    def counting() -> None:
        for a in affinities:
            count = run_mod.count_pairs(PairHistogram.empty(1000), a, patch_labels(label, a.grid, a.cell, 5, 255))
            assert count > 0

    counting()  # warm-up
    t_fwd, t_cnt = median_time(forwards, args.repeats), median_time(counting, args.repeats)
    pairs = sum(int((patch_labels(label, a.grid, a.cell, 5, 255) >= 0).sum()) ** 2 for a in affinities)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"forwards (CLIP ViT-B/16 q/k/v + DINO ViT-B/8 features): {t_fwd:.2f} s")
    print(f"pair counting ({pairs / 1e6:.1f} M pairs over 5 affinities, 1000 bins): {t_cnt:.2f} s "
          f"= {t_cnt / t_fwd:.2f} x the forwards")
    print(f"largest score block: {run_mod.PAIRS_PER_BLOCK * 4 / 2**20:.0f} MiB (float32), whatever the grid")


if __name__ == "__main__":
    main()
