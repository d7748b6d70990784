"""Resumable evaluation state in a work directory.

Files (all written atomically: temp file + rename):
  fingerprint.json          the settings that produced the partial results; a different one -> error
  state-base.pt             {gen, cm, done, bad}: everything finished before generation ``gen`` started
  state-g<gen>-r<rank>.pt   what rank ``rank`` finished during generation ``gen`` (its own cm part)

Rank 0 reads the base and every part with gen >= base gen, sums them, folds them into a new base of
generation max+1, deletes the old parts, and tells the other ranks which images are done. Parts older
than the base are ignored, so a crash between writing the base and deleting the parts never counts
anything twice, and a run resumed with a different number of processes still sums to the right matrix.

Work dirs are shared and copied between machines, so every file here is untrusted when read back:
checkpoints are loaded with ``weights_only=True`` (plain tensors, ints, strings, lists and dicts; a
pickle that would run code is refused) and validated (keys, types, shapes, dtype, values, class count)
before use; a bad file raises ``CorruptCheckpointError`` naming it and saying how to recover.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dapseg.files import atomic_write_bytes, atomic_write_text, read_json

_PART = re.compile(r"state-g(\d+)-r(\d+)\.pt$")


class SettingsChangedError(RuntimeError):
    """The work dir holds partial results of different settings."""


class CorruptCheckpointError(RuntimeError):
    """A checkpoint or fingerprint file in the work dir cannot be used; the message names it."""


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


_KEYS = {"gen", "cm", "done", "bad"}


def validate_state(d: object, num_classes: int) -> None:
    """Raise ValueError saying what is wrong unless ``d`` is what ``State.to_dict`` writes for
    ``num_classes`` classes: {gen: int >= 0, cm: (C, C) int64 >= 0, done: [int >= 0], bad: {int: str}}."""
    if not isinstance(d, dict) or set(d) != _KEYS:
        keys = sorted(map(str, d)) if isinstance(d, dict) else type(d).__name__
        raise ValueError(f"expected the keys {sorted(_KEYS)}, found {keys}")
    if not _is_int(d["gen"]) or d["gen"] < 0:
        raise ValueError(f"gen must be an integer >= 0, found {d['gen']!r}")
    cm = d["cm"]
    if not isinstance(cm, torch.Tensor) or cm.dtype != torch.int64:
        raise ValueError(f"cm must be an int64 tensor, found {getattr(cm, 'dtype', type(cm).__name__)}")
    if tuple(cm.shape) != (num_classes, num_classes):
        raise ValueError(f"cm has shape {tuple(cm.shape)}: a matrix of {cm.shape[0] if cm.ndim else 0} "
                         f"classes, this dataset has {num_classes}")
    if cm.numel() and int(cm.min()) < 0:
        raise ValueError("cm has negative counts")
    done = d["done"]
    if not isinstance(done, list) or not all(_is_int(i) and i >= 0 for i in done) or len(set(done)) != len(done):
        raise ValueError("done must be a list of distinct image indices >= 0")
    bad = d["bad"]
    if not isinstance(bad, dict) or not all(_is_int(k) and isinstance(v, str) for k, v in bad.items()):
        raise ValueError("bad must map image indices to messages")
    if not set(bad) <= set(done):
        raise ValueError("bad lists images that are not done")


def _first_line(e: BaseException) -> str:
    """The telling line of a (often long) torch error: the refused global if named, else the first."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    telling = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else type(e).__name__)
    return telling[:300]


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def fingerprint(settings: dict[str, Any]) -> str:
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _atomic_torch_save(obj: Any, path: Path) -> None:
    # Serialised in memory first: torch's own file writer reports a full disk or a file-size limit as
    # "enforce fail at inline_container.cc"; a Python write raises the OSError (ENOSPC, EFBIG) that
    # atomic_write turns into "cannot write <path>: <reason>".
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


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
        try:
            old = read_json(path)
            if not isinstance(old, dict) or not isinstance(old.get("settings", {}), dict):
                raise ValueError("not a fingerprint object")
        except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise CorruptCheckpointError(
                f"{path} cannot be used ({e}); delete the work dir {work_dir} to start over") from e
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
            d = self._read(base, f"delete the work dir {self.dir} to start over")
            state, base_gen = State.from_dict(d), int(d["gen"])
        max_gen = base_gen
        for p in sorted(self.dir.glob("state-g*-r*.pt")):
            m = _PART.search(p.name)
            if m is None:
                continue
            gen = int(m.group(1))
            max_gen = max(max_gen, gen)
            if gen >= base_gen:
                state.merge(State.from_dict(self._read(p, "delete that file: the images it holds are computed "
                                                          "again on the next run")))
        return state, max_gen + 1

    def _read(self, path: Path, recover: str) -> dict[str, Any]:
        """A checkpoint file, loaded without running code and validated; else CorruptCheckpointError."""
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
            validate_state(d, self.num_classes)
        except pickle.UnpicklingError as e:  # torch's text suggests weights_only=False: not for a work dir
            raise CorruptCheckpointError(
                f"checkpoint {path} holds Python objects other than tensors, numbers and strings; it was not "
                f"loaded, since loading it could run code ({_first_line(e)}); {recover}") from e
        except Exception as e:  # a torn zip, an OS error, a wrong shape: all name the file
            reason = _first_line(e)
            raise CorruptCheckpointError(f"checkpoint {path} cannot be used ({reason}); {recover}") from e
        return d

    def consolidate(self, state: State, gen: int) -> None:
        """Rank 0: fold everything into the base of generation ``gen``; drop older parts."""
        _atomic_torch_save(state.to_dict(gen), self.dir / "state-base.pt")
        for p in self.dir.glob("state-g*-r*.pt"):
            m = _PART.search(p.name)
            if m is not None and int(m.group(1)) < gen:
                p.unlink(missing_ok=True)

    def save_part(self, part: State, gen: int) -> None:
        _atomic_torch_save(part.to_dict(gen), self.dir / f"state-g{gen}-r{self.rank}.pt")
