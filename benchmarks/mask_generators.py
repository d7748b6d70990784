"""Time and peak memory of each region-mask generator per image (full-size architectures).

    python benchmarks/mask_generators.py --random-weights sam2 mask2former eomt sam

Each generator is built once (timed), run ``--warmup`` times, then ``--repeats`` timed runs on the
same photo (scikit-image's 'chelsea', 300x451, by default). Peak memory is CUDA's allocator peak, or
the process's peak RSS on CPU (then it includes everything loaded before, e.g. torch). With random
weights the automatic generators keep few masks, so their post-processing is lighter than with the
release weights: the numbers are the models' cost, a lower bound of the whole generator's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dapseg.bench.memory import peak_memory_mib, reset_peak_memory
from dapseg.bench.param_count import count_params
from dapseg.commands.bench import load_bench_image
from dapseg.masks.base import MaskBuild, build_mask_generator


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("generators", nargs="+")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--image", default=None)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--set", dest="params", action="append", default=[], metavar="GEN.KEY=VALUE",
                   help="a generator parameter, e.g. sam2.points_per_side=32")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    image = load_bench_image(args.image)
    device = torch.device(args.device)
    overrides: dict[str, dict] = {}
    for text in args.params:
        key, value = text.split("=", 1)
        gen, field = key.split(".", 1)
        overrides.setdefault(gen, {})[field] = int(value) if value.isdigit() else value
    print(f"image {image.shape[0]}x{image.shape[1]}, device {device}, threads {torch.get_num_threads()}")
    print("| generator | params (M) | build (s) | per image (s, median) | peak memory (MiB) | regions |")
    print("|---|---|---|---|---|---|")
    for name in args.generators:
        torch.manual_seed(0)
        t0 = time.perf_counter()
        gen = build_mask_generator(name, overrides.get(name, {}),
                                   MaskBuild(device, random_weights=args.random_weights))
        built = time.perf_counter() - t0
        model = getattr(gen, "model", None)
        params = count_params(model) / 1e6 if isinstance(model, torch.nn.Module) else 0.0
        for _ in range(args.warmup):
            gen(image, name="bench")
        reset_peak_memory(device)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            region_map = gen(image, name="bench")
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        peak = peak_memory_mib(device)
        print(f"| {name} | {params:.0f} | {built:.1f} | {statistics.median(times):.2f} | {peak:.0f} | "
              f"{len(region_map.unique())} |", flush=True)
        del gen, model


if __name__ == "__main__":
    main()
