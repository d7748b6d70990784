"""The evaluation loop: any predictor over a SegDataset -> one confusion matrix, resumable, sharded.

A predictor is a callable ``image (H, W, 3) uint8 ndarray -> labels (H, W) int tensor/ndarray`` (the
segmenter's ``predict(...).labels`` or, in tests, a fake). Decoding runs in DataLoader workers while the
predictor runs in the main process. Under torchrun each rank takes its round-robin share of the images
not yet done; the partial matrices are summed with all_reduce and rank 0 writes the result.

Cluster behaviour: rank 0 holds the work dir's lock for the whole run (a second run into the same job
folder stops at once, naming the holder); an interruption (Ctrl-C, or SIGTERM from a scheduler, which
the CLI turns into ``Terminated``) saves what each rank finished and says how many images were kept;
decoding workers die with the eval (``die_with_parent``); a sample that cannot be used stops the run
with one clean line naming the file, or with ``skip_bad`` is counted, listed and reported as it happens.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dapseg.data.dataset import Sample, SegDataset
from dapseg.data.io import DataError, write_label_png
from dapseg.eval import dist
from dapseg.eval.checkpoint import Checkpointer, State, check_fingerprint, ensure_writable
from dapseg.eval.metrics import Metrics, confusion_matrix, metrics_from_confusion
from dapseg.eval.report import dumps_json
from dapseg.eval.visual import save_comparison
from dapseg.files import atomic_write_text, resolve_inside
from dapseg.folder_lock import hold_folder
from dapseg.termination import Terminated
from dapseg.workers import die_with_parent

# image -> labels; a predictor with a ``name`` parameter also gets the sample's name (the key of
# precomputed region masks, see dapseg.masks.folder)
Predictor = Callable[..., "torch.Tensor | np.ndarray"]


@dataclass
class EvalResult:
    dataset: str
    classes: list[str]
    cm: torch.Tensor  # (C, C) int64, summed over all ranks and all runs
    n_images: int  # images in the evaluated set (after --limit)
    bad: dict[str, str] = field(default_factory=dict)  # skipped image name -> error
    seconds: float = 0.0  # wall time of this run's loop (resumed runs: this part only)
    settings: dict[str, Any] = field(default_factory=dict)
    # result.json could not be written ("cannot write <path>: <OS error>"); the metrics are still valid.
    # Reported rather than raised so that every rank returns and the caller can print the metrics first.
    write_errors: list[str] = field(default_factory=list)

    @property
    def metrics(self) -> Metrics:
        return metrics_from_confusion(self.cm)

    def to_dict(self) -> dict[str, Any]:
        m = self.metrics
        return {
            "dataset": self.dataset,
            **m.as_percent(),
            "n_images": self.n_images,
            "n_bad": len(self.bad),
            "bad": self.bad,
            "per_class": [
                {"class": c, "IoU": _pct(i), "Acc": _pct(a)}
                for c, i, a in zip(self.classes, m.iou, m.acc, strict=True)
            ],
            "seconds": round(self.seconds, 2),
            "settings": self.settings,
        }


def _pct(x: float) -> float | None:
    return round(100.0 * float(x), 2) if np.isfinite(x) else None


def _identity(sample: Sample) -> Sample:
    return sample


class _Capturing(Dataset):
    """The dataset as the workers read it: a bad sample comes back with ``error`` set, so that the main
    process decides (skip or stop) and reports one clean line instead of a worker traceback."""

    def __init__(self, dataset: SegDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Sample:
        return self.dataset.sample(index, capture_errors=True)


@dataclass
class RunOptions:
    num_workers: int = 2
    checkpoint_every: int = 20  # images per rank between checkpoints
    progress: bool = True
    save_pred: bool = False  # label PNGs under work_dir/pred
    show: int = 0  # comparison pictures for the first K images under work_dir/show
    desc: str | None = None


def evaluate(dataset: SegDataset, predictor: Predictor, work_dir: str | Path, settings: dict[str, Any],
             options: RunOptions | None = None, *, record_extra: dict[str, Any] | None = None,
             hold_lock: bool = True) -> EvalResult:
    """Evaluate (or finish evaluating) ``dataset`` in ``work_dir``; every rank returns the same result.

    ``result.json`` holds ``EvalResult.to_dict()`` plus ``record_extra``; if it cannot be written the
    result's ``write_errors`` says why (check it). An interruption saves progress and re-raises.
    ``hold_lock=False``: the caller already holds the folder (``hold_job_folder``).
    """
    opt = options or RunOptions()
    info = dist.current()
    work_dir = Path(work_dir)
    with contextlib.ExitStack() as held:
        if hold_lock:
            held.enter_context(hold_job_folder(work_dir))
        return _evaluate(dataset, predictor, work_dir, settings, opt, info, record_extra or {})


@contextlib.contextmanager
def hold_job_folder(work_dir: str | Path) -> Iterator[None]:
    """Rank 0 checks that ``work_dir`` is writable and holds its lock for the block; a refusal (another
    run holds it: ``FolderBusyError`` naming the holder) is raised on every rank, so none hangs."""
    info = dist.current()
    with contextlib.ExitStack() as held:
        def take() -> None:
            ensure_writable(Path(work_dir))
            held.enter_context(hold_folder(work_dir, "work dir"))

        _on_every_rank(take, info)
        yield


def _on_every_rank(setup: Callable[[], object], info: dist.DistInfo) -> object:
    """Run ``setup`` on rank 0; if it raises, every rank raises the same error (type and message)."""
    outcome: tuple[str, object] = ("ok", None)
    if info.is_main:
        try:
            outcome = ("ok", setup())
        except Exception as e:
            if not info.enabled:
                raise
            outcome = ("error", e)
    outcome = dist.broadcast_object(outcome, info)  # type: ignore[assignment]
    kind, value = outcome
    if kind == "error":
        raise value  # type: ignore[misc]
    return value


def _evaluate(dataset: SegDataset, predictor: Predictor, work_dir: Path, settings: dict[str, Any],
              opt: RunOptions, info: dist.DistInfo, record_extra: dict[str, Any]) -> EvalResult:
    spec = dataset.spec
    classes = spec.class_names()
    C = spec.num_classes
    ckpt = Checkpointer(work_dir, C, info.rank)

    # --- resume: rank 0 reads and consolidates, the others learn what is done
    def resume() -> tuple[State, list[int], int]:
        check_fingerprint(work_dir, settings, write=True)
        state, gen = ckpt.load()
        ckpt.consolidate(state, gen)
        return state, sorted(state.done), gen

    plan = _on_every_rank(resume, info)
    base = plan[0] if info.is_main else None  # type: ignore[index]
    done, gen = plan[1], plan[2]  # type: ignore[index]
    done_set = set(done)
    pending = [i for i in range(len(dataset)) if i not in done_set]
    mine = dist.shard(pending, info)

    part = State(torch.zeros(C, C, dtype=torch.long))
    base_cm = base.cm if base is not None else None
    t0 = time.perf_counter()
    saved = False
    try:
        _loop(dataset, predictor, mine, part, ckpt, gen, base_cm, opt, info, work_dir)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (Terminated): keep this rank's part, say so
        if part.done:
            ckpt.save_part(part, gen)
        saved = True
        _say_kept(e, part, len(done_set), len(dataset), work_dir, info)
        raise
    finally:
        if part.done and not saved:
            ckpt.save_part(part, gen)
    seconds = time.perf_counter() - t0

    # --- combine: this run's parts from every rank + what earlier runs finished
    new_cm = dist.all_reduce_sum(part.cm, info)
    bad_parts = dist.all_gather_objects(part.bad, info)
    result = None
    if info.is_main:
        assert base is not None
        cm = base.cm + new_cm
        bad = dict(base.bad)
        for b in bad_parts:
            bad.update(b)  # type: ignore[arg-type]
        result = EvalResult(spec.name, classes, cm, len(dataset),
                            {dataset.names[i]: msg for i, msg in sorted(bad.items())}, seconds, settings)
        try:
            atomic_write_text(work_dir / "result.json", dumps_json({**result.to_dict(), **record_extra}))
        except OSError as e:  # already "cannot write <path>: <OS error>"
            result.write_errors.append(str(e))
    result = dist.broadcast_object(result, info)
    return result  # type: ignore[return-value]


def _say_kept(e: KeyboardInterrupt, part: State, before: int, total: int, work_dir: Path,
              info: dist.DistInfo) -> None:
    why = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
    who = f"rank {info.rank}: " if info.enabled else ""
    others = ", not counting the other ranks" if info.enabled else ""
    print(f"{who}{why}: kept {len(part.done)} image(s) finished in this run ({before + len(part.done)} of "
          f"{total} done in all{others}) in {work_dir}; run the same command to resume",
          file=sys.stderr, flush=True)


def _takes_name(predictor: Predictor) -> bool:
    """Whether ``predictor`` accepts the image's name (``name=``)."""
    try:
        return "name" in inspect.signature(predictor).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False


def _loop(dataset: SegDataset, predictor: Predictor, indices: list[int], part: State, ckpt: Checkpointer,
          gen: int, base_cm: torch.Tensor | None, opt: RunOptions, info: dist.DistInfo,
          work_dir: Path) -> None:
    spec = dataset.spec
    if not indices:
        return
    loader = DataLoader(_Capturing(dataset), batch_size=None, sampler=indices, num_workers=opt.num_workers,
                        collate_fn=_identity, worker_init_fn=die_with_parent() if opt.num_workers else None)
    bar = tqdm(total=len(indices), desc=opt.desc or spec.name, unit="img", disable=not (opt.progress and
                                                                                       info.is_main))
    since_ckpt = 0
    takes_name = _takes_name(predictor)
    for sample in loader:
        if sample.error is not None:
            if not dataset.skip_bad:
                raise DataError(f"{sample.error} (--skip-bad counts and lists such images instead)")
            part.bad[sample.index] = sample.error
            part.done.add(sample.index)
            tqdm.write(f"skipped {sample.name}: {sample.error}", file=sys.stderr)
        else:
            named = {"name": sample.name} if takes_name else {}
            pred = _as_labels(predictor(sample.image, **named), sample, dataset)
            gt = torch.from_numpy(sample.label)
            part.cm += confusion_matrix(pred, gt, spec.num_classes, spec.ignore_index)
            part.done.add(sample.index)
            _write_outputs(sample, pred, opt, work_dir, spec.num_classes)
        since_ckpt += 1
        if since_ckpt >= opt.checkpoint_every:
            ckpt.save_part(part, gen)
            since_ckpt = 0
        bar.update(1)
        if info.is_main and bar.n % 5 == 1:
            running = part.cm + base_cm if base_cm is not None else part.cm
            bar.set_postfix(mIoU=f"{100 * metrics_from_confusion(running).miou:.2f}", refresh=False)
    bar.close()


def _as_labels(pred: Any, sample: Sample, dataset: SegDataset) -> torch.Tensor:
    pred = torch.as_tensor(np.asarray(pred) if not isinstance(pred, torch.Tensor) else pred).cpu()
    expected = sample.label.shape  # type: ignore[union-attr]
    if tuple(pred.shape) != tuple(expected):
        raise ValueError(f"predictor returned labels of shape {tuple(pred.shape)} for {sample.name} "
                         f"({expected[1]}x{expected[0]} image); expected {tuple(expected)}")
    return pred.long()


def _write_outputs(sample: Sample, pred: torch.Tensor, opt: RunOptions, work_dir: Path,
                   num_classes: int) -> None:
    # the image name was checked against the dataset's folders; the output must stay in the work dir too
    what = f"output for image {sample.name!r}"
    if opt.save_pred:
        write_label_png(resolve_inside(work_dir, f"pred/{sample.name}.png", what=what), pred.numpy())
    if opt.show and sample.index < opt.show:
        save_comparison(resolve_inside(work_dir, f"show/{sample.name}.jpg", what=what), sample.image,
                        sample.label, pred.numpy(), num_classes)
