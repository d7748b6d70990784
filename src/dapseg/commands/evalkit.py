"""Flags and the segmenter-backed predictor factory shared by ``eval``, ``eval-all`` and ``sweep``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dapseg.eval import dist
from dapseg.eval.collect import finished_records, tables_lock
from dapseg.eval.harness import BuiltPredictor
from dapseg.eval.report import TablesNotWritten
from dapseg.eval.runner import RunOptions
from dapseg.files import resolve_inside
from dapseg.pool import SegmenterPool


def add_run_args(parser: argparse.ArgumentParser, default_work_dir: str) -> None:
    g = parser.add_argument_group("evaluation")
    g.add_argument("--data-root", required=True, help="folder holding the datasets (MMSegmentation layout), "
                   "or one dataset's own folder")
    g.add_argument("--work-dir", default=default_work_dir,
                   help=f"checkpoints, predictions and result tables (default: {default_work_dir})")
    g.add_argument("--limit", type=int, default=None, help="only the first N images (sorted by name)")
    g.add_argument("--workers", type=int, default=2, help="DataLoader worker processes for decoding")
    g.add_argument("--checkpoint-every", type=int, default=20, metavar="N",
                   help="save partial results every N images (per process)")
    g.add_argument("--skip-bad", action="store_true",
                   help="count and list bad images (unreadable, label of the wrong size or mode, label values "
                   "outside the classes) instead of stopping at the first")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_options(args: argparse.Namespace) -> RunOptions:
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    if args.checkpoint_every < 1:
        raise ValueError(f"--checkpoint-every must be >= 1, got {args.checkpoint_every}")
    return RunOptions(num_workers=args.workers, checkpoint_every=args.checkpoint_every,
                      progress=not args.no_progress, save_pred=getattr(args, "save_pred", False),
                      show=getattr(args, "show", 0) or 0)


def setup_distributed(args: argparse.Namespace) -> dist.DistInfo:
    """Join torchrun's process group; each rank uses its own GPU (LOCAL_RANK) when on CUDA."""
    info = dist.init_from_env(args.device)
    if info.enabled and torch.cuda.is_available() and (args.device in (None, "cuda")):
        args.device = f"cuda:{info.local_rank}"
    return info


def autocast_dtype(device: torch.device, precision: str = "auto") -> str:
    """The models' dtype on ``device`` at ``inference.precision`` (weights held in it, run under autocast
    at it), as the evaluation records it."""
    from dapseg.precision import inference_dtype

    dtype = inference_dtype(device, precision)
    return f"{str(dtype).removeprefix('torch.')} (autocast)" if dtype is not None else "float32"


class SegmenterFactory:
    """(preset, overrides, class names) -> predictor; models are built once per preset and reused
    (the ``SegmenterPool`` the demo uses too)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.pool = SegmenterPool(self._build)

    def _build(self, preset: str) -> Any:
        from dapseg.commands.common import build_segmenter

        ns = argparse.Namespace(**vars(self.args))
        ns.preset = preset
        return build_segmenter(ns)

    def __call__(self, preset: str, overrides: dict[str, Any], class_names: list[str]) -> BuiltPredictor:
        from dapseg.text import ClassSet

        seg = self.pool.get(preset, overrides)
        # Benchmark files, as the references: repeats kept, and the pixels below prob_thd go to class 0
        # (the dataset's background; prob_thd is 0 where a dataset has none), never left unlabeled.
        classes = ClassSet.from_list(class_names, allow_repeats=True, unsure_class=0)

        def predict(image: Any, *, name: str | None = None) -> torch.Tensor:
            return seg.predict(image, classes, name=name).labels

        a = self.args
        extra = {"random_weights": bool(a.random_weights), "tiny": bool(a.tiny),
                 "weights": {"clip": a.clip_weights, "vfm": a.vfm_weights, "sam": a.sam_weights}}
        return BuiltPredictor(predict, seg.config.model_dump(mode="json"), str(seg.device),
                              autocast_dtype(seg.device, seg.config.inference.precision), extra)


def preset_names(args: argparse.Namespace) -> list[str]:
    """Presets named by --preset (one or more) or the name of --config's config."""
    if args.config:
        from dapseg.config import load_config_file

        return [load_config_file(args.config).name]
    presets = args.preset if isinstance(args.preset, list) else [args.preset] if args.preset else []
    if not presets:
        raise ValueError("give --preset NAME (or --config FILE)")
    from dapseg.config import list_presets

    valid = list_presets()
    for p in presets:
        if p not in valid:
            raise ValueError(f"unknown preset {p!r}; valid presets: {', '.join(valid)}")
    return list(dict.fromkeys(presets))


def job_dir(work_dir: str | Path, *parts: str) -> Path:
    """The folder of one job under the work dir; a preset or dataset name that would lead outside it
    (``..``, an absolute name, a symlink out) is refused."""
    if not parts:
        return Path(work_dir)
    name = "/".join(parts)
    return resolve_inside(work_dir, name, what=f"job folder {name!r} (preset / dataset name)")


def print_job(record: dict[str, Any]) -> list[str]:
    """Rank 0: the job's metrics line and its skipped images, printed before any table is written;
    returns the job's write errors (taken out of the record)."""
    skipped = f", {record['n_bad']} skipped" if record["n_bad"] else ""
    print(f"{record['preset']} on {record['dataset']} ({record['n_images']} images evaluated{skipped}): "
          f"mIoU {record['mIoU']:.2f}  "
          f"mAcc {record['mAcc']:.2f}  aAcc {record['aAcc']:.2f}", flush=True)
    if record["n_bad"]:
        print(f"skipped {record['n_bad']} bad image(s) (--skip-bad):")
        for name, why in record["bad"].items():
            print(f"  {name}: {why}")
    return list(record.pop("write_errors", []))


def write_tables(work_dir: str | Path, records: list[dict[str, Any]], write: Callable[[list[dict[str, Any]]],
                 dict[str, Path]], *, sweep: bool = False) -> tuple[dict[str, Path], list[str]]:
    """Rank 0: the top-level tables of every finished job in ``work_dir`` (this run's ``records`` first),
    written by ``write(all_records)`` each on its own; returns (written paths, errors). Warnings about
    result files left out go to stderr."""
    with tables_lock(work_dir):
        every, warnings = finished_records(work_dir, records, sweep=sweep)
        for w in warnings:
            print(f"dapseg: warning: {w}", file=sys.stderr)
        try:
            return write(every), []
        except TablesNotWritten as e:
            return e.written, e.errors


def report_errors(errors: list[str]) -> int:
    """Print each write error on its own line; the exit code (2 if any)."""
    for e in errors:
        print(f"dapseg: error: {e}", file=sys.stderr)
    return 2 if errors else 0
