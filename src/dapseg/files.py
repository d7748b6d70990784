"""Writing files atomically: the one place that does it (results, caches, checkpoints, downloads).

A file is written under a temporary name in its own folder and renamed over the target only once
complete, so a reader never sees half a file and an interrupted run leaves the old file intact.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def temp_path(path: Path) -> Path:
    """A hidden sibling of ``path`` unique to this process, ending in the same suffix (writers such
    as pandas' Excel writer pick the format from it)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` to write a temporary file, then rename it to ``path``.

    Creates the parent folder. On failure the temporary file is removed and an ``OSError`` naming
    ``path`` is raised (the original exception is chained).
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(f"cannot write {path}: {e.strerror or e}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (flushed to disk first when ``fsync``)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())

    return atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def resolve_inside(root: str | os.PathLike[str], name: str, *, what: str) -> Path:
    """``root / name`` resolved (symlinks followed), refused unless it stays inside ``root``.

    ``name`` comes from untrusted input (a split file, an input list, a path read back from disk): an
    absolute name, a ``..`` that climbs out, or a symlink that points outside all raise ``ValueError``
    naming ``what`` (e.g. "line 12 of splits/val.txt"). The path need not exist yet.
    """
    if not name or "\x00" in name:
        raise ValueError(f"{what}: empty name or a NUL byte in {name!r}")
    if os.path.isabs(name) or Path(name).drive:
        raise ValueError(f"{what}: {name!r} is an absolute path; only names relative to {root} are allowed")
    base = Path(root).resolve()
    path = (base / name).resolve()
    if path != base and base not in path.parents:
        raise ValueError(f"{what}: {name!r} leads outside {root} (to {path})")
    return path
