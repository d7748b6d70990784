"""Text encoding of a class list: one full-context encoder call per query (before) against all uncached
queries in few calls, prompts grouped by length and cut to each batch's longest (now).

CLIP ViT-B/16's text tower with random weights (speed does not depend on them), the 80 ImageNet
templates, the 150 ADE20K classes. Both ways run in this one process on the same queries, alternating
repeat by repeat so a shared machine's load drift hits both alike; the full-context way is slow (about
an hour for ADE-847 on a 2-core CPU), so it runs on every ``--every``-th class and its time is also
given per query.

    PYTHONPATH=src python benchmarks/text_encoding.py                 # every 10th ADE class, 2 repeats
    PYTHONPATH=src python benchmarks/text_encoding.py --every 1       # all 150 both ways (slow)

Also checks that both ways give the same embeddings (max |Δ| of the unit vectors).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from importlib import resources

import open_clip
import torch

from dapseg.models.clip import DenseClip
from dapseg.text import ClassSet, TextEmbedder, get_templates


def full_context_embeddings(clip: DenseClip, queries: list[str]) -> torch.Tensor:
    """Before: per query, open_clip's encode_text on its 80 prompts at the 77-token context."""
    out = []
    for q in queries:
        with torch.no_grad():
            feats = clip.model.encode_text(clip.tokenizer([t(q) for t in get_templates("openai_imagenet")])).float()
        feats = feats / feats.norm(dim=-1, keepdim=True)
        mean = feats.mean(0)
        out.append(mean / mean.norm())
    return torch.stack(out)


def grouped_embeddings(clip: DenseClip, queries: list[str]) -> torch.Tensor:
    """Now: a fresh (uncached) TextEmbedder around the length-grouped, cut-context encoder."""
    embedder = TextEmbedder(clip.encode_text, "bench", "openai_imagenet", cache_root=None)
    return torch.stack(embedder.embed_queries(queries))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--every", type=int, default=10, help="time the full-context way on every n-th class")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16").eval()
    clip = DenseClip(model, open_clip.get_tokenizer("ViT-B-16"), "ViT-B-16", "random")
    text = (resources.files("dapseg") / "configs" / "classes" / "ade20k.txt").read_text(encoding="utf-8")
    classes = ClassSet(tuple((line.strip(),) for line in text.splitlines() if line.strip()), allow_repeats=True)
    queries = classes.queries[:: args.every]
    before, now = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        a = full_context_embeddings(clip, queries)
        before.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        b = grouped_embeddings(clip, queries)
        now.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    grouped_embeddings(clip, classes.queries)
    all_now = time.perf_counter() - t0
    mb, mn = statistics.median(before), statistics.median(now)
    cpu = platform.processor() or platform.machine()
    print(f"machine: {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, load {[round(x, 2) for x in os.getloadavg()]}")
    print(f"ViT-B/16 text tower, 80 templates, {len(queries)} of the {len(classes.queries)} ADE20K classes, "
          f"median of {args.repeats} alternating repeats:")
    print(f"  full context, one call per query : {mb:8.2f} s  ({1000 * mb / len(queries):.0f} ms/query)")
    print(f"  grouped by length, cut context   : {mn:8.2f} s  ({1000 * mn / len(queries):.0f} ms/query)")
    print(f"  speed-up {mb / mn:.1f}x; max |Δ| of the unit embeddings {float((a - b).abs().max()):.1e}")
    print(f"all {len(classes.queries)} classes, grouped (one run): {all_now:.2f} s; the full-context way at its "
          f"measured rate: {mb / len(queries) * len(classes.queries):.0f} s")


if __name__ == "__main__":
    main()
