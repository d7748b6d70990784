"""`dapseg presets`: list the method presets, or show one fully resolved."""

from __future__ import annotations

import argparse

import yaml

from dapseg.config import list_presets, load_preset


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("presets", help="list method presets or show one")
    p.add_argument("name", nargs="?", help="show this preset's resolved settings")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.name:
        print(yaml.safe_dump(load_preset(args.name).model_dump(mode="json"), sort_keys=False))
        return 0
    for name in list_presets():
        print(f"{name:28s} {load_preset(name).description}")
    return 0
