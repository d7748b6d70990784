"""Where a preset's time goes: torch.profiler over one prediction (after a warm-up).

Full-size models with random weights (time does not depend on the weights), scikit-image's
'chelsea' photo (300x451, short side 336 -> 336x505: three 336-px windows at stride 112).
Prints the ops by self CPU time and the share of the total.

    python benchmarks/profile_preset.py --preset proxyclip [--rows 25] [--device cpu]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("dapseg") is None:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402
from skimage import data  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from dapseg import Segmenter  # noqa: E402
from dapseg.bench.runner import DEFAULT_CLASSES as CLASSES  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="proxyclip")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    from dapseg.config import parse_override

    overrides = dict(parse_override(t) for t in args.overrides)
    seg = Segmenter.from_preset(args.preset, device=args.device, random_weights=True, overrides=overrides)
    image = data.chelsea()
    seg.predict(image, CLASSES)  # warm-up (text embeddings cached)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with profile(activities=activities) as prof, record_function("predict"):
        seg.predict(image, CLASSES)
    sort = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    print(f"{args.preset} on {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows))


if __name__ == "__main__":
    main()
