"""`dapseg analyze`: how coherent is each affinity? CLIP's last-block attentions and VFM feature
cosines scored as classifiers of "these two patches share a label" (PR curves, AP; ProxyCLIP Fig. 1).

    dapseg analyze --dataset voc21 --data-root data --vfm dino_vitb8 --vfm sam_vitb --limit 20 --out analysis
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from dapseg.commands.common import add_machine_args
from dapseg.data.spec import list_datasets

DEFAULT_PRESET = "proxyclip"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="PR curves and AP of patch affinities (CLIP attention, VFM features) "
                       "against ground-truth labels: which VFM suits your images")
    p.add_argument("--dataset", required=True,
                   help=f"dataset name ({', '.join(list_datasets())}) or a dataset YAML file")
    p.add_argument("--data-root", required=True, help="folder holding the dataset (as for `dapseg eval`)")
    p.add_argument("--vfm", dest="vfms", action="append", default=[], metavar="NAME",
                   help="a VFM whose feature cosine to score (repeatable), e.g. dino_vitb8, dinov2_vitb14, "
                   "mae_vitb16, sam_vitb, sd15 (an unknown name lists them all; default: the preset's VFM)")
    p.add_argument("--out", required=True, help="output folder: pr_curves.png, ap.md, ap.csv, ap.json")
    p.add_argument("--limit", type=int, default=None, help="only the first N images (sorted by name)")
    p.add_argument("--preset", default=DEFAULT_PRESET,
                   help=f"the preset giving the CLIP model and the window size (default: {DEFAULT_PRESET})")
    p.add_argument("--window", type=int, default=None,
                   help="side of the centred square window per image, after resizing the short side to it "
                   "(default: the preset's sliding-window size on this dataset, 336 for proxyclip)")
    p.add_argument("--bins", type=int, default=1000, help="score bins over [-1, 1] (default 1000)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes for decoding")
    p.add_argument("--skip-bad", action="store_true", help="skip and list unreadable images")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_machine_args(p.add_argument_group("models"))
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from dapseg.analysis.report import FILES, output_path, require_analyze_extras
    from dapseg.commands.evalkit import setup_distributed
    from dapseg.eval import dist
    from dapseg.eval.checkpoint import ensure_writable
    from dapseg.folder_lock import hold_folder

    require_analyze_extras()  # before any work
    plan = _plan(args)
    for name in FILES.values():
        output_path(args.out, name)  # an output that would land outside --out is refused before any work
    ensure_writable(Path(args.out), "--out")

    info = setup_distributed(args)  # each rank on its own GPU (LOCAL_RANK) when on CUDA
    if args.device is not None:
        plan["device"] = torch.device(args.device)
    # rank 0 holds --out for the whole run: a second run on the same folder stops at once
    with hold_folder(args.out, "--out") if info.is_main else nullcontext():
        result = _analyze(args, plan)
        if info.is_main:
            _report(args, plan, result, info.world_size)
    dist.barrier(info)
    return 0


def _report(args: argparse.Namespace, plan: dict[str, Any], result: Any, world_size: int) -> None:
    from dapseg.analysis.report import write_analysis
    from dapseg.eval.provenance import provenance

    settings = {**plan["settings"], "provenance": provenance(plan["device"], None, world_size)}
    paths = write_analysis(args.out, result, settings, note=_note(args))
    for r in result.sources:
        ap, chance = r.hist.average_precision(), r.hist.positive_rate()
        print(f"{r.info.label:<40} AP {100 * ap:6.2f}   chance {100 * chance:6.2f}")
    if result.bad:
        print(f"skipped {len(result.bad)} unreadable image(s): {', '.join(result.bad)}")
    print(f"{result.n_images} images; results: {paths['md']} (also .csv, .json), curves: {paths['png']}")


def _plan(args: argparse.Namespace) -> dict[str, Any]:
    """Validate every argument and resolve the settings before any model is built."""
    from dapseg.config import load_preset
    from dapseg.data.spec import load_dataset_spec
    from dapseg.models.vfm import vfm_spec

    if args.tiny and not args.random_weights:
        raise ValueError("--tiny needs --random-weights")
    if args.bins < 2:
        raise ValueError(f"--bins must be >= 2, got {args.bins}")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    spec = load_dataset_spec(args.dataset)
    config = load_preset(args.preset, spec.overrides_for(args.preset))
    vfms = list(dict.fromkeys(args.vfms)) or ([config.vfm.name] if config.vfm is not None else [])
    for name in vfms:
        vfm_spec(name)  # an unknown name fails here, listing the valid ones
    if args.vfm_weights is not None and len(vfms) != 1:
        raise ValueError(f"--vfm-weights needs exactly one --vfm (got {len(vfms)})")
    window = args.window if args.window is not None else config.inference.crop
    if window < 1:
        raise ValueError(f"--window must be >= 1, got {window}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    settings = {"dataset": spec.name, "data_root": str(args.data_root), "limit": args.limit, "preset": args.preset,
                "clip": {"model": config.clip.model, "pretrained": config.clip.pretrained,
                         "weights": args.clip_weights},
                "vfms": vfms, "vfm_weights": args.vfm_weights, "window": window, "bins": args.bins,
                "random_weights": bool(args.random_weights), "tiny": bool(args.tiny)}
    return {"spec": spec, "config": config, "vfms": vfms, "window": window, "device": device,
            "settings": settings}


def _analyze(args: argparse.Namespace, plan: dict[str, Any]):  # -> AnalysisResult
    from dapseg.analysis.run import AnalysisOptions, analyze
    from dapseg.data.dataset import SegDataset

    dataset = SegDataset(plan["spec"], args.data_root, limit=args.limit, skip_bad=args.skip_bad)
    sources = build_sources(args, plan)
    options = AnalysisOptions(window=plan["window"], bins=args.bins, num_workers=args.workers,
                              progress=not args.no_progress, device=plan["device"])
    return analyze(dataset, sources, options)


def build_sources(args: argparse.Namespace, plan: dict[str, Any]) -> list:
    """CLIP's four attentions, then one cosine source per VFM. Random weights are seeded (each model
    alike whichever others are built, and on every rank), leaving the caller's RNG untouched."""
    from dapseg.analysis.sources import ClipAttention, VfmCosine
    from dapseg.config import VfmConfig
    from dapseg.models.clip import build_clip
    from dapseg.models.vfm import build_vfm

    device, window, config = plan["device"], plan["window"], plan["config"]
    clip_cfg = config.clip.model_copy(update={"weights": args.clip_weights}) if args.clip_weights else config.clip
    with torch.random.fork_rng(devices=[], enabled=args.random_weights):
        torch.manual_seed(0)
        clip = ClipAttention(build_clip(clip_cfg, random_weights=args.random_weights, tiny=args.tiny,
                                        cache_dir=args.cache_dir, device=device))
        clip.check_window(window)
        sources: list = [clip]
        for name in plan["vfms"]:
            torch.manual_seed(0)
            # the preset's own VFM keeps its family params (vfm.params); any other: the family's defaults
            cfg = config.vfm if config.vfm is not None and config.vfm.name == name else VfmConfig(name=name)
            if args.vfm_weights is not None:
                cfg = cfg.model_copy(update={"weights": Path(args.vfm_weights)})
            vfm = build_vfm(cfg, random_weights=args.random_weights, tiny=args.tiny, cache_dir=args.cache_dir,
                            window_size=window, device=device)
            sources.append(VfmCosine(vfm))
    return sources


def _note(args: argparse.Namespace) -> str | None:
    if args.random_weights:
        return "**Random weights** (--random-weights): these numbers measure nothing about the models."
    return None
