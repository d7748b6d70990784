"""Labeling a collection (`dapseg segment`), measured side by side in one run:

1. images/s of 1 vs 2 processes (torchrun, gloo on CPU), timing the labeling loop only (process
   start-up and model building left out). Full-size CLIP ViT-B/16 (random weights), ``naclip``,
   short side 224 (one window per image), one prompt per class.
2. decode overlap: how long the model waits for the next image (idle) with decoding in the loop,
   in a background thread (``--workers 0``) and in 1 or 2 DataLoader worker processes, on large JPEGs.
3. the cost per image of each ``--save`` kind (write time and file size), probs and rle included.

    python benchmarks/labeling.py [--images 8] [--sections processes,overlap,outputs] [--tiny-overlap]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dapseg.api import Segmenter
from dapseg.decoding import decode_ahead
from dapseg.images import load_image
from dapseg.labeling.inputs import Input
from dapseg.labeling.outputs import SUFFIXES, write_outputs

CLASSES = "person, sky, grass, road, car, building, tree, water, dog, cat"
SRC = str(Path(__file__).resolve().parents[1] / "src")


def make_images(folder: Path, n: int, size: tuple[int, int], start: int = 0) -> None:
    """``n`` photo-like JPEGs (a real photo resized, shifted per image so that none repeats)."""
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    base = Image.fromarray(data.astronaut()).resize((size[1], size[0]))
    arr = np.asarray(base)
    for i in range(start, start + n):
        Image.fromarray(np.roll(arr, 7 * i, axis=1)).save(folder / f"{i:05d}.jpg", quality=92)


def loop_seconds(inputs: Path, out: Path, processes: int) -> float:
    """Seconds of the labeling loop of one `dapseg segment` command: from the settings record (written
    by rank 0 once every model is built, just before the ranks start) to the last journal line, so
    process start-up and model building are left out."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
    cmd = [sys.executable, *launcher, "-m", "dapseg", "segment", str(inputs), "--classes", CLASSES,
           "--out", str(out), "--preset", "naclip", "--random-weights", "--set", "inference.short_side=224",
           "--set", "templates=none",  # one prompt per class: the loop times images, not text embedding
           "--save", "labels", "--workers", "1"]
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": SRC}, capture_output=True)
    last = max(p.stat().st_mtime for p in (out / ".dapseg" / "journal").glob("rank-*.jsonl"))
    return last - (out / "labeling-job.json").stat().st_mtime


def bench_processes(tmp: Path, n: int) -> None:
    make_images(tmp / "procs", n, (224, 298))
    print(f"\n## 1 vs 2 processes ({n} images, naclip ViT-B/16, short side 224)\n")
    print("| processes | loop seconds | images/s |\n|---|---|---|")
    for procs in (1, 2):
        seconds = loop_seconds(tmp / "procs", tmp / f"out-{procs}", procs)
        print(f"| {procs} | {seconds:.1f} | {n / seconds:.2f} |")


def bench_overlap(seg: Segmenter, tmp: Path, n: int) -> None:
    folder = tmp / "big"
    make_images(folder, n, (2000, 3000))
    paths = sorted(folder.glob("*.jpg"))
    load_image(paths[0])  # warm caches
    seg.predict(load_image(paths[0])[:400, :600], CLASSES)
    model = "tiny test model" if seg.tiny else "ViT-B/16"
    print(f"\n## decode overlap ({n} JPEGs of 3000x2000, naclip {model}, "
          f"short side {seg.config.inference.short_side})\n")
    print("| decoding | wall s | model idle s (waiting for the image) | idle share |\n|---|---|---|---|")
    modes: list[tuple[str, int | None]] = [("in the loop", None), ("thread (--workers 0)", 0),
                                           ("1 worker process", 1), ("2 worker processes", 2)]
    for label, workers in modes:
        idle = 0.0
        t0 = time.perf_counter()
        if workers is None:
            for p in paths:
                t = time.perf_counter()
                image = load_image(p)
                idle += time.perf_counter() - t
                seg.predict(image, CLASSES)
        else:
            it = decode_ahead(paths, workers=workers, ahead=2)
            while True:
                t = time.perf_counter()
                item = next(it, None)
                idle += time.perf_counter() - t
                if item is None:
                    break
                seg.predict(item.image, CLASSES)
        wall = time.perf_counter() - t0
        print(f"| {label} | {wall:.2f} | {idle:.2f} | {100 * idle / wall:.0f}% |")


def bench_outputs(seg: Segmenter, tmp: Path, sizes: list[tuple[int, int]], repeats: int) -> None:
    from skimage import data

    print("\n## cost per image of each --save kind (10 classes)\n")
    print("| image | kind | ms / image | KiB / image |\n|---|---|---|---|")
    for h, w in sizes:
        image = np.asarray(Image.fromarray(data.astronaut()).resize((w, h)))
        result = seg.predict(image, CLASSES)
        result.probs  # noqa: B018 (computed once here: timed below is the writing, as in the loop)
        item = Input(Path("x.jpg"), "x.jpg")
        for kind in SUFFIXES:
            t0 = time.perf_counter()
            for r in range(repeats):
                (written,) = write_outputs(result, tmp / f"o{r}", item, (kind,), {})
            ms = 1000 * (time.perf_counter() - t0) / repeats
            kib = (tmp / "o0" / written).stat().st_size / 1024
            print(f"| {w}x{h} | {kind} | {ms:.1f} | {kib:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--sections", default="processes,overlap,outputs")
    ap.add_argument("--tiny-overlap", action="store_true", help="decode overlap with the tiny test model")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if "processes" in sections:
            bench_processes(tmp, args.images)
        if not sections & {"overlap", "outputs"}:
            return
        seg = Segmenter.from_preset("naclip", random_weights=True, device="cpu",
                                    overrides={"inference.short_side": 224})
        if "overlap" in sections:
            # --tiny-overlap: a tiny model stands in for a fast device, where decoding matters most
            fast = Segmenter.from_preset("naclip", random_weights=True, tiny=True, device="cpu") \
                if args.tiny_overlap else seg
            bench_overlap(fast, tmp, args.images)
        if "outputs" in sections:
            bench_outputs(seg, tmp, [(480, 640), (1080, 1920)], repeats=3)


if __name__ == "__main__":
    main()
