"""`dapseg export`: a labeling job's labels as a COCO, CVAT, FiftyOne or Label Studio dataset."""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

from dapseg.labeling.export import export
from dapseg.labeling.formats import FORMATS, LOCAL_FILES, write_fiftyone, write_labelstudio


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="a `dapseg segment` job's labels as a dataset for COCO, CVAT, FiftyOne "
                       "or Label Studio")
    p.add_argument("job", metavar="JOB_DIR", help="the --out folder of `dapseg segment` (finished or not)")
    p.add_argument("--format", required=True, choices=list(FORMATS), help="coco: annotations.json; cvat: "
                   "Segmentation mask 1.1; fiftyone: ImageSegmentationDirectory; labelstudio: tasks.json")
    p.add_argument("--out", required=True, metavar="DEST", help="a new (or empty) folder; for cvat a .zip "
                   "name writes the zip CVAT uploads")
    p.add_argument("--overwrite", action="store_true", help="replace DEST if it holds anything")
    p.add_argument("--image-prefix", default=LOCAL_FILES, metavar="URL",
                   help="labelstudio: what precedes an image's path under its input root in the task's URL "
                   f"(default {LOCAL_FILES!r}: Label Studio's local files, its document root = the input root)")
    p.add_argument("--image-root", metavar="DIR", help="fiftyone: the folder the images' names are relative to "
                   "(default: where the job read them); each must be the image of its labels' size")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    write = FORMATS[args.format]
    if args.format == "labelstudio":
        write = partial(write_labelstudio, image_prefix=args.image_prefix)
    elif args.image_prefix != LOCAL_FILES:
        raise ValueError("--image-prefix applies to --format labelstudio only")
    if args.format == "fiftyone":
        write = partial(write_fiftyone, image_root=Path(args.image_root) if args.image_root else None)
    elif args.image_root is not None:
        raise ValueError("--image-root applies to --format fiftyone only (the others do not copy images)")
    if args.out.endswith(".zip") and args.format != "cvat":
        raise ValueError(f"--out {args.out}: only --format cvat writes a zip; give a folder")
    job, count = export(args.job, write, args.out, overwrite=args.overwrite)
    note = f"; {job.failed} image(s) failed in the job and are not exported" if job.failed else ""
    print(f"exported {count} image(s) of {args.job} as {args.format} into {args.out}{note}")
    if job.failed:
        print(f"{job.failed} failed image(s) are listed in {args.job}/manifest.jsonl", file=sys.stderr)
    return 0
