"""`dapseg sweep`: every combination of a settings grid on one dataset, sorted by mIoU; resumable.

The sweep tables list every finished combination of this preset and dataset in the work dir (earlier
sweeps with other grids included; their missing axes are blank)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dapseg.commands.common import add_model_args, overrides_from_args
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
from dapseg.config import load_config_file, load_preset
from dapseg.data.spec import load_dataset_spec
from dapseg.eval import dist
from dapseg.eval.checkpoint import ensure_writable
from dapseg.eval.harness import Job, run_job
from dapseg.eval.report import dumps_json, markdown_table, require_eval_extras, write_each, write_xlsx
from dapseg.eval.sweep import combinations, combo_slug, parse_grid
from dapseg.files import atomic_write_text


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="evaluate every combination of a settings grid (sorted by mIoU)")
    p.add_argument("--dataset", required=True, help="dataset name or YAML file")
    p.add_argument("--grid", action="append", required=True,
                   help='axes "key=v1,v2 key2=a,b" (dotted or bare setting names); repeatable')
    add_run_args(p, default_work_dir="work_dirs/sweep")
    add_model_args(p, default_preset=None)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    require_eval_extras()  # before any work: the result tables need the `eval` extra
    spec = load_dataset_spec(args.dataset)
    (preset,) = preset_names(args)
    axes = parse_grid(args.grid)
    combos = combinations(axes)
    user = overrides_from_args(args)
    for combo in combos:  # every combination must be a valid config before anything runs
        over = {**spec.overrides_for(preset), **user, **combo}
        load_config_file(args.config, over) if args.config else load_preset(preset, over)
    opts = run_options(args)
    ensure_writable(job_dir(args.work_dir))
    info = setup_distributed(args)
    factory = SegmenterFactory(args)
    records, errors = [], []
    for k, combo in enumerate(combos, 1):
        if info.is_main:
            print(f"[{k}/{len(combos)}] {combo_slug(combo)}")
        job = Job(preset, spec, args.data_root, job_dir(args.work_dir, combo_slug(combo), spec.name),
                  {**user, **combo}, limit=args.limit, skip_bad=args.skip_bad, sweep=combo)
        record = run_job(job, factory, opts)
        if info.is_main:
            errors += print_job(record)
        records.append(record)
    if info.is_main:
        import pandas as pd  # the `eval` extra, checked before any work

        out = job_dir(args.work_dir)

        def write(every: list[dict[str, Any]]) -> dict[str, Path]:
            mine = [r for r in every if r["preset"] == preset and r["dataset"] == spec.name]
            keys = list(dict.fromkeys([*axes, *(k for r in mine for k in r["sweep"])]))
            table = pd.DataFrame([{**{k: r["sweep"].get(k, "") for k in keys}, "mIoU": r["mIoU"],
                                   "mAcc": r["mAcc"], "aAcc": r["aAcc"], "n_images": r["n_images"]} for r in mine])
            table = table.sort_values("mIoU", ascending=False, kind="stable", na_position="last")
            md = (f"# dapseg sweep: {preset} on {spec.name}\n\nGrid: `{' '.join(args.grid)}`"
                  f"{', first ' + str(args.limit) + ' images' if args.limit else ''}; every finished combination "
                  f"in the work dir, sorted by mIoU.\n\n" + markdown_table(table.astype({c: str for c in keys}),
                                                                          index=False))
            print(md)
            payload = {"preset": preset, "dataset": spec.name, "grid": axes, "results": mine}
            return write_each({
                "csv": (out / "sweep.csv", lambda p: atomic_write_text(p, table.to_csv(index=False))),
                "md": (out / "sweep.md", lambda p: atomic_write_text(p, md)),
                "xlsx": (out / "sweep.xlsx", lambda p: write_xlsx(p, {"sweep": table.set_index(keys)})),
                "json": (out / "sweep.json", lambda p: atomic_write_text(p, dumps_json(payload))),
            })

        _, table_errors = write_tables(args.work_dir, records, write, sweep=True)
        errors += table_errors
    dist.barrier(info)
    return report_errors(errors)
