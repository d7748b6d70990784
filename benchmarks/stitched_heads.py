"""Cost of the last-block heads alone: per window (``attention`` + ``aggregate``) and stitched.

Full-size shapes with random inputs (speed and memory do not depend on the values): CLIP ViT-B/16's
last block (width 768, 12 heads); a 336 × 512 image stitched is a 21 × 32 CLIP grid and, with DINO
ViT-B/8 features, a 42 × 64 VFM grid (N' = 2688, C' = 768); per window, three 336² windows (21 × 21
CLIP, 42 × 42 VFM patches). Each setting runs in its own fresh subprocess: inputs, one warm-up, then
``--repeats`` timed runs (median); peak memory is the RSS high-water mark reset after the warm-up
(Linux): the peak RSS, and how far the head's run took it above the RSS before it.

    python benchmarks/stitched_heads.py [--repeats 3] [--threads 1] [--chunk 1024] [--only NAME ...]
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

# setting -> (head, params, stitched?)
SETTINGS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "naclip stitched": ("naclip", {}, True),
    "proxy stitched": ("proxy", {}, True),
    "dap stitched (slic)": ("dap", {}, True),
    "dap stitched (kmeans, knn 24, 2 steps)": ("dap", {"regions": "kmeans", "knn": 24, "steps": 2}, True),
    "naclip windows": ("naclip", {}, False),
    "proxy windows": ("proxy", {}, False),
    "dap windows (slic)": ("dap", {}, False),
}


def inputs(stitched: bool) -> dict[str, Any]:
    """Seeded random tokens, VFM features and image for one setting."""
    import torch
    from open_clip.transformer import ResidualAttentionBlock

    gen = torch.Generator().manual_seed(0)
    block = ResidualAttentionBlock(768, 12, batch_first=True).eval()
    if stitched:
        grid, vgrid, b, size = (21, 32), (42, 64), 1, (336, 512)
    else:
        grid, vgrid, b, size = (21, 21), (42, 42), 3, (336, 336)
    return {"block": block, "grid": grid, "size": size,
            "x": torch.randn(b, 1 + grid[0] * grid[1], 768, generator=gen),
            "feats": torch.randn(b, 768, *vgrid, generator=gen),
            "image": torch.rand(b, 3, *size, generator=gen)}


def run_one(name: str, repeats: int, chunk: int) -> dict[str, Any]:
    import torch

    from dapseg.bench.runner import peak_memory_mib, reset_peak_memory
    from dapseg.heads.base import HeadContext, build_head

    head_name, params, stitched = SETTINGS[name]
    head = build_head(head_name, params)
    t = inputs(stitched)
    if stitched:
        from dapseg.heads.stitched import StitchedTokens

        st = StitchedTokens(x=t["x"][0], grid=t["grid"], vfm_feats=t["feats"][0], image=t["image"][0],
                            window_area=336 * 336)
        call = lambda: head.stitched(t["block"], st, chunk)
    else:
        ctx = HeadContext(x=t["x"], grid=t["grid"], block=t["block"], vfm_feats=t["feats"], images=t["image"])
        call = lambda: head(ctx)
    cpu = torch.device("cpu")
    with torch.no_grad():
        call()  # warm-up
        reset_peak_memory(cpu)
        base = resident_mib()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    peak = peak_memory_mib(cpu)
    return {"setting": name, "s": statistics.median(times), "peak_MiB": peak, "head_MiB": peak - base}


def resident_mib() -> float:
    """The process's resident memory now (VmRSS), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=1024, help="rows per chunk of the stitched forms")
    ap.add_argument("--only", nargs="*", choices=list(SETTINGS), help="run only these settings")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one setting in this process
    args = ap.parse_args()
    if args.one:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(run_one(args.one, args.repeats, args.chunk)))
        return
    import torch

    print(f"# {platform.processor() or 'cpu'}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"threads {args.threads}, chunk {args.chunk}, load {os.getloadavg()[0]:.1f}")
    print("| setting | s | peak RSS MiB | of which the head's run |")
    print("|---|---|---|---|")
    for name in args.only or SETTINGS:
        cmd = [sys.executable, __file__, "--one", name, "--repeats", str(args.repeats),
               "--threads", str(args.threads), "--chunk", str(args.chunk)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"| {r['setting']} | {r['s']:.3f} | {r['peak_MiB']:.0f} | {r['head_MiB']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
