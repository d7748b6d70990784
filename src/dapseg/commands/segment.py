"""`dapseg segment`: label every pixel of images with a list of class names (torchrun-ready, resumable)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dapseg.commands.common import add_model_args, add_threads_arg, apply_threads, build_segmenter, config_from_args
from dapseg.commands.evalkit import setup_distributed
from dapseg.config import default_preset
from dapseg.labeling.inputs import Input, collect_inputs
from dapseg.labeling.job import MANIFEST
from dapseg.labeling.outputs import DEFAULT_SAVE, SUFFIXES, parse_save
from dapseg.labeling.run import LabelingJob, Summary, label_collection
from dapseg.text import ClassSet


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("segment", help="segment images into the given classes (torchrun-ready, resumable)")
    p.add_argument("inputs", nargs="*", help="image files, folders and glob patterns")
    c = p.add_mutually_exclusive_group(required=True)
    c.add_argument("--classes", help='classes separated by ",", synonyms by ";" (e.g. "horse, sky; clouds")')
    c.add_argument("--classes-file", help="one class per line, synonyms separated by '; '")
    p.add_argument("--out", default="out", help="output directory (default: out/); outputs mirror the "
                   "inputs' paths, a rerun skips the images already done")
    g = p.add_argument_group("labeling")
    g.add_argument("--input-list", metavar="FILE", help="one image path per line ('-': stdin), relative to "
                   "--input-root or absolute inside it")
    g.add_argument("--input-root", metavar="DIR", help="the folder the --input-list paths are relative to "
                   "and that outputs mirror (default: the list's folder; the current folder for stdin)")
    g.add_argument("--recursive", action="store_true", help="also the images in sub-folders of a folder")
    g.add_argument("--save", default=",".join(DEFAULT_SAVE),
                   help=f"what to write per image, comma-separated from {', '.join(SUFFIXES)} "
                   f"(default: {','.join(DEFAULT_SAVE)})")
    g.add_argument("--unlabeled-classes", metavar="NAMES", default="",
                   help="classes of the list whose pixels are left unlabeled, comma-separated (e.g. a "
                   "'background' class added to absorb what is none of the others); pixels below "
                   "postprocess.prob_thd are always left unlabeled")
    g.add_argument("--workers", type=int, default=2, help="decoding processes per rank (default: 2; 0: a thread)")
    g.add_argument("--overwrite", action="store_true",
                   help="redo every image, also where OUT holds labels of other settings")
    add_threads_arg(g)
    add_model_args(p, default_preset=None, preset_note="default: dap, or naclip where dap is absent")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if not args.inputs and not args.input_list:
        raise ValueError("give images, folders or globs, or --input-list FILE")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    apply_threads(args.threads)
    classes = ClassSet.from_file(args.classes_file) if args.classes_file else ClassSet.parse(args.classes)
    classes = classes.leave_unlabeled([n for n in args.unlabeled_classes.split(",") if n.strip()])
    save = parse_save(args.save)
    if not args.preset and not args.config:
        args.preset = default_preset()
    config = config_from_args(args)  # settings errors before anything else
    out = Path(args.out)
    info = setup_distributed(args)
    settings = {"config": config.model_dump(mode="json"), "classes": classes.names,
                "unlabeled_classes": [classes.names[i] for i in classes.unlabeled_classes], "save": list(save),
                "random_weights": bool(args.random_weights), "tiny": bool(args.tiny)}
    job = LabelingJob(out, classes, save, settings, extra={"preset": config.name}, workers=args.workers,
                      overwrite=args.overwrite,
                      progress=sys.stderr.isatty() or "DAPSEG_PROGRESS" in os.environ)

    def find_inputs() -> list[Input]:
        found = collect_inputs(args.inputs, recursive=args.recursive, input_list=args.input_list,
                               input_root=args.input_root, exclude=out)
        if not found:
            raise FileNotFoundError(f"no images found in {' '.join(args.inputs or [args.input_list])}")
        return found

    summary = label_collection(job, find_inputs, lambda: build_segmenter(args), info)
    under_torchrun = info.world_size > 1 or "TORCHELASTIC_RUN_ID" in os.environ
    if info.is_main:
        report(summary, out, brief=under_torchrun)
    # Images that failed are listed in the manifest; under torchrun a non-zero exit of the ranks would
    # only add torch's multi-page ChildFailedError report to the line that says how many failed.
    return 1 if summary.failed and not under_torchrun else 0


def report(summary: Summary, out: Path, brief: bool = False) -> None:
    """The run's summary line; the failed images one per line, or (``brief``) one line saying how many."""
    print(f"segmented {summary.done + summary.skipped}/{summary.total} images into {out}/: "
          f"{summary.done} done, {summary.skipped} skipped (done before), {len(summary.failed)} failed")
    if summary.failed and brief:
        print(f"{len(summary.failed)} image(s) failed; each is a line with \"status\": \"failed\" and its error "
              f"in {out / MANIFEST} (a rerun retries them)", file=sys.stderr)
    elif summary.failed:
        print(f"{len(summary.failed)} failed:", file=sys.stderr)
        for path, msg in summary.failed:
            print(f"  {path}: {msg}", file=sys.stderr)
