"""`dapseg eval-all`: every benchmark found under --data-root, one or more presets, one results table."""

from __future__ import annotations

import argparse
import sys

from dapseg.commands.common import add_model_args, overrides_from_args
from dapseg.commands.eval import _note
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
from dapseg.data import DataError, dataset_present
from dapseg.data.spec import EXTRA, STANDARD, load_dataset_spec
from dapseg.eval import dist
from dapseg.eval.checkpoint import ensure_writable
from dapseg.eval.harness import Job, run_job
from dapseg.eval.report import require_eval_extras, write_results


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval-all", conflict_handler="resolve",
                       help="evaluate presets on every benchmark found under --data-root")
    add_model_args(p, default_preset=None)
    p.add_argument("--preset", action="append", default=None,
                   help="method preset; repeat for several presets in one table")
    p.add_argument("--dataset", action="append", default=None,
                   help=f"only these datasets (default: {', '.join(STANDARD + EXTRA)}, where present)")
    add_run_args(p, default_work_dir="work_dirs/eval_all")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    require_eval_extras()  # before any work: the result tables need the `eval` extra
    presets = preset_names(args)
    specs = [load_dataset_spec(d) for d in (args.dataset or STANDARD + EXTRA)]
    opts = run_options(args)
    ensure_writable(job_dir(args.work_dir))
    found, missing = [], []
    for spec in specs:
        (found if dataset_present(spec, args.data_root) else missing).append(spec)
    missing = [s.name for s in missing]
    if not found:
        raise DataError(f"no benchmark dataset found under {args.data_root}; expected e.g.\n"
                        f"{specs[0].layout()}")
    info = setup_distributed(args)
    factory = SegmenterFactory(args)
    records, failed, errors = [], {}, []
    for preset in presets:
        for spec in found:
            job = Job(preset, spec, args.data_root, job_dir(args.work_dir, preset, spec.name),
                      overrides_from_args(args), limit=args.limit, skip_bad=args.skip_bad)
            try:
                record = run_job(job, factory, opts)
            except DataError as e:  # a broken dataset must not lose the others
                failed[f"{preset}/{spec.name}"] = str(e)
                if info.is_main:
                    print(f"dapseg: {preset} on {spec.name} failed: {e}", file=sys.stderr)
                continue
            if info.is_main:
                errors += print_job(record)
            records.append(record)
    if info.is_main:
        if missing:
            print(f"not found under {args.data_root} (skipped): {', '.join(missing)}")
        if records:
            def write(every: list[dict]) -> dict:
                return write_results(args.work_dir, every, title="dapseg eval-all", note=_note(args),
                                     extra={"skipped_not_found": missing, "failed": failed})

            paths, table_errors = write_tables(args.work_dir, records, write)
            errors += table_errors
            if "md" in paths:
                print(paths["md"].read_text(encoding="utf-8"))
            if paths:
                print(f"results: {', '.join(str(p) for p in paths.values())}")
    dist.barrier(info)
    return report_errors(errors) or (1 if failed else 0)
