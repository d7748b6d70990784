"""Peak memory and time of the FSA step: memory-lean form vs the reference's tensor form.

The FSA step here is: class distributions d (N×C) -> pairwise KL -> s = 1/(1+KL) -> top-p ->
W = softmax(s·exp(λs)) -> Attn_ens·v, for one window with a shared attention (the ProxyCLIP case,
H = 1) and ViT-B values (12 heads × 64). The cosine logits before it cost N·C·E in both forms and are
left out.

- lean: dapseg.plugins.fsa (KL as one N×C by C×N product; W·(Attn·v) + Attn·(W·v) + W·v);
- naive: the reference's forms (the N×N×C tensor of pairwise KL terms; W·Attn and Attn·W built
  as N×N matrices, then applied to v).

Every (C, form) runs in a fresh subprocess; the memory figure is the growth of peak RSS during the
step (``resource.getrusage``), next to the analytic size of the largest tensors. The naive form is
skipped where its N×N×C tensors would not fit in the free memory (the table says so).

    python benchmarks/fsa.py [--n 1764] [--classes 21 171 847] [--repeats 3]
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
from pathlib import Path

import torch

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))

from dapseg.plugins.fsa import (  # noqa: E402
    LOG_EPS,
    ensemble_values,
    feedback_weights,
    kl_matrix,
    top_p_mask,
)

HEADS, HEAD_DIM, LAM, TOP_P = 12, 64, 3.0, 0.45
MiB = 2**20


def naive_kl(d: torch.Tensor) -> torch.Tensor:
    """The reference's pairwise KL: the (1, N, N, C) tensor of terms, summed over C."""
    log_d = torch.log(d + LOG_EPS)
    return (d[:, :, None, :] * (log_d[:, :, None, :] - log_d[:, None, :, :])).sum(-1).clamp(min=0.0)


def naive_step(attn: torch.Tensor, v: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The reference's tensor forms. attn (1, 1, N, N), v (1, heads, N, d), d (1, N, C)."""
    s = 1.0 / (1.0 + naive_kl(d))
    keep = top_p_mask(s, TOP_P)
    w = torch.softmax((s * torch.exp(LAM * s)).masked_fill(~keep, float("-inf")), dim=-1)[:, None]
    ens = (torch.matmul(w, attn) + torch.matmul(attn, w) + w) / 3.0  # explicit N×N products
    return torch.matmul(ens, v)


def lean_step(attn: torch.Tensor, v: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return ensemble_values(attn, v, feedback_weights(d, LAM, TOP_P), has_cls=False)


def inputs(n: int, c: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    attn = torch.softmax(torch.randn(1, 1, n, n, generator=g), dim=-1)
    v = torch.randn(1, HEADS, n, HEAD_DIM, generator=g)
    d = torch.softmax(torch.randn(1, n, c, generator=g) * 3.0, dim=-1)
    return attn, v, d


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def child(n: int, c: int, form: str, repeats: int) -> dict:
    step = lean_step if form == "lean" else naive_step
    with torch.no_grad():
        step(*inputs(64, c))  # load kernels / thread pools before the baseline
        args = inputs(n, c)
        base = peak_rss_bytes()
        t0 = time.perf_counter()
        out = step(*args)
        first = time.perf_counter() - t0
        peak = peak_rss_bytes() - base
        del out
        times = [first]
        for _ in range(repeats - 1):
            t0 = time.perf_counter()
            step(*args)
            times.append(time.perf_counter() - t0)
        kl = kl_matrix if form == "lean" else naive_kl
        kl_times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            kl(args[2])
            kl_times.append(time.perf_counter() - t0)
    median = lambda t: sorted(t)[len(t) // 2]
    return {"peak_rss": peak, "time": median(times), "kl_time": median(kl_times)}


def analytic_bytes(n: int, c: int, form: str) -> int:
    """Largest simultaneously live float32 tensors of the step (inputs excluded)."""
    if form == "naive":
        return 2 * n * n * c * 4  # the N×N×C difference and product tensors of the KL
    return 2 * n * c * 4 + 4 * n * n * 4  # d and log d; KL, s, the sort and its indices (N×N)


def available_bytes() -> int:
    with open("/proc/meminfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1764, help="patch tokens per window (336² with a /8 VFM)")
    ap.add_argument("--classes", type=int, nargs="+", default=[21, 171, 847])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--mem-fraction", type=float, default=0.6,
                    help="skip the naive form where its analytic size exceeds this share of free memory")
    ap.add_argument("--child", nargs=2, metavar=("C", "FORM"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.n, int(args.child[0]), args.child[1], args.repeats)))
        return 0

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{available_bytes() / 2**30:.1f} GiB free")
    print(f"N = {args.n}, shared attention, {HEADS} heads × {HEAD_DIM}, float32, median of {args.repeats}\n")
    header = f"{'C':>5} {'form':>6} {'analytic MiB':>13} {'peak RSS +MiB':>14} {'step s':>8} {'KL s':>8}"
    print(header)
    print("-" * len(header))
    results: dict[tuple[int, str], dict] = {}
    for c in args.classes:
        for form in ("lean", "naive"):
            est = analytic_bytes(args.n, c, form)
            if form == "naive" and est > args.mem_fraction * available_bytes():
                print(f"{c:>5} {form:>6} {est / MiB:>13.0f} {'skipped: would not fit':>23}")
                continue
            cmd = [sys.executable, __file__, "--n", str(args.n), "--repeats", str(args.repeats),
                   "--child", str(c), form]
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            results[(c, form)] = r
            print(f"{c:>5} {form:>6} {est / MiB:>13.0f} {r['peak_rss'] / MiB:>14.0f} {r['time']:>8.3f} "
                  f"{r['kl_time']:>8.3f}")
    print()
    for c in args.classes:
        lean, naive = results.get((c, "lean")), results.get((c, "naive"))
        if lean and naive:
            print(f"C = {c}: naive / lean  memory {naive['peak_rss'] / max(lean['peak_rss'], 1):.1f}x, "
                  f"step time {naive['time'] / lean['time']:.1f}x, KL time {naive['kl_time'] / lean['kl_time']:.0f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
