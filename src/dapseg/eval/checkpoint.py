"""Resumable evaluation state in a work directory.

Files (all written atomically: temp file + rename):
  fingerprint.json          the settings that produced the partial results; a different one -> error
  state-base.pt             {gen, cm, done, bad}: everything finished before generation ``gen`` started
  state-g<gen>-r<rank>.pt   what rank ``rank`` finished during generation ``gen`` (its own cm part)

Rank 0 reads the base and every part with gen >= base gen, sums them, folds them into a new base of
generation max+1, deletes the old parts, and tells the other ranks which images are done. Parts older
than the base are ignored, so a crash between writing the base and deleting the parts never counts
anything twice, and a run resumed with a different number of processes still sums to the right matrix.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dapseg.files import atomic_write, atomic_write_text

_PART = re.compile(r"state-g(\d+)-r(\d+)\.pt$")


class SettingsChangedError(RuntimeError):
    """The work dir holds partial results of different settings."""


@dataclass
class State:
    cm: torch.Tensor  # (C, C) int64
    done: set[int] = field(default_factory=set)
    bad: dict[int, str] = field(default_factory=dict)  # index -> error message (--skip-bad)

    def merge(self, other: State) -> None:
        overlap = self.done & other.done
        if overlap:
            raise RuntimeError(f"checkpoint parts overlap on {len(overlap)} image(s); work dir is corrupt")
        self.cm += other.cm
        self.done |= other.done
        self.bad.update(other.bad)

    def to_dict(self, gen: int) -> dict[str, Any]:
        return {"gen": gen, "cm": self.cm.cpu(), "done": sorted(self.done), "bad": dict(self.bad)}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> State:
        return State(cm=d["cm"].long(), done=set(d["done"]), bad={int(k): v for k, v in d["bad"].items()})


def fingerprint(settings: dict[str, Any]) -> str:
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def ensure_writable(path: Path, what: str = "work dir") -> None:
    """Create ``path`` and prove it is writable, before any compute starts (``what`` names it in the error)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"{what} {path} is not writable: {e.strerror or e}") from e


def check_fingerprint(work_dir: Path, settings: dict[str, Any], *, write: bool) -> None:
    """Error if ``work_dir`` holds results of other settings; record ours (when ``write``)."""
    path = work_dir / "fingerprint.json"
    fp = fingerprint(settings)
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old.get("fingerprint") != fp:
            diff = _diff(old.get("settings", {}), json.loads(json.dumps(settings, default=str)))
            raise SettingsChangedError(
                f"work dir {work_dir} holds partial results of different settings ({'; '.join(diff[:8])}). "
                "Use a new --work-dir, or delete this one to start over."
            )
        return
    if write:
        atomic_write_text(path, json.dumps({"fingerprint": fp, "settings": settings}, indent=2, default=str))


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            out += _diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


class Checkpointer:
    def __init__(self, work_dir: Path, num_classes: int, rank: int) -> None:
        self.dir = work_dir
        self.num_classes = num_classes
        self.rank = rank
        self.gen = 0

    def _empty(self) -> State:
        return State(torch.zeros(self.num_classes, self.num_classes, dtype=torch.long))

    def load(self) -> tuple[State, int]:
        """(everything finished so far, next generation number)."""
        state, base_gen = self._empty(), 0
        base = self.dir / "state-base.pt"
        if base.exists():
            d = torch.load(base, map_location="cpu", weights_only=False)
            state, base_gen = State.from_dict(d), int(d["gen"])
        max_gen = base_gen
        for p in sorted(self.dir.glob("state-g*-r*.pt")):
            m = _PART.search(p.name)
            if m is None:
                continue
            gen = int(m.group(1))
            max_gen = max(max_gen, gen)
            if gen >= base_gen:
                state.merge(State.from_dict(torch.load(p, map_location="cpu", weights_only=False)))
        if state.cm.shape != (self.num_classes, self.num_classes):
            raise SettingsChangedError(f"{self.dir}: checkpoint has {state.cm.shape[0]} classes, "
                                       f"expected {self.num_classes}")
        return state, max_gen + 1

    def consolidate(self, state: State, gen: int) -> None:
        """Rank 0: fold everything into the base of generation ``gen``; drop older parts."""
        _atomic_torch_save(state.to_dict(gen), self.dir / "state-base.pt")
        for p in self.dir.glob("state-g*-r*.pt"):
            m = _PART.search(p.name)
            if m is not None and int(m.group(1)) < gen:
                p.unlink(missing_ok=True)

    def save_part(self, part: State, gen: int) -> None:
        _atomic_torch_save(part.to_dict(gen), self.dir / f"state-g{gen}-r{self.rank}.pt")
