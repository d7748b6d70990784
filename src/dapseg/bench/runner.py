"""Benchmark presets: parameters, matmul FLOPs, time per image, peak memory and stage breakdown.

Timing protocol: build, ``warmup`` predictions (text embeddings get cached, allocators settle), one
counted run under the FLOP counter, then ``repeats`` timed predictions. When ``compare_batching`` is
on, the batched setting (the preset's ``max_batch``) and one window at a time (``max_batch = 1``)
alternate repeat by repeat on the same models, so a shared machine's load drift hits both alike.
The stage breakdown comes from the batched repeats (medians per stage).
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dapseg.bench.flops import count_flops
from dapseg.bench.probe import matmul_rate, synchronize
from dapseg.bench.stages import STAGES, StageTimer
from dapseg.precision import dtype_name

DEFAULT_CLASSES = ("cat", "wall", "floor", "blanket", "sofa", "plant", "window", "door")


@dataclass
class BenchSettings:
    device: str | None = None
    random_weights: bool = False
    tiny: bool = False
    warmup: int = 1
    repeats: int = 3
    compare_batching: bool = True
    count_flops: bool = True
    overrides: dict[str, Any] = field(default_factory=dict)  # applied to every preset
    cache_dir: str | None = None
    # inference.precision settings, each preset benched at each, side by side (empty: the preset's own)
    precisions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError(f"bench needs repeats >= 1 and warmup >= 0, got {self.repeats}, {self.warmup}")


# ---------------------------------------------------------------------------------------- memory
def _proc_status_mib(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        return None
    return None


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak: CUDA's allocator stats, or the kernel's RSS high-water mark (Linux).

    Returns False where the peak cannot be reset (then it covers the whole process so far).
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def peak_memory_mib(device: torch.device) -> float:
    """Peak since ``reset_peak_memory``: max_memory_allocated on CUDA, peak RSS (VmHWM) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    hwm = _proc_status_mib("VmHWM")
    if hwm is not None:
        return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


# ---------------------------------------------------------------------------------------- models
def count_params(module: torch.nn.Module | None) -> int:
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters())  # parameters() yields a shared tensor once


def model_params(segmenter: Any) -> dict[str, int]:
    """Parameters per model: CLIP (image + text towers), VFM, SAM (where present), head."""
    out = {"clip": count_params(segmenter.clip.model)}
    if segmenter.vfm is not None:
        out["vfm"] = count_params(segmenter.vfm)
    if segmenter.sam is not None:
        out["sam"] = count_params(segmenter.sam)
    masks = getattr(segmenter.models, "mask_generator", None)
    if isinstance(getattr(masks, "model", None), torch.nn.Module):
        out["masks"] = count_params(masks.model)
    head = count_params(segmenter.head)
    if head:
        out["head"] = head
    return out


def n_windows(segmenter: Any, image: np.ndarray) -> int:
    """Windows the strategy cuts the processed image into (1 for ``whole``)."""
    from dapseg.inference.preprocess import short_side_size
    from dapseg.inference.windows import window_grid

    cfg = segmenter.config.inference
    h, w = image.shape[:2]
    h, w = short_side_size(h, w, cfg.short_side) if cfg.short_side else (h, w)
    if cfg.mode == "whole":
        return 1
    if cfg.params.get("align", True):  # the size splice and stitch resize to before cutting windows
        if cfg.mode == "splice":
            from dapseg.inference.splice import splice_size

            h, w = splice_size(h, w, segmenter.clip.patch_size, cfg.crop)
        elif cfg.mode == "stitch":
            from dapseg.inference.stitch import aligned_size

            h, w = aligned_size(h, w, segmenter.clip.patch_size)
    return len(window_grid(h, w, cfg.crop, cfg.stride))


# ---------------------------------------------------------------------------------------- timing
def _timed_predict(segmenter: Any, image: np.ndarray, classes: Any, device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one prediction.

    CPU time moves much less than wall time when other processes compete for the cores, so it is
    the better before/after figure on a shared machine.
    """
    synchronize(device)
    t0, c0 = time.perf_counter(), time.process_time()
    segmenter.predict(image, classes)
    synchronize(device)
    return time.perf_counter() - t0, time.process_time() - c0


def text_encoding_seconds(segmenter: Any, classes: Any, device: torch.device) -> float:
    """Seconds to encode ``classes``' queries from scratch (all templates), as a first image pays it:
    a fresh embedder around the segmenter's text encoder, with no memory or disk cache."""
    from dapseg.text import TextEmbedder

    fresh = TextEmbedder(segmenter.text.encode, segmenter.text.model_id, segmenter.text.templates, cache_root=None)
    synchronize(device)
    t0 = time.perf_counter()
    fresh(classes)
    synchronize(device)
    return time.perf_counter() - t0


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def bench_preset(
    preset: str,
    image: np.ndarray,
    classes: Any,
    settings: BenchSettings,
    probe_size: int | None = 1024,
    precision: str | None = None,
) -> dict[str, Any]:
    """One preset's row of the table (see the module docstring for the protocol), at ``precision``
    (``inference.precision``; None: the preset's own).

    With ``probe_size``, a short matmul probe runs right before each timed repeat and the preset's
    fraction is taken against the median of those probes: on a shared machine whose load drifts, a
    probe taken minutes earlier would compare the preset with a different machine.
    """
    from dapseg.api import Segmenter
    from dapseg.text import ClassSet

    class_set = ClassSet.coerce(classes)
    t0 = time.perf_counter()
    seg = Segmenter.from_preset(
        preset,
        device=settings.device,
        random_weights=settings.random_weights,
        tiny=settings.tiny,
        cache_dir=settings.cache_dir,
        overrides={**settings.overrides, **({"inference.precision": precision} if precision else {})},
    )
    build_s = time.perf_counter() - t0
    device = seg.device
    windows = n_windows(seg, image)
    one = None
    if settings.compare_batching and windows > 1 and seg.config.inference.max_batch > 1:
        one = seg.derive({"inference.max_batch": 1})
    for _ in range(settings.warmup):
        seg.predict(image, class_set)
        if one is not None:
            one.predict(image, class_set)
    flops = count_flops(lambda: seg.predict(image, class_set))[0] if settings.count_flops else None
    text_s = text_encoding_seconds(seg, class_set, device)

    timer = StageTimer(device=device)
    times: list[float] = []
    cpu_times: list[float] = []
    one_times: list[float] = []
    stage_runs: list[dict[str, float]] = []
    reset_ok = reset_peak_memory(device)
    probes: list[float] = []
    for _ in range(settings.repeats):
        if probe_size:
            probes.append(matmul_rate(device, size=probe_size, repeats=1)["gflops_per_s"])
        timer.reset()
        with timer.active(seg):
            wall, cpu = _timed_predict(seg, image, class_set, device)
        times.append(wall)
        cpu_times.append(cpu)
        stage_runs.append(dict(timer.seconds))
        if one is not None:
            one_times.append(_timed_predict(one, image, class_set, device)[0])
    peak = peak_memory_mib(device)

    median = statistics.median(times)
    probe_gflops = statistics.median(probes) if probes else None
    gflops = flops / 1e9 if flops is not None else None

    def fraction(seconds: float) -> float | None:
        return gflops / seconds / probe_gflops if gflops is not None and probe_gflops else None

    stages = {
        name: statistics.median(run.get(name, 0.0) for run in stage_runs)
        for name in dict.fromkeys(k for run in stage_runs for k in run)
    }
    row: dict[str, Any] = {
        "preset": preset,
        # the dtype the models hold their weights in and run at (inference.precision resolved on this device)
        "precision": dtype_name(seg.models.dtype),
        "params": model_params(seg),
        "windows": windows,
        "max_batch": seg.config.inference.max_batch,
        "classes": len(class_set.queries),
        "build_s": build_s,
        "text_encoding_s": text_s,
        "seconds": _spread(times),
        "cpu_seconds": _spread(cpu_times),
        "images_per_s": 1.0 / median,
        "seconds_per_window": median / windows,
        "gflops": gflops,
        "achieved_gflops_per_s": gflops / median if gflops is not None else None,
        "probe_gflops_per_s": probe_gflops,
        "fraction_of_probe": fraction(median),
        "peak_memory_mib": peak,
        "peak_memory_kind": ("max_memory_allocated" if device.type == "cuda" else "peak RSS")
        + ("" if reset_ok else " (whole process, incl. build)"),
        "stages_s": stages,
        "stage_paths_unresolved": timer.unresolved,
        "one_at_a_time": None,
    }
    if one_times:
        m1 = statistics.median(one_times)
        row["one_at_a_time"] = {
            "seconds": _spread(one_times),
            "images_per_s": 1.0 / m1,
            "fraction_of_probe": fraction(m1),
        }
    return row


def machine_info(dev: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "device": str(dev),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
    with contextlib.suppress(OSError):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return info


def run_bench(
    presets: list[str],
    image: np.ndarray,
    classes: Any = DEFAULT_CLASSES,
    settings: BenchSettings | None = None,
    *,
    probe_size: int = 1024,
) -> dict[str, Any]:
    """The whole report: machine, a matmul probe up front, one row per preset (each with its own probes)."""
    settings = settings or BenchSettings()
    device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    probe_before = matmul_rate(device, size=probe_size)
    # each preset at each precision in turn, in this process: the rows of one preset are side by side
    rows = [bench_preset(p, image, classes, settings, probe_size, precision)
            for p in presets for precision in (settings.precisions or (None,))]
    machine = machine_info(device)  # load average after the runs, when it reflects them
    return {
        "machine": machine,
        "image_size": list(image.shape[:2]),
        "settings": {
            "warmup": settings.warmup,
            "repeats": settings.repeats,
            "random_weights": settings.random_weights,
            "tiny": settings.tiny,
            "overrides": settings.overrides,
            "precisions": list(settings.precisions),
        },
        "probe": probe_before,
        "presets": rows,
    }


# ---------------------------------------------------------------------------------------- table
def _m(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def precision_ratios(rows: list[dict[str, Any]]) -> list[str]:
    """Lines "preset: bfloat16 1.42x the speed of float32" for each preset benched at float32 and lower."""
    by_preset: dict[str, dict[str, float]] = {}
    for r in rows:
        by_preset.setdefault(r["preset"], {})[r.get("precision", "float32")] = r["seconds"]["median"]
    lines = []
    for preset, seconds in by_preset.items():
        if "float32" not in seconds:
            continue
        for dtype, s in seconds.items():
            if dtype != "float32":
                lines.append(f"  {preset}: {dtype} {seconds['float32'] / s:.2f}x the speed of float32 "
                             f"({s:.3f} against {seconds['float32']:.3f} s/img)")
    return ["", "precision (median s/img, side by side in this process):", *lines] if lines else []


def format_report(report: dict[str, Any]) -> str:
    """The terminal tables: one row per preset, then the per-stage breakdown."""
    m = report["machine"]
    probe = report["probe"]
    where = m.get("gpu") or m["cpu"]
    lines = [
        f"machine: {where} ({m['device']}, {m['torch_threads']} torch threads), torch {m['torch']}, "
        f"load {m.get('load_average', '?')}",
        f"image {report['image_size'][0]}x{report['image_size'][1]}; matmul probe "
        f"{probe['gflops_per_s']:.0f} GFLOP/s ({int(probe['size'])}² fp32, min {probe['min']:.0f}, "
        f"max {probe['max']:.0f}; each preset's % is against probes taken between its repeats); "
        f"{report['settings']['repeats']} repeats after "
        f"{report['settings']['warmup']} warm-up",
        "",
    ]
    head = (f"{'preset':<16} {'dtype':<8} {'params (clip/vfm/sam)':<24} {'win':>3} {'GFLOP':>8} {'s/img':>18} "
            f"{'s/win':>6} "
            f"{'CPU s':>6} {'img/s':>6} {'GFLOP/s':>7} {'probe':>6} {'% probe':>7} {'1-by-1 s/img':>12} "
            f"{'peak MiB':>9} {'text enc s':>10}")
    lines += [head, "-" * len(head)]
    for r in report["presets"]:
        p = r["params"]
        params = "/".join(_m(p[k]) for k in ("clip", "vfm", "sam") if k in p)
        s = r["seconds"]
        spread = f"{s['median']:.3f} [{s['min']:.2f}-{s['max']:.2f}]"
        gf = f"{r['gflops']:.1f}" if r["gflops"] is not None else "-"
        frac = f"{100 * r['fraction_of_probe']:.0f}%" if r["fraction_of_probe"] is not None else "-"
        one = f"{r['one_at_a_time']['seconds']['median']:.3f}" if r["one_at_a_time"] else "-"
        rate = f"{r['achieved_gflops_per_s']:.0f}" if r["achieved_gflops_per_s"] is not None else "-"
        probe_cell = f"{r['probe_gflops_per_s']:.0f}" if r["probe_gflops_per_s"] else "-"
        lines.append(f"{r['preset']:<16} {r.get('precision', '-'):<8} {params:<24} {r['windows']:>3} {gf:>8} "
                     f"{spread:>18} "
                     f"{r['seconds_per_window']:>6.2f} {r['cpu_seconds']['median']:>6.1f} {r['images_per_s']:>6.2f} "
                     f"{rate:>7} {probe_cell:>6} "
                     f"{frac:>7} {one:>12} "
                     f"{r['peak_memory_mib']:>9.0f} {r['text_encoding_s']:>10.2f}")
    lines += ["", "text enc s: encoding the class list once, uncached (all templates); the `text` stage below is the "
              "per-image lookup of the cached embeddings"]
    lines += precision_ratios(report["presets"])
    seen = {k for r in report["presets"] for k in r["stages_s"]}
    stage_names = [n for n in STAGES if n in seen]
    if stage_names:
        lines += ["", "seconds per image by stage (median of the batched repeats; exclusive times):"]
        head = f"{'preset':<16} " + " ".join(f"{n:>15}" for n in stage_names)
        lines += [head, "-" * len(head)]
        for r in report["presets"]:
            total = sum(r["stages_s"].values()) or 1.0
            cells = []
            for n in stage_names:
                v = r["stages_s"].get(n)
                cells.append(f"{v:>8.3f} ({100 * v / total:>3.0f}%)" if v is not None else f"{'-':>15}")
            lines.append(f"{r['preset']:<16} " + " ".join(cells))
    missing = sorted({p for r in report["presets"] for p in r["stage_paths_unresolved"]})
    if missing:
        lines += ["", "stage functions not found (FUNCTION_STAGES needs updating): " + ", ".join(missing)]
    return "\n".join(lines)
