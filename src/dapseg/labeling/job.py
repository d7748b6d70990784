"""The state of a labeling job in its out dir.

  labeling-job.json              the settings (config, class list, --save); a rerun with others stops
  .dapseg/journal/rank-<R>.jsonl one line per image rank R finished (done or failed): the completion
                                 marker, appended only after the image's files were renamed into place
  manifest.jsonl                 every image's latest line, sorted by name, merged at the end of a run

A journal is append-only (rewriting it per image would cost O(images²) over a million images); a
line cut short by ``kill -9`` does not parse and is ignored, so that image is simply done again.
Everything read back is untrusted: JSON validated by pydantic, never code.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from dapseg.files import atomic_write_text, open_append_in_place, read_json, refuse_links

JOB_FILE = "labeling-job.json"
MANIFEST = "manifest.jsonl"
STATE_DIR = ".dapseg"
JOURNALS = f"{STATE_DIR}/journal"


def is_reserved(name: str) -> bool:
    """Whether an output name would land on one of the job's own files."""
    return name in (JOB_FILE, MANIFEST) or name.split("/")[0].startswith(STATE_DIR)


class Record(BaseModel):
    """One image of the job, as a manifest line."""

    model_config = ConfigDict(extra="forbid")
    name: str  # the input's path relative to its input root: the key
    input: str  # the file that was read
    outputs: list[str]  # paths relative to OUT
    status: Literal["done", "failed"]
    error: str | None = None
    seconds: float  # segmenting and writing (decoding overlaps the previous image)
    pixel_share: dict[str, float] | None = None
    unlabeled_share: float | None = None  # pixels left unlabeled (below prob_thd, or an unlabeled class)


class SettingsChangedError(ValueError):
    """The out dir holds labels made with other settings."""


def check_own_files(out: Path) -> None:
    """The job's own folders and files in OUT (state folder, journals, settings, manifest) must not be
    symlinks: a planted link would lead the writes (or --overwrite's deletions) out of OUT."""
    journals = [f"{JOURNALS}/{p.name}" for p in (out / JOURNALS).glob("rank-*.jsonl")] \
        if (out / JOURNALS).is_dir() and not (out / STATE_DIR).is_symlink() else []
    refuse_links(out, [JOURNALS, JOB_FILE, MANIFEST, *journals], what="out dir")


def check_writable(out: Path) -> None:
    """Fail early (before any model is built) where ``out`` cannot be written. Creates nothing: a run
    that fails before its first image leaves no empty folder."""
    existing = out
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{existing} is not a directory")
        if existing == out:
            with tempfile.NamedTemporaryFile(dir=out, prefix=".dapseg-write-test"):
                pass
        elif not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, f"cannot create folders in {existing}")
    except OSError as e:
        raise PermissionError(f"output directory {out} is not writable: {e.strerror or e}") from e


def check_settings(out: Path, settings: dict[str, Any]) -> bool:
    """True where ``out`` records these settings, False where it records none; a different record is
    a ``SettingsChangedError`` naming what changed."""
    path = out / JOB_FILE
    if not path.exists():
        return False
    try:
        old = read_json(path)
        if not isinstance(old, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise SettingsChangedError(f"cannot use {path} ({e}); delete it or rerun with --overwrite to start "
                                   "over") from e
    new = json.loads(json.dumps(settings))  # as it would read back
    if old == new:
        return True
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    raise SettingsChangedError(
        f"{out} holds labels made with other settings (changed: {', '.join(changed)}; see {path}); rerun "
        "with the same settings, choose another --out, or add --overwrite to redo every image")


def record_settings(out: Path, settings: dict[str, Any]) -> None:
    atomic_write_text(out / JOB_FILE, json.dumps(settings, indent=2, sort_keys=True))


def clear(out: Path) -> None:
    """--overwrite: forget every finished image (the outputs are overwritten as they are redone)."""
    for path in (out / JOURNALS).glob("rank-*.jsonl"):
        path.unlink()
    (out / MANIFEST).unlink(missing_ok=True)


def journal_paths(out: Path) -> list[Path]:
    return sorted((out / JOURNALS).glob("rank-*.jsonl"))


class Journal:
    """Rank ``rank``'s journal, opened on the first line written."""

    def __init__(self, out: Path, rank: int) -> None:
        self.out = out
        self.path = out / JOURNALS / f"rank-{rank}.jsonl"
        self._file: Any = None

    def append(self, record: Record) -> None:
        if self._file is None:
            refuse_links(self.out, [JOURNALS], what="out dir")  # .dapseg and its journal folder: real folders
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # kept open for the run (closed by close()); a symlink at the journal itself is refused
            self._file = os.fdopen(open_append_in_place(self.path), "ab")
            if self._file.tell() and not _ends_with_newline(self.path):
                self._file.write(b"\n")  # end a line cut short by a kill, so ours stays whole
        self._file.write(record.model_dump_json().encode("utf-8") + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())  # the marker survives a node crash once the image counts as done

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def read_records(out: Path, accept: Callable[[Record], bool] | None = None) -> tuple[dict[str, Record], int]:
    """Every image's record from all journals (a done line beats a failed one), and the number of
    lines that did not parse (cut short by a kill, or damaged). With ``accept``, a line it rejects (a
    name that is not an input of this job, outputs other than the input's) counts as not parsed."""
    records: dict[str, Record] = {}
    bad = 0
    for path in journal_paths(out):
        with open(path, "rb") as f:
            for line in f:
                try:
                    rec = Record.model_validate_json(line)
                    if accept is not None and not accept(rec):
                        raise ValueError("not a line of this job")
                except (ValidationError, ValueError):
                    bad += line.strip() != b""
                    continue
                old = records.get(rec.name)
                if old is None or old.status != "done":
                    records[rec.name] = rec
    return records, bad


def manifest_text(records: dict[str, Record]) -> str:
    return "".join(records[name].model_dump_json() + "\n" for name in sorted(records))


def write_manifest(out: Path, records: dict[str, Record]) -> bool:
    """Write OUT/manifest.jsonl unless it already says exactly this; True where it was written."""
    text = manifest_text(records)
    path = out / MANIFEST
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    atomic_write_text(path, text)
    return True
