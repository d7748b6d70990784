"""`dapseg convert`: make the label layouts the readers expect (idempotent; --force to overwrite)."""

from __future__ import annotations

import argparse

from dapseg.data.convert import CONVERTERS, convert


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert dataset labels (coco-object, coco-stuff, cityscapes)")
    p.add_argument("kind", choices=list(CONVERTERS),
                   help="; ".join(f"{c.name}: {c.description}" for c in CONVERTERS.values()))
    p.add_argument("root", help="dataset folder (coco_stuff164k/ with annotations/, or cityscapes/ with gtFine/)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs that differ")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    report = convert(args.kind, args.root, force=args.force, progress=not args.no_progress)
    print(f"{args.kind}: {report.summary()}")
    return 0
