"""`dapseg bench`: parameters, matmul FLOPs, speed, peak memory and stage times of presets.

    dapseg bench --preset proxyclip --preset dap --preset naclip --preset trident --random-weights
"""

from __future__ import annotations

import argparse
import json

import torch

from dapseg.config import parse_override

DEFAULT_PRESETS = ["proxyclip", "dap", "naclip", "trident"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="efficiency table: params, GFLOPs, images/s, memory, stage times")
    p.add_argument("--preset", dest="presets", action="append", default=[], metavar="NAME",
                   help=f"preset to measure (repeatable; default: {', '.join(DEFAULT_PRESETS)})")
    p.add_argument("--image", default=None,
                   help="image to segment (default: scikit-image's 'chelsea' photo, 300x451)")
    c = p.add_mutually_exclusive_group()
    c.add_argument("--classes", default=None, help='classes separated by "," (default: 8 indoor classes)')
    c.add_argument("--classes-file", default=None,
                   help="one class per line, e.g. a benchmark's list (847 ADE classes for FSA's worst case)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting in every preset, e.g. --set inference.max_batch=4")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--random-weights", action="store_true",
                   help="random weights of the same architectures (speed does not depend on the weights)")
    p.add_argument("--tiny", action="store_true", help="with --random-weights: tiny models (smoke test)")
    p.add_argument("--cache-dir", default=None, help="weights cache (default: $DAPSEG_CACHE or ~/.cache/dapseg)")
    p.add_argument("--warmup", type=int, default=1, help="untimed predictions first (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed predictions per setting (default 3)")
    p.add_argument("--no-batching-comparison", dest="compare_batching", action="store_false",
                   help="skip the one-window-at-a-time runs")
    p.add_argument("--no-flops", dest="count_flops", action="store_false",
                   help="skip the FLOP-counting run")
    p.add_argument("--precision", default=None, metavar="LIST",
                   help="inference.precision settings to bench each preset at, side by side, e.g. fp32,bf16 "
                        "(auto, fp32, bf16, fp16; default: the preset's own)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--probe-size", type=int, default=1024, help="matrix side of the matmul-rate probe")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the full report as JSON")
    p.set_defaults(run=run)


def load_bench_image(path: str | None):  # -> np.ndarray (H, W, 3) uint8
    from dapseg.images import load_image

    if path is None:
        from skimage import data

        return load_image(data.chelsea())
    return load_image(path)


def parse_precisions(text: str | None) -> tuple[str, ...]:
    """"fp32,bf16" -> ("fp32", "bf16"); an unknown name is an error naming --precision."""
    from dapseg.precision import PRECISIONS

    if text is None:
        return ()
    names = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    bad = [n for n in names if n not in PRECISIONS]
    if not names or bad:
        raise ValueError(f"--precision {text!r}: give one or more of {', '.join(PRECISIONS)}, separated by commas")
    return names


def run(args: argparse.Namespace) -> int:
    from dapseg.bench.runner import DEFAULT_CLASSES, BenchSettings, run_bench
    from dapseg.bench.table import format_report
    from dapseg.config import list_presets
    from dapseg.files import atomic_write_text
    from dapseg.text import ClassSet

    if args.tiny and not args.random_weights:
        raise ValueError("--tiny needs --random-weights")
    presets = args.presets or DEFAULT_PRESETS
    known = set(list_presets())
    unknown = [p for p in presets if p not in known]
    if unknown:
        raise ValueError(f"unknown preset(s) {', '.join(unknown)}; `dapseg presets` lists them")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.classes_file:
        classes = ClassSet.from_file(args.classes_file)
    elif args.classes:
        classes = ClassSet.parse(args.classes)
    else:
        classes = DEFAULT_CLASSES  # run_bench coerces
    settings = BenchSettings(
        device=args.device,
        random_weights=args.random_weights,
        tiny=args.tiny,
        warmup=args.warmup,
        repeats=args.repeats,
        compare_batching=args.compare_batching,
        count_flops=args.count_flops,
        overrides=dict(parse_override(text) for text in args.overrides),
        cache_dir=args.cache_dir,
        precisions=parse_precisions(args.precision),
    )
    image = load_bench_image(args.image)
    report = run_bench(presets, image, classes, settings, probe_size=args.probe_size)
    print(format_report(report))
    if args.json:
        path = atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
        print(f"report written to {path}")
    return 0
