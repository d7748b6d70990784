"""Writing files atomically: the one place that does it (results, caches, checkpoints, downloads).

A file is written under a temporary name in its own folder and renamed over the target only once
complete, so a reader never sees half a file and an interrupted run leaves the old file intact.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


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


def refuse_links(root: str | os.PathLike[str], names: list[str], *, what: str) -> None:
    """Raise ``ValueError`` where ``root / name`` (or a folder on the way to it below ``root``) is a
    symlink: a tool's own files in a folder (state, journals) are written in place, never through a
    link that someone planted to lead the writes elsewhere. ``what`` names the folder ("out dir")."""
    base = Path(root)
    for name in names:
        path = base
        for part in Path(name).parts:
            path = path / part
            if path.is_symlink():
                raise ValueError(f"{path} is a symlink (to {os.readlink(path)}); dapseg writes the {what}'s own "
                                 f"files in {base} itself, never through a link: remove the link and run again")


def open_append_in_place(path: Path) -> int:
    """A file descriptor appending to ``path`` (created if missing), refusing a symlink at ``path``
    (``O_NOFOLLOW``), so that a link planted after any check cannot redirect the writes."""
    try:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
                       | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as e:
        if path.is_symlink():
            raise ValueError(f"{path} is a symlink (to {os.readlink(path)}); refusing to write through it") from e
        raise


def read_json(path: str | os.PathLike[str], *, max_depth: int = 100) -> Any:
    """The JSON document in ``path`` (an untrusted file: parsed as data, never code). Every way it can
    be unusable is a ``ValueError`` (or the ``OSError`` of reading it) whose message names the file:
    not UTF-8, not JSON, or nested deeper than ``max_depth`` (Python's parser would otherwise stop
    with a bare RecursionError, and deep documents make every later comparison recurse as deep)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise ValueError(f"{path} is nested too deeply to be one of dapseg's files") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path} is not valid JSON ({e})") from e
    todo = [(doc, 1)]
    while todo:  # iterative: no recursion on hostile input
        value, depth = todo.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        for child in children:
            if isinstance(child, dict | list):
                if depth + 1 > max_depth:
                    raise ValueError(f"{path} is nested more than {max_depth} levels deep: not one of dapseg's files")
                todo.append((child, depth + 1))
    return doc
