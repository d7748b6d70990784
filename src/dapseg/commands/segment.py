"""`dapseg segment`: label every pixel of images with a list of class names."""

from __future__ import annotations

import argparse
import errno
import glob
import os
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

from dapseg.commands.common import add_model_args, build_segmenter
from dapseg.config import default_preset
from dapseg.text import ClassSet

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("segment", help="segment images into the given classes")
    p.add_argument("inputs", nargs="+", help="image files, folders and glob patterns")
    c = p.add_mutually_exclusive_group(required=True)
    c.add_argument("--classes", help='classes separated by ",", synonyms by ";" (e.g. "horse, sky; clouds")')
    c.add_argument("--classes-file", help="one class per line, synonyms separated by '; '")
    p.add_argument("--out", default="out", help="output directory (default: out/)")
    add_model_args(p, default_preset=None, preset_note="default: dap, or naclip where dap is absent")
    p.set_defaults(run=run)


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files, folders (their images, sorted) and globs -> image paths, in order, without repeats."""
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        elif any(ch in item for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            if not matches:
                raise FileNotFoundError(f"no files match {item!r}")
            paths += [m for m in matches if m.is_file()]
        else:
            paths.append(p)  # a missing file is reported per image, with the others still processed
    seen: set[Path] = set()
    return [p for p in paths if not (p in seen or seen.add(p))]


def unique_stems(paths: list[Path]) -> list[str]:
    """Output stems, one per path: a stem already taken gets _1, _2, ... (never one that is taken)."""
    used: set[str] = set()
    stems = []
    for p in paths:
        stem, n = p.stem, 0
        while stem in used:  # a.png, a.jpg, a_1.png -> a, a_1, a_1_1 (not a_1 twice)
            n += 1
            stem = f"{p.stem}_{n}"
        used.add(stem)
        stems.append(stem)
    return stems


def check_writable(out: Path) -> None:
    """Fail early (before any model is built) where ``out`` cannot be written. Creates nothing: the
    folder is made when the first result is saved, so a run that fails leaves no empty folder."""
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


def run(args: argparse.Namespace) -> int:
    classes = ClassSet.from_file(args.classes_file) if args.classes_file else ClassSet.parse(args.classes)
    if not args.preset and not args.config:
        args.preset = default_preset()
    out = Path(args.out)
    check_writable(out)
    paths = expand_inputs(args.inputs)
    if not paths:
        raise FileNotFoundError(f"no images found in {' '.join(args.inputs)}")
    segmenter = build_segmenter(args)
    failures: list[tuple[Path, str]] = []
    for path, stem in tqdm(list(zip(paths, unique_stems(paths), strict=True)), desc="segment", unit="img",
                           disable=not sys.stderr.isatty() and "DAPSEG_PROGRESS" not in os.environ):
        try:
            result = segmenter.predict(path, classes)
            result.save(out, stem, extra={"image": str(path), "preset": segmenter.config.name})
        except (OSError, ValueError, RuntimeError) as e:  # one bad image must not lose the others
            failures.append((path, str(e)))
    done = len(paths) - len(failures)
    print(f"segmented {done}/{len(paths)} images into {out}/")
    if failures:
        print(f"{len(failures)} failed:", file=sys.stderr)
        for path, msg in failures:
            print(f"  {path}: {msg}", file=sys.stderr)
        return 1
    return 0
