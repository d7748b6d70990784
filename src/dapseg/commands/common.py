"""Command-line flags shared by every command that builds a model."""

from __future__ import annotations

import argparse
from typing import Any

from dapseg.api import Segmenter, with_weight_files
from dapseg.config import SegmenterConfig, load_config_file, load_preset, parse_override


def add_model_args(
    parser: argparse.ArgumentParser, default_preset: str | None = None, preset_note: str = "required"
) -> None:
    """``preset_note`` says in --help what happens without --preset (e.g. "default: dap")."""
    g = parser.add_argument_group("model")
    g.add_argument("--preset", default=default_preset, help=f"method preset ({preset_note}); "
                   "`dapseg presets` lists them")
    g.add_argument("--config", help="a YAML/TOML config file (may say `base: <preset>`); overrides --preset")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set inference.stride=112 --set rho=0.25 (repeatable)")
    g.add_argument("--plugin", dest="plugins", action="append", default=[], metavar="NAME",
                   help="add a registered plug-in to the preset's head (`dapseg presets --components` lists them)")
    g.add_argument("--fsa", action="store_true", help="add the FSA feedback plug-in (same as --plugin fsa)")
    add_machine_args(g)
    g.add_argument("--sam-weights", default=None, help="local SAM weights: the official sam_vit_*.pth file")
    g.add_argument("--masks-dir", default=None, metavar="DIR",
                   help="precomputed region masks, <DIR>/<image name>.npz (CorrCLIP's `instance_mask`) or "
                   ".png; short for --set masks.name=folder --set masks.params.root=DIR")


def add_machine_args(g: argparse._ArgumentGroup) -> None:
    """Device, random/tiny models, the weights cache and local CLIP / VFM weight files."""
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--random-weights", action="store_true",
                   help="build the same architectures with random weights (offline smoke mode)")
    g.add_argument("--tiny", action="store_true", help="with --random-weights: tiny models (tests)")
    g.add_argument("--cache-dir", default=None, help="weights cache (default: $DAPSEG_CACHE or ~/.cache/dapseg)")
    g.add_argument("--clip-weights", default=None, help="local CLIP weights: OpenAI .pt or open_clip .bin/.safetensors")
    g.add_argument("--vfm-weights", default=None,
                   help="local VFM weights: the official DINO/DINOv2/MAE/SAM file, or an SD diffusers folder")


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    overrides = dict(parse_override(text) for text in args.overrides)
    for name in [*getattr(args, "plugins", []), *(["fsa"] if args.fsa else [])]:
        overrides[f"plugins.{name}.enabled"] = True
    if getattr(args, "masks_dir", None):
        overrides["masks"] = {"name": "folder", "params": {"root": args.masks_dir}}
    return overrides


def config_from_args(args: argparse.Namespace) -> SegmenterConfig:
    overrides = overrides_from_args(args)
    if args.config:
        config = load_config_file(args.config, overrides)
    else:
        if not args.preset:
            raise ValueError("give --preset NAME or --config FILE")
        config = load_preset(args.preset, overrides)
    return with_weight_files(config, args.clip_weights, args.vfm_weights, args.sam_weights)


def build_segmenter(args: argparse.Namespace) -> Segmenter:
    if args.tiny and not args.random_weights:
        raise ValueError("--tiny needs --random-weights")
    return Segmenter(
        config_from_args(args),
        device=args.device,
        random_weights=args.random_weights,
        tiny=args.tiny,
        cache_dir=args.cache_dir,
    )
