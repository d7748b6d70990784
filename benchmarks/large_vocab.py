"""Where the time goes with a large class list (issue 24: 2000 names did not finish in 120 s).

Tiny random-weight `naclip` (the setting of the report), N classes (default 2000), the preset's 80
ImageNet templates, one small image. Times, in this one process:

- the first class-list encoding, split into tokenizing the N × 80 prompts (open_clip's tokenizer)
  and the text tower;
- per image: looking up the class list's embeddings again (every image does), the prediction (the
  sliding windows accumulate (N, H, W) logits at the processing size), and each `--save` writer;
- the overlay's legend as it was (a row per class: N rows) and as it is (the classes present).

    PYTHONPATH=src python benchmarks/large_vocab.py                 # 2000 classes
    PYTHONPATH=src python benchmarks/large_vocab.py --classes 500 --templates simple_imagenet
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dapseg import viz
from dapseg.api import Segmenter
from dapseg.labeling.inputs import Input
from dapseg.labeling.outputs import SUFFIXES, write_outputs
from dapseg.text import ClassSet, get_templates


def timed(fn, repeats: int = 1) -> tuple[float, object]:
    best, value = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t0)
    return best, value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=2000)
    ap.add_argument("--templates", default="openai_imagenet")
    ap.add_argument("--size", type=int, default=32, help="image side (the preset resizes its short side to 336)")
    ap.add_argument("--repeats", type=int, default=2, help="per-image stages: best of this many")
    args = ap.parse_args()
    seg = Segmenter.from_preset("naclip", random_weights=True, tiny=True, overrides={"templates": args.templates})
    classes = ClassSet.from_list([f"class name number {i}" for i in range(args.classes)])
    image = np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    prompts = [t(q) for q in classes.queries for t in get_templates(args.templates)]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    print(f"{args.classes} classes x {len(get_templates(args.templates))} templates = {len(prompts)} prompts; "
          f"image {args.size}x{args.size}")

    if args.templates != "openai_imagenet":  # fewer templates: prompts per encoder call, as before and now
        from dapseg.text import TextEmbedder

        calls = {}
        for label, per_call in (("64 queries per call (before)", 64), ("5120 prompts per call (now)", None)):
            embedder = TextEmbedder(seg._encode_text, "bench", args.templates, cache_root=None,
                                    queries_per_call=per_call)
            calls[label], _ = timed(lambda embedder=embedder: embedder(classes))
        print("encoding, " + ", ".join(f"{k}: {v:.1f} s" for k, v in calls.items()))
    tokenize, _ = timed(lambda: seg.clip.tokenizer(prompts))
    encode, _ = timed(lambda: seg.text_embeddings(classes))
    print(f"first encoding of the class list: {encode:.1f} s, of which tokenizing {tokenize:.1f} s "
          f"({100 * tokenize / encode:.0f} %), the text tower the rest")
    lookup, _ = timed(lambda: seg.text_embeddings(classes), args.repeats)
    lookup_each = seg.text.embed_queries  # what every image paid before: a lookup per query
    per_query, _ = timed(lambda: torch.stack(lookup_each(classes.queries)), args.repeats)
    print(f"per image, the class list's embeddings again: {1e3 * lookup:.1f} ms (query by query, as before: "
          f"{1e3 * per_query:.1f} ms)")
    predict, result = timed(lambda: seg.predict(image, classes), args.repeats)
    print(f"per image, predict: {predict:.2f} s")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in SUFFIXES:
            try:
                t, _ = timed(lambda kind=kind: write_outputs(result, Path(tmp), Input(Path("x.png"), "x.png"),
                                                             (kind,), {}), args.repeats)
            except ImportError as e:
                print(f"  write {kind}: skipped ({e})")
                continue
            print(f"  write {kind}: {t:.2f} s")
    labels = result.labels.numpy()
    shares = list(np.bincount(labels.ravel(), minlength=args.classes) / labels.size)
    now, panel = timed(lambda: viz.legend(result.classes, shares), args.repeats)
    rows, viz.LEGEND_ROWS = viz.LEGEND_ROWS, 10**9  # as before: a row per class
    try:
        before, old_panel = timed(lambda: viz.legend(result.classes, shares), args.repeats)
    finally:
        viz.LEGEND_ROWS = rows
    print(f"legend: every class {before:.2f} s ({old_panel.height} px tall), the classes present "
          f"{now:.3f} s ({panel.height} px tall)")


if __name__ == "__main__":
    main()
