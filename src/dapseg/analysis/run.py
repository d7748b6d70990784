"""The analysis loop: images -> windows -> patch labels per grid -> pair counts per source.

Each image contributes every ordered pair (i, j), i ≠ j, of its labelled patches (patches whose
majority is "ignore" are dropped). Pairs are scored and counted a block of rows at a time, so
memory stays bounded whatever the grid (3.1 M pairs per image for a 42×42 grid). Under torchrun each
rank takes its round-robin share of the images and the histograms are summed across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from dapseg.analysis.histogram import PairHistogram
from dapseg.analysis.labels import DROPPED, center_window, patch_labels
from dapseg.analysis.sources import Affinity, AffinitySource, SourceInfo
from dapseg.data.dataset import Sample, SegDataset
from dapseg.eval import dist
from dapseg.inference.preprocess import to_tensor01
from dapseg.workers import die_with_parent

PAIRS_PER_BLOCK = 1 << 22  # scores held at once (16 MiB of float32)


@dataclass
class AnalysisOptions:
    window: int = 336  # side of the analysed window (px)
    bins: int = 1000  # score bins over [-1, 1]
    num_workers: int = 0  # DataLoader processes decoding images
    progress: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


@dataclass
class SourceResult:
    info: SourceInfo
    hist: PairHistogram
    grid: tuple[int, int] | None = None  # None: no image reached this source
    patches: int = 0  # labelled patches, summed over images


@dataclass
class AnalysisResult:
    dataset: str
    n_images: int  # images analysed (unreadable ones excluded)
    bad: dict[str, str]  # skipped image name -> why
    sources: list[SourceResult]


def count_pairs(hist: PairHistogram, a: Affinity, labels: torch.Tensor) -> int:
    """Add the ordered pairs (i ≠ j) of labelled patches to ``hist``; returns the labelled patches."""
    labels = labels.to(a.rows.device)
    keep = labels != DROPPED
    rows, cols, lab = a.rows[keep], a.cols[keep], labels[keep]
    n = int(lab.numel())
    if n < 2:
        return n
    step = max(1, PAIRS_PER_BLOCK // n)
    col_index = torch.arange(n, device=lab.device)
    for start in range(0, n, step):
        scores = rows[start : start + step] @ cols.t()  # (m, n)
        same = lab[start : start + step, None] == lab[None, :]
        off_diagonal = col_index[start : start + step, None] != col_index[None, :]
        hist.add(scores[off_diagonal], same[off_diagonal])
    return n


def _identity(sample: Sample) -> Sample:
    return sample


def analyze(dataset: SegDataset, sources: list[AffinitySource], options: AnalysisOptions) -> AnalysisResult:
    """Count the pairs of ``dataset``'s windows for every source; every rank returns the summed result."""
    info = dist.current()
    spec = dataset.spec
    results = [SourceResult(i, PairHistogram.empty(options.bins)) for src in sources for i in src.infos()]
    by_key = {r.info.key: r for r in results}
    if len(by_key) != len(results):
        raise ValueError(f"two sources share a name: {[r.info.key for r in results]}")
    bad: dict[str, str] = {}
    done = 0
    mine = dist.shard(list(range(len(dataset))), info)
    loader = DataLoader(dataset, batch_size=None, sampler=mine, num_workers=options.num_workers,
                        collate_fn=_identity, worker_init_fn=die_with_parent())
    bar = tqdm(total=len(mine), desc=f"analyze {spec.name}", unit="img", disable=not (options.progress and
                                                                                    info.is_main))
    for sample in loader:
        bar.update(1)
        if sample.error is not None:
            bad[sample.name] = sample.error
            continue
        image, label = center_window(sample.image, sample.label, options.window)
        window01 = to_tensor01(image)[None].to(options.device)  # (1, 3, S, S)
        label_t = torch.from_numpy(label)
        done += 1
        cached: dict[tuple, torch.Tensor] = {}  # patch labels per (grid, cell): CLIP's four share one
        for src in sources:
            for a in src(window01):
                geometry = (a.grid, a.cell)
                if geometry not in cached:
                    cached[geometry] = patch_labels(label_t, a.grid, a.cell, spec.num_classes, spec.ignore_index)
                r = by_key[a.info.key]
                r.grid = a.grid
                r.patches += count_pairs(r.hist, a, cached[geometry])
    bar.close()
    return _combine(spec.name, results, done, bad, info)


def _combine(name: str, results: list[SourceResult], done: int, bad: dict[str, str],
             info: dist.DistInfo) -> AnalysisResult:
    """Sum the counts of every rank (histograms, patches) and collect grids and unreadable images."""
    counts = torch.stack([torch.stack([r.hist.pos, r.hist.neg]) for r in results])  # (sources, 2, bins)
    counts = dist.all_reduce_sum(counts, info)
    patches = dist.all_reduce_sum(torch.tensor([r.patches for r in results], dtype=torch.long), info)
    grids = dist.all_gather_objects([r.grid for r in results], info)
    bads = dist.all_gather_objects(bad, info)
    all_bad = {k: v for part in bads for k, v in part.items()}  # type: ignore[union-attr]
    n_images = int(dist.all_reduce_sum(torch.tensor([done], dtype=torch.long), info)[0])
    out = []
    for s, r in enumerate(results):
        grid = next((g[s] for g in grids if g[s] is not None), None)  # type: ignore[index]
        out.append(SourceResult(r.info, PairHistogram(counts[s, 0].clone(), counts[s, 1].clone()),
                                tuple(grid) if grid is not None else None, int(patches[s])))
    return AnalysisResult(name, n_images, dict(sorted(all_bad.items())), out)
