"""Write ``golden_logits.npz``: the logits of a fixed set of presets, to catch unintended changes.

Each case is a preset on tiny random-weight models (seeded, so it repeats) segmenting a small real photo
from ``skimage.data``. The file is a *regression* fixture: it records what the code did when it was
written, so that a refactor or a speed-up that should not change any number is checked against it
(``tests/test_golden_logits.py``, tolerance 1e-5). When a change is *meant* to move a preset's numbers
(a fidelity fix), regenerate only that preset and say so in the commit message:

    PYTHONPATH=src python tests/golden/make_golden.py --only trident dap-splice
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "golden_logits.npz"
CLASSES = ["cup", "table; desk", "wall", "person"]

# preset -> overrides. Small windows keep the whole file to a few seconds of CPU time.
SMALL = {"inference.short_side": 112, "inference.crop": 96, "inference.stride": 64}
CASES: dict[str, dict] = {
    "clip": SMALL,
    "maskclip": SMALL,
    "sclip": SMALL,
    "naclip": SMALL,
    "naclip-pamr": SMALL,
    "naclip-fsa": SMALL,
    "proxyclip": SMALL,
    "proxyclip-fsa": SMALL,
    "proxyclip-dinov2_vitb14": SMALL,
    "proxyclip-mae_vitb16": SMALL,
    "proxyclip-sam_vitb": SMALL,
    "dap": SMALL,
    "dap-kmeans-knn": {**SMALL, "head.params.regions": "kmeans", "head.params.knn": 24, "head.params.steps": 2},
    "trident": {"inference.short_side": 112},
    "dap-splice": {"inference.short_side": 112},
}


def image() -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.coffee()[::8, ::8])  # (50, 75, 3) uint8: non-square, odd sizes


# The splice cases hold affinity entries within float noise of their thresholds (C > ε, A >= 0), so a
# different summation order (another thread count) flips a few of them and moves some logits by
# ~2e-5. The fixture is recorded and checked with this many threads, whatever the machine has.
THREADS = 2


def compute(name: str) -> np.ndarray:
    """(Q, H, W) float32 logits of case ``name`` at the photo's resolution, computed on THREADS threads."""
    import torch

    from dapseg.api import Segmenter

    preset = "dap" if name == "dap-kmeans-knn" else name
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        seg = Segmenter.from_preset(preset, random_weights=True, tiny=True, device="cpu", overrides=CASES[name])
        return seg.predict(image(), CLASSES).logits.numpy().astype(np.float32)
    finally:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=sorted(CASES), help="regenerate only these cases")
    args = ap.parse_args(argv)
    names = args.only or sorted(CASES)
    stored = dict(np.load(GOLDEN)) if GOLDEN.exists() else {}
    for name in names:
        stored[name] = compute(name)
        print(f"{name}: {stored[name].shape}", file=sys.stderr)
    tmp = GOLDEN.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **stored)
    tmp.replace(GOLDEN)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
