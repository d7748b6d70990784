"""`dapseg presets`: list the method presets, or show one fully resolved; `--components` lists the
registered heads, inference modes, refiners, plug-ins and VFM families (what a config may name)."""

from __future__ import annotations

import argparse

import yaml

from dapseg.config import list_presets, load_preset
from dapseg.registry import all_registries


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("presets", help="list method presets or show one")
    p.add_argument("name", nargs="?", help="show this preset's resolved settings")
    p.add_argument("--components", action="store_true",
                   help="list the registered components a config can name, with their parameters")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.name:
        print(yaml.safe_dump(load_preset(args.name).model_dump(mode="json"), sort_keys=False))
        return 0
    if getattr(args, "components", False):
        for kind, registry in all_registries().items():
            print(f"{kind}:")
            for name in registry.names():
                entry = registry.get(name)
                params = ", ".join(entry.params.model_fields) if entry.params is not None else "-"
                print(f"  {name:20s} {entry.description}  [params: {params}]")
        return 0
    for name in list_presets():
        print(f"{name:28s} {load_preset(name).description}")
    return 0
