"""Slide inference: all windows of an image in one batch vs one window at a time (issue 2).

Full-size ViT-B/16 with random weights (speed does not depend on the weights), NACLIP head, a
336x500 photo (skimage's coffee, cropped), slide crop 336 / stride 112 at the native size: three
windows per image. Prints images/s for both settings, their ratio, and peak RSS, with the machine.

Timing: both settings share one model in one process and alternate repeat by repeat after a
warm-up, so a shared machine's load drifts affect both alike; the medians are reported.
Peak RSS: each setting runs in its own fresh subprocess: build, warm-up, then the kernel's RSS
high-water mark is reset (``/proc/self/clear_refs``, Linux) and read back as VmHWM after the next
images, so the peak is inference only (``resource.getrusage`` ru_maxrss where /proc is missing;
it cannot be reset). The build and warm-up peaks are printed separately.

    python benchmarks/slide.py [--repeats 5] [--device cpu|cuda] [--threads N]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("dapseg") is None:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO / "src"))

CLASSES = ["cup", "saucer", "table", "spoon", "coffee"]
SETTINGS = {"batched": {}, "one-at-a-time": {"inference.max_batch": 1}}
BASE_OVERRIDES = {"inference.crop": 336, "inference.stride": 112, "inference.short_side": None}


def test_image() -> Any:
    """(336, 500, 3) uint8: the coffee photo (400 x 600) cropped at its centre."""
    from skimage import data

    img = data.coffee()
    top, left = (img.shape[0] - 336) // 2, (img.shape[1] - 500) // 2
    return img[top : top + 336, left : left + 500].copy()


def build(setting: str, device: str) -> Any:
    from dapseg import Segmenter

    overrides = {**BASE_OVERRIDES, **SETTINGS[setting]}
    return Segmenter.from_preset("naclip", random_weights=True, device=device, overrides=overrides)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def timed_predict(seg: Any, image: Any, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    seg.predict(image, CLASSES)
    sync(device)
    return time.perf_counter() - start


def _proc_status_mib(field: str) -> float | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    return int(status.split(f"{field}:")[1].split()[0]) / 1024  # kB


def peak_rss_mib() -> float:
    """The RSS high-water mark: VmHWM where /proc exists (it can be reset), else ru_maxrss.

    ``ru_maxrss`` is max(VmHWM, the high-water marks of exited threads), so after a reset it can
    still report a peak from before the reset; VmHWM cannot.
    """
    hwm = _proc_status_mib("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20  # KiB on Linux, bytes on macOS


def current_rss_mib() -> float:
    rss = _proc_status_mib("VmRSS")
    return float("nan") if rss is None else rss


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0), so later peaks are inference only."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def rss_worker(setting: str, device: str, images: int) -> None:
    """In a fresh process: build one setting, warm up, then peak RSS over ``images`` predictions (JSON)."""
    import gc

    seg = build(setting, device)
    out: dict[str, Any] = {"build_peak_mib": peak_rss_mib()}
    image = test_image()
    seg.predict(image, CLASSES)  # warm-up: text embeddings, allocator
    gc.collect()
    out["warmup_peak_mib"] = peak_rss_mib()
    out["before_mib"] = current_rss_mib()
    out["reset"] = reset_peak_rss()
    if device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats()
    for _ in range(images):
        seg.predict(image, CLASSES)
    out["peak_mib"] = peak_rss_mib()
    if device.startswith("cuda"):
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out))


def machine(device: str) -> str:
    import torch

    load = " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    line = (
        f"machine: {platform.processor() or platform.machine()} | os.cpu_count()={os.cpu_count()} | "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads | device {device} | load avg {load}"
    )
    if device.startswith("cuda"):
        line += f" | {torch.cuda.get_device_name()}"
    return line


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="timed images per setting (after one warm-up)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--rss-images", type=int, default=2, help="images per setting in the RSS subprocesses")
    p.add_argument("--rss-worker", choices=sorted(SETTINGS), help=argparse.SUPPRESS)
    args = p.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_worker:
        rss_worker(args.rss_worker, args.device, args.rss_images)
        return

    print(machine(args.device))
    image = test_image()
    batched = build("batched", args.device)
    single = batched.derive(SETTINGS["one-at-a-time"])  # the same CLIP and head, max_batch 1
    from dapseg.inference.windows import window_grid

    n_windows = len(window_grid(*image.shape[:2], 336, 112))
    print(f"image {image.shape[0]}x{image.shape[1]}, ViT-B/16 random weights, naclip head, slide 336/112: "
          f"{n_windows} windows; max_batch {batched.config.inference.max_batch} vs 1; {len(CLASSES)} classes")

    segs = {"batched": batched, "one-at-a-time": single}
    times: dict[str, list[float]] = {name: [] for name in segs}
    for seg in segs.values():  # warm-up: allocator, text embeddings, lazy init
        timed_predict(seg, image, args.device)
    for _ in range(args.repeats):
        for name, seg in segs.items():
            times[name].append(timed_predict(seg, image, args.device))

    # The two settings must give the same result (the batched path is only an optimisation).
    a = batched.predict(image, CLASSES)
    b = single.predict(image, CLASSES)
    diff = float((a.coarse_logits - b.coarse_logits).abs().max())
    same_labels = float((a.labels == b.labels).double().mean())

    rss: dict[str, dict[str, float]] = {}
    for name in segs:
        cmd = [sys.executable, __file__, "--rss-worker", name, "--device", args.device,
               "--rss-images", str(args.rss_images)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rss[name] = json.loads(proc.stdout.strip().splitlines()[-1])

    print(f"{'setting':<15}{'median s/img':>13}{'images/s':>10}{'min s':>8}{'max s':>8}"
          f"{'RSS before':>12}{'peak RSS':>10}{'increase':>10}")
    ips = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        ips[name] = 1.0 / med
        r = rss[name]
        extra = f"  CUDA peak {r['cuda_peak_mib']:.0f} MiB" if "cuda_peak_mib" in r else ""
        print(f"{name:<15}{med:>13.3f}{ips[name]:>10.3f}{min(ts):>8.3f}{max(ts):>8.3f}"
              f"{r['before_mib']:>8.0f} MiB{r['peak_mib']:>6.0f} MiB{r['peak_mib'] - r['before_mib']:>6.0f} MiB{extra}")
    print(f"ratio batched / one-at-a-time: {ips['batched'] / ips['one-at-a-time']:.2f}x images/s "
          f"(medians of {args.repeats}, alternated in one process)")
    how = ("peak reset after build and warm-up via /proc/self/clear_refs" if all(r["reset"] for r in rss.values())
           else "peak includes the model build (no /proc/self/clear_refs here)")
    print(f"peak RSS: own subprocess per setting, {args.rss_images} image(s) after a warm-up; {how}; "
          f"peaks while building the model {max(r['build_peak_mib'] for r in rss.values()):.0f} MiB, "
          f"during the warm-up image (text encoding) {max(r['warmup_peak_mib'] for r in rss.values()):.0f} MiB")
    print(f"same result: max |logit difference| {diff:.2e}, labels identical on {100 * same_labels:.2f}% of pixels")
    print("all timings (s): " + "; ".join(f"{n}: {' '.join(f'{t:.3f}' for t in ts)}" for n, ts in times.items()))
    if hasattr(os, "getloadavg"):
        print(f"load avg at end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
