"""`--threads`: images/s of one process at torch's default thread count vs at N threads (default 1),
side by side in one run, on whatever else the machine is doing (the load average is printed).

Full-size CLIP ViT-B/16 (random weights), ``naclip``, short side 224 (one window), one prompt per
class; the same images in alternating rounds (default, N, default, N, ...) so a change of load hits
both; the labels of both settings are compared.

    python benchmarks/threads.py [--images 6] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dapseg.api import Segmenter

CLASSES = "person, sky, grass, road, car, building, tree, water, dog, cat"


def images(n: int) -> list[np.ndarray]:
    from skimage import data

    base = data.astronaut()  # 512 x 512
    return [np.ascontiguousarray(np.roll(base, 7 * i, axis=1)) for i in range(n)]


def seconds_per_image(seg: Segmenter, photos: list[np.ndarray], threads: int) -> tuple[float, list[torch.Tensor]]:
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    labels = [seg.predict(p, CLASSES).labels for p in photos]
    return (time.perf_counter() - t0) / len(photos), labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    default = torch.get_num_threads()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"default threads {default}, load average before {os.getloadavg()}")
    seg = Segmenter.from_preset("naclip", random_weights=True, device="cpu",
                                overrides={"inference.short_side": 224, "templates": "none"})
    photos = images(args.images)
    seg.predict(photos[0], CLASSES)  # warm-up: text embeddings, allocator
    times: dict[int, list[float]] = {default: [], args.threads: []}
    outputs: dict[int, list[torch.Tensor]] = {}
    for _ in range(args.rounds):
        for threads in (default, args.threads):
            s, outputs[threads] = seconds_per_image(seg, photos, threads)
            times[threads].append(s)
    torch.set_num_threads(default)
    diff = sum(int((a != b).sum()) for a, b in zip(outputs[default], outputs[args.threads], strict=True))
    total = sum(t.numel() for t in outputs[default])
    for threads, ts in times.items():
        print(f"threads {threads:2d}: {statistics.median(ts):.3f} s/image median of {args.rounds} rounds "
              f"({', '.join(f'{t:.3f}' for t in ts)})")
    ratio = statistics.median(times[default]) / statistics.median(times[args.threads])
    print(f"default / {args.threads} thread(s): {ratio:.2f}x the time per image; labels differ on {diff} of "
          f"{total} pixels; load average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
