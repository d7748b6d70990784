"""What PEARL adds to NACLIP: the Procrustes head against the naclip head on the same last-block tokens,
and the pearl_prop propagation, timed alternately in one process (medians), so that a busy machine
slows both sides alike.

    python benchmarks/pearl.py [--device cuda] [--repeats 7] [--classes 8 150]

Full-size CLIP ViT-B/16 last block with random weights (speed does not depend on the weights), the
8 windows of 224 px that a 336 x 505 image gives (slide, stride 112); the propagation on that image's
full-size logits.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from dapseg.bench.probe import synchronize
from dapseg.config import ClipConfig
from dapseg.heads.base import HeadContext, build_head
from dapseg.models.clip import build_clip
from dapseg.refine.pearl_prop import PearlPropParams, propagate


def timed(fn, device: torch.device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--classes", type=int, nargs="+", default=[8, 150])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    clip = build_clip(ClipConfig(), random_weights=True, device=device)
    windows = torch.rand(8, 3, 224, 224, device=device)
    with torch.no_grad():
        x, grid = clip.tokens_before_last_block(windows)  # (8, 197, 768)
    ctx = HeadContext(x=x, grid=grid, block=clip.last_block)
    heads = {"naclip head": build_head("naclip").to(device), "pearl head": build_head("pearl").to(device)}
    jobs = {name: (lambda h=h: h(ctx)) for name, h in heads.items()}
    image = torch.randn(1, 3, 336, 505, device=device)
    for q in args.classes:
        logits = 0.02 * torch.randn(1, q, 336, 505, device=device) + 0.2
        text = F.normalize(torch.randn(q, clip.embed_dim, device=device), dim=-1)
        jobs[f"propagation, {q} classes"] = (lambda lg=logits, t=text: propagate(image, lg, t, PearlPropParams()))
    times: dict[str, list[float]] = {name: [] for name in jobs}
    with torch.no_grad():
        for fn in jobs.values():  # warm-up
            fn()
        for _ in range(args.repeats):
            for name, fn in jobs.items():  # alternated: every repeat sees the same machine state
                times[name].append(timed(fn, device))
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.repeats} alternated repeats, medians [min-max]")
    for name, ts in times.items():
        print(f"  {name:28s} {statistics.median(ts) * 1e3:9.1f} ms  [{min(ts) * 1e3:.1f}-{max(ts) * 1e3:.1f}]")


if __name__ == "__main__":
    main()
