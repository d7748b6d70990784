"""Glue between presets, dataset specs and the runner, shared by ``eval``, ``eval-all`` and ``sweep``.

The model side is a *predictor factory*: ``factory(preset, overrides, class_names) -> BuiltPredictor``.
The commands pass one that builds a ``Segmenter``; tests pass a fake. Settings resolve in this order
(later wins): the preset, the dataset's ``settings``, the dataset's ``methods[<preset>]``, the user's
overrides (``--set``, sweep combination).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dapseg.data.dataset import SegDataset
from dapseg.data.spec import DatasetSpec
from dapseg.eval import dist
from dapseg.eval.provenance import provenance
from dapseg.eval.runner import EvalResult, Predictor, RunOptions, evaluate, hold_job_folder


@dataclass
class BuiltPredictor:
    predict: Predictor
    config: dict[str, Any]  # the fully resolved segmenter settings (SegmenterConfig.model_dump())
    device: str = "cpu"
    dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. random_weights, tiny, weight files


PredictorFactory = Callable[[str, dict[str, Any], list[str]], BuiltPredictor]


@dataclass
class Job:
    preset: str
    spec: DatasetSpec
    data_root: Path
    work_dir: Path  # this job's own directory (checkpoints, result.json, pred/, show/)
    overrides: dict[str, Any] = field(default_factory=dict)
    limit: int | None = None
    skip_bad: bool = False
    sweep: dict[str, Any] | None = None  # the grid values of a sweep job (recorded with its result)

    def resolved_overrides(self) -> dict[str, Any]:
        return {**self.spec.overrides_for(self.preset), **self.overrides}


def _file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def run_job(job: Job, factory: PredictorFactory, options: RunOptions | None = None) -> dict[str, Any]:
    """Evaluate one (preset, dataset); returns the record for the reports (also the job's
    ``result.json``). ``record["write_errors"]`` lists files that could not be written (absent if none).
    The job folder is locked before any model is built: a second run into it stops at once."""
    with hold_job_folder(job.work_dir):
        return _run_job(job, factory, options)


def _run_job(job: Job, factory: PredictorFactory, options: RunOptions | None) -> dict[str, Any]:
    dataset = SegDataset(job.spec, job.data_root, limit=job.limit, skip_bad=job.skip_bad)
    classes = job.spec.class_names()
    built = factory(job.preset, job.resolved_overrides(), classes)
    class_file = job.spec.class_file()
    settings = {
        "preset": job.preset,
        "segmenter": built.config,
        "overrides": job.resolved_overrides(),
        "dataset": job.spec.model_dump(exclude={"methods", "settings"}),
        "class_file": {"path": str(class_file), "sha256": _file_sha(class_file)},
        "dtype": built.dtype,
        **built.extra,
    }
    opts = options or RunOptions()
    if opts.desc is None:
        opts = RunOptions(**{**opts.__dict__, "desc": f"{job.preset}/{job.spec.name}"})
    extra: dict[str, Any] = {"preset": job.preset, "data_root": str(dataset.root),
                             "provenance": provenance(built.device, built.dtype, dist.current().world_size)}
    if job.sweep is not None:
        extra["sweep"] = job.sweep
    result: EvalResult = evaluate(dataset, built.predict, job.work_dir, settings, opts, record_extra=extra,
                                  hold_lock=False)
    record = {**result.to_dict(), **extra}
    if result.write_errors:
        record["write_errors"] = list(result.write_errors)
    return record
