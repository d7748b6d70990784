"""Speed and memory of the proxy-attention heads: ProxyCLIP vs DAP (SLIC / k-means regions).

Full-size CLIP ViT-B/16 + DINO ViT-B/8 with random weights on one 336×500 image (3 windows of
336 at stride 112): images/s and peak RSS for ``proxyclip``, ``dap`` (regions = slic) and ``dap``
(regions = kmeans), each with its windows batched (max_batch 16) and one window at a time
(max_batch 1). Every configuration runs in its own subprocess, so each peak RSS is its own; all run
in this one invocation, side by side, and the ratios are printed with the machine.

    PYTHONPATH=src python benchmarks/proxy.py [--repeats 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

CONFIGS: dict[str, tuple[str, dict[str, object]]] = {
    "proxyclip": ("proxyclip", {}),
    "dap-slic": ("dap", {"head.params.regions": "slic"}),
    "dap-kmeans": ("dap", {"head.params.regions": "kmeans"}),
}
CLASSES = ["sky", "grass", "tree", "person", "dog", "building", "road", "car"]


def worker(name: str, batched: bool, repeats: int, device: str) -> dict[str, float]:
    import numpy as np
    import torch

    from dapseg.api import Segmenter

    torch.manual_seed(0)
    preset, overrides = CONFIGS[name]
    overrides = {**overrides, "inference.max_batch": 16 if batched else 1}
    seg = Segmenter.from_preset(preset, device=device, random_weights=True, overrides=overrides)
    image = (np.random.default_rng(0).random((336, 500, 3)) * 255).astype(np.uint8)
    seg.predict(image, CLASSES)  # warm-up: text embeddings cached, allocator primed
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        seg.predict(image, CLASSES)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    # CPU seconds (all threads) per image: less sensitive than wall time to other processes
    # sharing the machine; on an idle machine wall time is the figure that matters.
    return {"images_per_s": repeats / elapsed, "cpu_s_per_image": cpu / repeats, "peak_rss_mib": peak_kib / 1024}


def head_only(repeats: int) -> dict[str, float]:
    """Seconds per image (3 windows, batched) of the head alone on full-size shaped inputs.

    The full pipeline spends most of its time in the two ViTs, so the heads' own cost is measured
    here too: CLIP ViT-B/16 last block (width 768, 12 heads, 21x21 grid) and DINO ViT-B/8 features
    (768 x 42 x 42). Configurations are interleaved, best of ``repeats`` rounds.
    """
    import torch
    from open_clip.transformer import ResidualAttentionBlock

    from dapseg.heads.base import HeadContext, build_head

    torch.manual_seed(0)
    block = ResidualAttentionBlock(d_model=768, n_head=12).eval()
    ctx = HeadContext(
        x=torch.randn(3, 1 + 21 * 21, 768), grid=(21, 21), block=block,
        vfm_feats=torch.randn(3, 768, 42, 42), images=torch.rand(3, 3, 336, 336),
    )
    heads = {
        "proxyclip": build_head("proxy"),
        "dap-slic": build_head("dap", {"regions": "slic"}),
        "dap-kmeans": build_head("dap", {"regions": "kmeans"}),
    }
    best = dict.fromkeys(heads, float("inf"))
    with torch.no_grad():
        for _ in range(repeats):
            for name, head in heads.items():
                start = time.perf_counter()
                head(ctx)
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def run_child(name: str, batched: bool, repeats: int, device: str) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--worker", name, "--repeats", str(repeats), "--device", device]
    if batched:
        cmd.append("--batched")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ.copy())
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--batched", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.batched, args.repeats, args.device)))
        return

    import torch

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), device {args.device}")
    print("CLIP ViT-B/16 + DINO ViT-B/8, random weights, 336x500 image (3 windows of 336), "
          f"{args.repeats} timed runs after one warm-up\n")
    heads = head_only(max(args.repeats, 5))
    print("head alone, 3 windows batched, best of rounds:")
    for name, sec in heads.items():
        print(f"  {name:<12} {sec:.3f} s/image ({sec / heads['proxyclip'] - 1:+.1%} vs proxyclip)")
    print()
    results: dict[tuple[str, bool], dict[str, float]] = {}
    print(f"load average before: {os.getloadavg()[0]:.1f}")
    print(f"{'config':<12} {'windows':<14} {'images/s':>9} {'CPU s/image':>12} {'peak RSS MiB':>13}")
    for name in CONFIGS:
        for batched in (True, False):
            r = results[name, batched] = run_child(name, batched, args.repeats, args.device)
            mode = "batched" if batched else "one at a time"
            print(
                f"{name:<12} {mode:<14} {r['images_per_s']:>9.4f} {r['cpu_s_per_image']:>12.1f} "
                f"{r['peak_rss_mib']:>13.0f}"
            )
    print("\nratios (same run):")
    for name in CONFIGS:
        fast, slow = results[name, True], results[name, False]
        speedup = fast["images_per_s"] / slow["images_per_s"]
        cpu_speedup = slow["cpu_s_per_image"] / fast["cpu_s_per_image"]
        print(f"  {name}: batched / one-at-a-time throughput = {speedup:.2f}x (CPU time {cpu_speedup:.2f}x)")
    for name in ("dap-slic", "dap-kmeans"):
        for batched in (True, False):
            base = results["proxyclip", batched]
            r = results[name, batched]
            overhead = base["images_per_s"] / r["images_per_s"] - 1
            cpu_overhead = r["cpu_s_per_image"] / base["cpu_s_per_image"] - 1
            rss = r["peak_rss_mib"] / base["peak_rss_mib"]
            mode = "batched" if batched else "one at a time"
            print(
                f"  {name} vs proxyclip ({mode}): time overhead {overhead:+.1%} "
                f"(CPU time {cpu_overhead:+.1%}), peak RSS {rss:.2f}x"
            )
    print(f"load average after: {os.getloadavg()[0]:.1f} (other processes on the machine skew wall times)")


if __name__ == "__main__":
    main()
