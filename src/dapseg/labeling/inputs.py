"""The images of a labeling job and their names: files, folders (``recursive``), globs, input lists.

An image's *name* is its path relative to its input root, ``/``-separated, e.g. ``a/x.jpg`` for
``in/a/x.jpg`` given as the folder ``in``; its outputs mirror it (``OUT/a/x_labels.png``). The root of
a folder is the folder, of a glob the folder before its first wildcard, of a single file its own
folder, of an input list ``--input-root`` (default: the list's folder; the current folder for stdin).
So a name depends on the input's path alone, never on the order or on the other inputs.

One rule for every input found or listed (folder scans, globs, input lists): it must stay inside its
root. A file symlink in a scanned folder that leads out of it is refused like an input-list line that
does, before any work, naming the file (``files.resolve_inside``). A file named on the command line
is read where it is (the user named it). A directory named like an image (``x.jpg``) is not a folder
to scan: it is an input that fails alone, named in the manifest.
"""

from __future__ import annotations

import glob
import os
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TextIO

from dapseg.files import resolve_inside

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}


@dataclass(frozen=True)
class Input:
    source: Path  # the file to read
    rel: str  # its path relative to its input root, "/"-separated

    @property
    def stem(self) -> str:
        """``rel`` without the suffix: what the output names start with (``a/x`` for ``a/x.jpg``)."""
        return str(PurePosixPath(self.rel).with_suffix(""))


def collect_inputs(items: list[str], *, recursive: bool = False, input_list: str | None = None,
                   input_root: str | None = None, exclude: Path | None = None,
                   stdin: TextIO | None = None) -> list[Input]:
    """The images named by ``items`` (files, folders, globs) and by ``input_list`` (a file, ``-`` for
    ``stdin``), in order, each source once. Files under ``exclude`` (the out dir) are skipped when a
    folder is listed, so a rerun never labels its own outputs."""
    found: list[Input] = []
    for item in items:
        path = Path(item)
        if path.is_dir() and path.suffix.lower() not in IMAGE_SUFFIXES:
            found += _folder(path, recursive, exclude)
        elif glob.has_magic(item):
            found += _glob(item)
        else:  # a missing file (or a folder named x.jpg) is reported per image, the others are still labeled
            found.append(Input(path, path.name))
    if input_list is not None:
        found += read_input_list(input_list, input_root, stdin or sys.stdin)
    seen: set[str] = set()
    return [i for i in found if not ((key := os.path.abspath(i.source)) in seen or seen.add(key))]


def _folder(folder: Path, recursive: bool, exclude: Path | None) -> list[Input]:
    skip = exclude.resolve() if exclude is not None else None
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        # Hidden folders (.git, an out dir's .dapseg) are not inputs; sorted walks keep the order stable.
        dirnames[:] = sorted(d for d in dirnames if recursive and not d.startswith("."))
        here = Path(dirpath)
        if skip is not None and (here.resolve() == skip or skip in here.resolve().parents):
            dirnames[:] = []
            continue
        for name in sorted(filenames):
            if Path(name).suffix.lower() in IMAGE_SUFFIXES and not name.startswith("."):
                rel = (here / name).relative_to(folder).as_posix()
                if (here / name).is_symlink():  # (os.walk does not enter linked folders)
                    _confined(folder, rel, f"file {here / name} found in folder {folder}")
                found.append(Input(here / name, rel))
    return sorted(found, key=lambda i: i.rel)


def glob_root(pattern: str) -> Path:
    """The folder before the first component with a wildcard (``in/*/x*.png`` -> ``in``)."""
    parts = Path(pattern).parts
    fixed = parts[: next(i for i, p in enumerate(parts) if glob.has_magic(p))]
    return Path(*fixed) if fixed else Path(".")


def _glob(pattern: str) -> list[Input]:
    root = glob_root(pattern)
    matches = sorted(Path(m) for m in glob.glob(pattern, recursive=True))
    if not matches:
        raise FileNotFoundError(f"no files match {pattern!r}")
    found = [Input(m, m.relative_to(root).as_posix()) for m in matches if m.is_file()]
    for item in found:  # a match may lie under a linked folder, or be a link itself
        _confined(root, item.rel, f"file {item.source} matched by {pattern!r}")
    return found


def _confined(root: Path, rel: str, what: str) -> Path:
    try:
        return resolve_inside(root, rel, what=what)
    except ValueError as e:
        raise ValueError(f"{e}; an input found in a folder or listed in --input-list must stay inside its "
                         "root (symlinks leading out are refused): give the target's folder instead, or an "
                         "--input-list whose --input-root holds both") from e


def read_input_list(input_list: str, input_root: str | None, stdin: TextIO) -> list[Input]:
    """One image per line (blank lines and ``#`` comments skipped), relative to the input root, or
    absolute inside it. A line that leads outside the root is an error naming the line."""
    if input_list == "-":
        lines, where = stdin.read().splitlines(), "stdin"
        root = Path(input_root or ".")
    else:
        try:
            lines = Path(input_list).read_text(encoding="utf-8-sig").splitlines()  # a BOM is not a path
        except (OSError, UnicodeDecodeError) as e:
            raise FileNotFoundError(f"cannot read --input-list {input_list}: {e}") from e
        where, root = input_list, Path(input_root or Path(input_list).parent)
    if not root.is_dir():
        raise FileNotFoundError(f"--input-root {root} is not a folder")
    found = []
    for n, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        what = f"line {n} of --input-list {where}"
        if os.path.isabs(text):
            rel = os.path.relpath(text, os.path.abspath(root))
            if rel == os.pardir or rel.startswith(os.pardir + os.sep):
                raise ValueError(f"{what}: {text!r} is outside the input root {root} (set --input-root)")
            text = rel
        source = _confined(root, text, what)
        found.append(Input(source, PurePosixPath(os.path.normpath(text)).as_posix()))
    return found
