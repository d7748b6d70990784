"""Benchmark presets: parameters, matmul FLOPs, time per image, peak memory and stage breakdown.

Timing protocol: build, ``warmup`` predictions (text embeddings get cached, allocators settle), one
counted run under the FLOP counter, then ``repeats`` timed predictions. When ``compare_batching`` is
on, the batched setting (the preset's ``max_batch``) and one window at a time (``max_batch = 1``)
alternate repeat by repeat on the same models, so a shared machine's load drift hits both alike.
The stage breakdown comes from the batched repeats (medians per stage).

The parts live beside this module, one idea each: ``memory`` (peak memory), ``param_count``,
``windows`` (the strategy's declared window plan), ``timing``, ``machine``, ``stages`` (the stage
timer) and ``table`` (the terminal tables).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dapseg.bench.flops import count_flops
from dapseg.bench.machine import machine_info
from dapseg.bench.memory import peak_memory_kind, peak_memory_mib, reset_peak_memory
from dapseg.bench.param_count import model_params
from dapseg.bench.probe import matmul_rate
from dapseg.bench.stages import StageTimer
from dapseg.bench.timing import spread, text_encoding_seconds, timed_predict
from dapseg.bench.windows import n_windows
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
    # an unknown window count (a strategy that declares no plan) may be several windows: compare
    if settings.compare_batching and (windows is None or windows > 1) and seg.config.inference.max_batch > 1:
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
            wall, cpu = timed_predict(seg, image, class_set, device)
        times.append(wall)
        cpu_times.append(cpu)
        stage_runs.append(dict(timer.seconds))
        if one is not None:
            one_times.append(timed_predict(one, image, class_set, device)[0])
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
        "seconds": spread(times),
        "cpu_seconds": spread(cpu_times),
        "images_per_s": 1.0 / median,
        "seconds_per_window": median / windows if windows else None,
        "gflops": gflops,
        "achieved_gflops_per_s": gflops / median if gflops is not None else None,
        "probe_gflops_per_s": probe_gflops,
        "fraction_of_probe": fraction(median),
        "peak_memory_mib": peak,
        "peak_memory_kind": peak_memory_kind(device, reset_ok),
        "stages_s": stages,
        "stage_paths_unresolved": timer.unresolved,
        "one_at_a_time": None,
    }
    if one_times:
        m1 = statistics.median(one_times)
        row["one_at_a_time"] = {
            "seconds": spread(one_times),
            "images_per_s": 1.0 / m1,
            "fraction_of_probe": fraction(m1),
        }
    return row


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
