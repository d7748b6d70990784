"""`dapseg sweep`: every combination of a settings grid on one dataset, sorted by mIoU; resumable."""

from __future__ import annotations

import argparse

from dapseg.commands.common import add_model_args, overrides_from_args
from dapseg.commands.evalkit import (
    SegmenterFactory,
    add_run_args,
    job_dir,
    preset_names,
    run_options,
    setup_distributed,
)
from dapseg.config import load_config_file, load_preset
from dapseg.data.spec import load_dataset_spec
from dapseg.eval import dist
from dapseg.eval.checkpoint import ensure_writable
from dapseg.eval.harness import Job, run_job
from dapseg.eval.report import dumps_json, markdown_table, require_eval_extras, write_xlsx
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
    rows = []
    for k, combo in enumerate(combos, 1):
        if info.is_main:
            print(f"[{k}/{len(combos)}] {combo_slug(combo)}")
        job = Job(preset, spec, args.data_root, job_dir(args.work_dir, combo_slug(combo), spec.name),
                  {**user, **combo}, limit=args.limit, skip_bad=args.skip_bad)
        record = run_job(job, factory, opts)
        rows.append({**combo, "mIoU": record["mIoU"], "mAcc": record["mAcc"], "aAcc": record["aAcc"],
                     "n_images": record["n_images"], "_record": record})
    if info.is_main:
        import pandas as pd

        table = pd.DataFrame([{k: v for k, v in r.items() if k != "_record"} for r in rows])
        table = table.sort_values("mIoU", ascending=False, kind="stable", na_position="last")
        out = job_dir(args.work_dir)
        atomic_write_text(out / "sweep.csv", table.to_csv(index=False))
        md = (f"# dapseg sweep: {preset} on {spec.name}\n\nGrid: `{' '.join(args.grid)}`"
              f"{', first ' + str(args.limit) + ' images' if args.limit else ''}; sorted by mIoU.\n\n"
              + markdown_table(table.astype({c: str for c in axes}), index=False))
        atomic_write_text(out / "sweep.md", md)
        write_xlsx(out / "sweep.xlsx", {"sweep": table.set_index(list(axes))})
        atomic_write_text(out / "sweep.json", dumps_json({"preset": preset, "dataset": spec.name,
                                                          "grid": axes, "results": [r["_record"] for r in rows]}))
        print(md)
    dist.barrier(info)
    return 0
