"""The labeling loop: plan on rank 0, label each rank's round-robin share, merge the manifest.

Order of work, so that mistakes cost nothing: rank 0 checks the out dir (writable, same settings),
collects the inputs and their output names (a clash is an error) and reads which images are done;
only then is the model built (not at all when nothing is left), and rank 0 takes the out dir's lock,
records the settings and lets every rank start. Each image's files are renamed into place before its
journal line (its completion marker) is appended, so a killed job redoes at most the images in
flight, and a rank that fails loses none of the others' work.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dapseg.api import Segmenter
from dapseg.decoding import decode_ahead
from dapseg.eval import dist
from dapseg.folder_lock import hold_folder
from dapseg.labeling import job as state
from dapseg.labeling.inputs import Input
from dapseg.labeling.outputs import check_unique_outputs, write_outputs
from dapseg.text import ClassSet


@dataclass(frozen=True)
class LabelingJob:
    out: Path
    classes: ClassSet
    save: tuple[str, ...]  # output kinds (dapseg.labeling.outputs.SUFFIXES)
    settings: dict[str, Any]  # recorded in OUT; a rerun must match (config, classes, save)
    extra: dict[str, Any] = field(default_factory=dict)  # added to each image's JSON summary
    workers: int = 2  # DataLoader decoding processes per rank
    overwrite: bool = False
    progress: bool = True


@dataclass
class Summary:
    total: int  # images of this run's inputs
    done: int  # labeled by this run
    skipped: int  # already done before
    failed: list[tuple[str, str]]  # (input, error), this run


@dataclass(frozen=True)
class _Plan:
    total: int
    pending: list[Input]
    known: bool  # OUT records these settings (its journals count)


def label_collection(job: LabelingJob, find_inputs: Callable[[], list[Input]],
                     build_segmenter: Callable[[], Segmenter], info: dist.DistInfo) -> Summary:
    """Label ``find_inputs()`` into ``job.out``; every rank returns the same summary."""
    plan = dist.on_main(lambda: _plan(job, find_inputs), info)
    segmenter = build_segmenter() if plan.pending else None
    with ExitStack() as held:
        start = dist.on_main(lambda: _claim(job, plan, held), info)
        mine = dist.shard(plan.pending, info)
        progress = _Progress(job.out, info, len(plan.pending), job.progress and info.is_main, start)
        try:
            done, failed = _label_share(segmenter, job, mine, info.rank, progress) if mine else (0, [])
            parts = dist.all_gather_objects((done, failed), info)  # every rank has finished here
            progress.finish(sum(p[0] + len(p[1]) for p in parts))  # type: ignore[index]
        finally:
            progress.close()
        if info.is_main:
            records, _ = state.read_records(job.out)
            state.write_manifest(job.out, records)
        dist.barrier(info)  # the manifest is written before any rank returns
    done = sum(p[0] for p in parts)  # type: ignore[index]
    failures = [f for p in parts for f in p[1]]  # type: ignore[index]
    return Summary(plan.total, done, plan.total - len(plan.pending), failures)


def _plan(job: LabelingJob, find_inputs: Callable[[], list[Input]]) -> _Plan:
    state.check_writable(job.out)
    known = False if job.overwrite else state.check_settings(job.out, job.settings)
    inputs = find_inputs()
    check_unique_outputs(inputs, job.save, state.is_reserved)
    done: set[str] = set()
    if known:
        records, _ = state.read_records(job.out)
        done = {name for name, rec in records.items() if rec.status == "done"}
    return _Plan(len(inputs), [i for i in inputs if i.rel not in done], known)


def _claim(job: LabelingJob, plan: _Plan, held: ExitStack) -> dict[Path, int]:
    """Rank 0: lock OUT for the run, record the settings (forgetting other settings' work); returns
    the journals' sizes before any rank writes (for the progress bar)."""
    held.enter_context(hold_folder(job.out, "out dir"))
    if not plan.known:
        state.clear(job.out)
        state.record_settings(job.out, job.settings)
    return {p: p.stat().st_size for p in state.journal_paths(job.out)}


def _label_share(segmenter: Segmenter | None, job: LabelingJob, mine: list[Input], rank: int,
                 progress: _Progress) -> tuple[int, list[tuple[str, str]]]:
    assert segmenter is not None  # built whenever anything is pending
    journal = state.Journal(job.out, rank)
    done, failed = 0, []
    try:
        for item in decode_ahead([i.source for i in mine], workers=job.workers, ahead=2):
            image = mine[item.index]
            t0 = time.perf_counter()
            try:
                if item.error is not None:
                    raise item.error
                result = segmenter.predict(item.image, job.classes, name=image.stem)  # the mirrored name
                outputs = write_outputs(result, job.out, image, job.save, job.extra)
                record = state.Record(name=image.rel, input=str(image.source), outputs=outputs, status="done",
                                      seconds=round(time.perf_counter() - t0, 3), pixel_share=result.pixel_shares())
                done += 1
            except (OSError, ValueError, RuntimeError) as e:  # one bad image must not lose the others
                record = state.Record(name=image.rel, input=str(image.source), outputs=[], status="failed",
                                      error=str(e), seconds=round(time.perf_counter() - t0, 3))
                failed.append((str(image.source), str(e)))
            journal.append(record)  # the completion marker, after the files
            progress.step()
    finally:
        journal.close()
    return done, failed


class _Progress:
    """One bar on rank 0 for the whole job: with several ranks it counts the lines every rank appended
    to its journal since the start (the out dir is shared by all ranks, also across nodes)."""

    def __init__(self, out: Path, info: dist.DistInfo, total: int, enabled: bool, start: dict[Path, int]) -> None:
        self.world = info.world_size
        self.journals = [out / state.JOURNALS / f"rank-{r}.jsonl" for r in range(self.world)]
        self.offsets = {p: start.get(p, 0) for p in self.journals}
        self.lines = 0
        self.last = 0.0
        self.bar = tqdm(total=total, desc="segment", unit="img", disable=not enabled)

    def step(self) -> None:
        if self.bar.disable:
            return
        if self.world == 1:
            self.bar.update(1)
            return
        now = time.monotonic()
        if now - self.last >= 0.5:
            self.last = now
            self.lines += sum(self._new_lines(p) for p in self.journals)
            self.bar.update(min(self.lines, self.bar.total) - self.bar.n)

    def _new_lines(self, path: Path) -> int:
        try:
            with open(path, "rb") as f:
                f.seek(self.offsets[path])
                chunk = f.read()
        except OSError:  # that rank has not written yet
            return 0
        self.offsets[path] += len(chunk)
        return chunk.count(b"\n")

    def finish(self, count: int) -> None:
        self.bar.update(count - self.bar.n)

    def close(self) -> None:
        self.bar.close()
