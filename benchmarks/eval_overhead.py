"""Cost of the evaluation harness alone vs the model it wraps, measured side by side in one run.

Harness = DataLoader decode of a VOC-sized JPEG + PNG label, the short-side resize the segmenter does
(336), the label-map check and the confusion-matrix update, through ``dapseg.eval.evaluate`` with a
predictor that does no model work. Model = a full-size CLIP ViT-B/16 image tower (random weights,
fp32 on CPU) on one 224x224 window per image (the cheapest real case; slide inference on a 336x448 VOC
image runs 6 such windows, also reported).

    python benchmarks/eval_overhead.py [--images 40] [--workers 0]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dapseg.data import SegDataset
from dapseg.eval.runner import RunOptions, evaluate
from dapseg.inference.preprocess import resize_image, short_side_size, to_tensor01


def make_voc(root: Path, n: int) -> None:
    """n VOC-sized (500x375) JPEG images + palette-free PNG labels with ignore borders."""
    rng = np.random.default_rng(0)
    base = root / "VOCdevkit/VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / d).mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        h, w = (375, 500) if i % 2 else (500, 375)
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([(xx * 255 // w), (yy * 255 // h), rng.integers(0, 255, (h, w))], -1).astype(np.uint8)
        lab = ((xx // 60 + yy // 60) % 21).astype(np.uint8)
        lab[:, :3] = 255
        Image.fromarray(img).save(base / f"JPEGImages/{i:06d}.jpg", quality=90)
        Image.fromarray(lab, mode="L").save(base / f"SegmentationClass/{i:06d}.png")
        names.append(f"{i:06d}")
    (base / "ImageSets/Segmentation/val.txt").write_text("\n".join(names) + "\n")


def harness_predictor(image: np.ndarray) -> torch.Tensor:
    """The segmenter's own pre-processing, no model: resize to short side 336, labels at input size."""
    h, w = image.shape[:2]
    to_tensor01(resize_image(image, short_side_size(h, w, 336)))
    return torch.zeros(h, w, dtype=torch.long)


def time_harness(data: Path, work: Path, workers: int) -> float:
    ds = SegDataset("voc21", data)
    t0 = time.perf_counter()
    evaluate(ds, harness_predictor, work, {"bench": workers},
             RunOptions(num_workers=workers, progress=False, checkpoint_every=20))
    return (time.perf_counter() - t0) / len(ds)


def time_model(n: int, windows: int) -> float:
    import open_clip

    visual = open_clip.create_model("ViT-B-16", pretrained=None).visual.eval()
    x = torch.randn(windows, 3, 224, 224)
    with torch.no_grad():
        visual(x)  # warm-up
        t0 = time.perf_counter()
        for _ in range(n):
            visual(x)
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--model-reps", type=int, default=5)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers for the harness run")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        make_voc(Path(tmp) / "data", args.images)
        time_harness(Path(tmp) / "data", Path(tmp) / "warm", args.workers)  # page cache, imports
        harness = time_harness(Path(tmp) / "data", Path(tmp) / "w", args.workers)
    one = time_model(args.model_reps, 1)
    six = time_model(max(1, args.model_reps // 2), 6)
    print(f"harness (decode + resize + checks + confusion matrix), workers={args.workers}: "
          f"{1000 * harness:.1f} ms/img ({1 / harness:.1f} img/s)")
    print(f"ViT-B/16 forward, 1 window 224x224:  {1000 * one:.1f} ms/img  -> harness = {100 * harness / one:.1f}%")
    print(f"ViT-B/16 forward, 6 windows (slide on 336x448): {1000 * six:.1f} ms/img  -> harness = "
          f"{100 * harness / six:.1f}%")
    verdict = "OK" if harness <= 0.10 * one else "OVER BUDGET"
    print(f"budget: harness <= 10% of the cheapest model case -> {verdict}")


if __name__ == "__main__":
    main()
