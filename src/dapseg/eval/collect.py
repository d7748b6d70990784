"""The finished jobs of a work dir: every ``<job>/<dataset>/result.json``, read back as untrusted JSON.

The top-level tables (``results.*``, ``sweep.*``) are the union of every finished job in the work dir,
not only the jobs of the run that writes them: two runs with different presets into one work dir both
end up in the table, whichever finishes last. A result file that is not a valid record is left out
and named in a warning; it never stops the tables.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from filelock import FileLock

from dapseg.files import read_json

TABLES_LOCK_NAME = ".dapseg.tables.lock"
RESULT_NAME = "result.json"
_MAX_BYTES = 64 * 1024 * 1024  # a result record is kilobytes; anything this large is not one


def _number_or_null(x: object) -> bool:
    return x is None or (isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x))


def check_record(rec: object) -> str | None:
    """Why ``rec`` is not a usable result record (None if it is)."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    for key in ("preset", "dataset"):
        if not isinstance(rec.get(key), str) or not rec[key]:
            return f"{key!r} missing or not a string"
    for key in ("mIoU", "mAcc", "aAcc"):
        if key not in rec or not _number_or_null(rec[key]):
            return f"{key!r} missing or not a number"
    for key in ("n_images", "n_bad"):
        if not isinstance(rec.get(key), int) or isinstance(rec[key], bool) or rec[key] < 0:
            return f"{key!r} missing or not a count"
    per_class = rec.get("per_class")
    if not isinstance(per_class, list) or not all(
            isinstance(c, dict) and isinstance(c.get("class"), str) and _number_or_null(c.get("IoU"))
            and _number_or_null(c.get("Acc")) for c in per_class):
        return "'per_class' missing or malformed"
    if "sweep" in rec and not isinstance(rec["sweep"], dict):
        return "'sweep' is not an object"
    return None


def read_record(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(record, None) or (None, why it cannot be used)."""
    try:
        if path.stat().st_size > _MAX_BYTES:
            return None, "too large to be a result record"
        rec = read_json(path)
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None, str(e)
    why = check_record(rec)
    return (None, why) if why else (rec, None)


def finished_records(work_dir: str | Path, current: list[dict[str, Any]], *, sweep: bool = False
                     ) -> tuple[list[dict[str, Any]], list[str]]:
    """(records, warnings): ``current`` (this run's records, in order) then every other finished job
    found at ``<work_dir>/*/*/result.json``, sorted by path. ``sweep`` picks sweep records (those with
    a ``sweep`` entry) instead of plain evaluations; a job this run also produced is taken from
    ``current``."""
    work_dir = Path(work_dir)
    records = list(current)
    seen = {_key(r) for r in current}
    warnings: list[str] = []
    for path in sorted(work_dir.glob(f"*/*/{RESULT_NAME}")):
        if path.is_symlink() or not path.is_file():
            continue
        rec, why = read_record(path)
        if rec is None:
            warnings.append(f"left out of the tables: {path} ({why})")
            continue
        if ("sweep" in rec) != sweep or _key(rec) in seen:
            continue
        seen.add(_key(rec))
        records.append(rec)
    return records, warnings


def _key(rec: dict[str, Any]) -> tuple[str, str, str]:
    return rec["preset"], rec["dataset"], json.dumps(rec.get("sweep"), sort_keys=True, default=str)


def tables_lock(work_dir: str | Path, timeout: float = 300.0) -> FileLock:
    """Held while reading the finished jobs and writing the top-level tables, so that two runs
    finishing together cannot each write a table that misses the other's job. Writing tables takes
    seconds, so the second run waits (up to ``timeout``) rather than stops."""
    return FileLock(str(Path(work_dir) / TABLES_LOCK_NAME), timeout=timeout)
