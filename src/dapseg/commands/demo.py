"""`dapseg demo`: serve the interactive web demo (Gradio) on this machine."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dapseg.commands.common import add_model_args, config_from_args
from dapseg.config import SegmenterConfig, default_preset, list_presets, load_preset


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="serve the interactive web demo in the browser (Gradio)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; "
                   "0.0.0.0 opens the demo to the network)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    add_model_args(p, default_preset=None, preset_note="default: dap, or naclip where dap is absent")
    p.set_defaults(run=run)


def _same_model(a: Any, b: Any, field: str) -> bool:
    return a is not None and b is not None and getattr(a, field) == getattr(b, field)


def weights_for(config: SegmenterConfig, initial: SegmenterConfig) -> SegmenterConfig:
    """``config`` with the local weight files of ``initial`` wherever it uses the same model
    (a --clip-weights file for ViT-B/16 must not be loaded into a ViT-L/14 preset)."""
    overrides: dict[str, Any] = {}
    if initial.clip.weights and config.clip.model == initial.clip.model:
        overrides["clip.weights"] = str(initial.clip.weights)
    for key in ("vfm", "sam"):
        mine, theirs = getattr(config, key), getattr(initial, key)
        if _same_model(mine, theirs, "name") and theirs.weights:
            overrides[f"{key}.weights"] = str(theirs.weights)
    return config.with_overrides(overrides)


def make_catalog(args: argparse.Namespace) -> Any:
    """Every preset, plus a --config file as its own entry; the command line's --set/--fsa and
    weight files apply to the starting entry (weight files also to presets of the same models)."""
    from dapseg.demo import Catalog

    names = list_presets()
    if args.config:
        initial = f"{Path(args.config).stem} (config)"
        names.insert(0, initial)
    else:
        initial = args.preset or default_preset(names)
        args.preset = initial
    if initial not in names:
        raise ValueError(f"unknown preset {initial!r}; valid presets: {', '.join(names)}")
    initial_config = config_from_args(args)

    def resolve(name: str) -> SegmenterConfig:
        if name == initial:
            return initial_config
        return weights_for(load_preset(name), initial_config)

    return Catalog(names, resolve, initial)


def run(args: argparse.Namespace) -> int:
    if args.tiny and not args.random_weights:
        raise ValueError("--tiny needs --random-weights")
    try:
        import gradio  # noqa: F401
    except ImportError as e:
        raise RuntimeError("the web demo needs Gradio: pip install 'dapseg[demo]'") from e
    from dapseg.api import Segmenter
    from dapseg.demo import serve
    from dapseg.images import check_pixels_before_pillow

    check_pixels_before_pillow()  # an oversized upload gets dapseg's clear refusal, not Gradio's error

    catalog = make_catalog(args)

    def build(name: str) -> Segmenter:
        return Segmenter(catalog.resolve(name), device=args.device, random_weights=args.random_weights,
                         tiny=args.tiny, cache_dir=args.cache_dir)

    mode = " (tiny random weights)" if args.tiny else " (random weights)" if args.random_weights else ""
    serve(catalog, build, host=args.host, port=args.port, description=mode)
    return 0
