"""`dapseg eval`: one preset on one benchmark dataset -> mIoU, per-class IoU, result tables."""

from __future__ import annotations

import argparse

from dapseg.commands.common import add_model_args, add_threads_arg, apply_threads, overrides_from_args
from dapseg.commands.evalkit import (
    SegmenterFactory,
    add_run_args,
    job_dir,
    preset_names,
    print_job,
    report_errors,
    run_options,
    setup_distributed,
    write_tables,
)
from dapseg.data.spec import list_datasets, load_dataset_spec
from dapseg.eval import dist
from dapseg.eval.checkpoint import ensure_writable
from dapseg.eval.harness import Job, run_job
from dapseg.eval.report import require_eval_extras, write_results


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a preset on one benchmark dataset (torchrun-ready, resumable)")
    p.add_argument("--dataset", required=True,
                   help=f"dataset name ({', '.join(list_datasets())}) or a dataset YAML file")
    add_run_args(p, default_work_dir="work_dirs/eval")
    p.add_argument("--save-pred", action="store_true", help="write label PNGs to <work-dir>/.../pred/")
    p.add_argument("--show", type=int, default=0, metavar="K",
                   help="write image | ground truth | prediction pictures for the first K images")
    add_model_args(p, default_preset=None)
    add_threads_arg(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    require_eval_extras()  # before any work: the result tables need the `eval` extra
    apply_threads(args.threads)
    spec = load_dataset_spec(args.dataset)
    (preset,) = preset_names(args)
    opts = run_options(args)
    ensure_writable(job_dir(args.work_dir))  # named before any model is built
    info = setup_distributed(args)
    job = Job(preset, spec, args.data_root, job_dir(args.work_dir, preset, spec.name),
              overrides_from_args(args), limit=args.limit, skip_bad=args.skip_bad)
    record = run_job(job, SegmenterFactory(args), opts)
    errors: list[str] = []
    if info.is_main:
        errors = print_job(record)  # the metrics first: a table that cannot be written must not hide them

        def write(records: list[dict]) -> dict:
            title = (f"dapseg eval: {preset} on {spec.name}" if len(records) == 1 else
                     f"dapseg eval: every finished job in {args.work_dir}")
            return write_results(args.work_dir, records, title=title, note=_note(args))

        paths, table_errors = write_tables(args.work_dir, [record], write)
        errors += table_errors
        if paths:
            print(f"results: {', '.join(str(p) for p in paths.values())}")
    dist.barrier(info)
    return report_errors(errors)


def _note(args: argparse.Namespace) -> str | None:
    if args.random_weights:
        return "**Random weights** (--random-weights): these numbers measure nothing about the method."
    return None
