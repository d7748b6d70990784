"""`dapseg download PRESET...`: fill the weights cache for offline machines."""

from __future__ import annotations

import argparse

from dapseg.api import Segmenter
from dapseg.config import load_preset


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("download", help="download the weights of presets into the cache directory")
    p.add_argument("presets", nargs="+", help="preset names (`dapseg presets` lists them)")
    p.add_argument("--cache-dir", default=None, help="weights cache (default: $DAPSEG_CACHE or ~/.cache/dapseg)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    configs = [load_preset(name) for name in args.presets]  # validate every name before downloading
    for config in configs:
        print(f"{config.name}: fetching weights ...")
        # Building the models downloads whatever is not cached yet (on CPU, then discarded).
        Segmenter(config, device="cpu", cache_dir=args.cache_dir)
        print(f"{config.name}: ready")
    return 0
