"""``dapseg export``: a labeling job's saved label PNGs as a dataset another tool imports.

The job (``dapseg.labeling.job``) is read back as untrusted data: the settings JSON and the journal
lines are validated, the label PNGs' values checked against the class list, every path read or
written confined to the job dir or DEST. Only images whose journal line says ``done`` are exported,
so a job still running or stopped half-way exports what it finished. The export is built in a hidden
sibling of DEST and renamed into place once complete (DEST ending in ``.zip``: one zip file).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from dapseg.files import atomic_write, resolve_inside
from dapseg.images import open_image
from dapseg.labeling import job as state
from dapseg.labeling.outputs import SUFFIXES
from dapseg.viz import MAX_PALETTE_CLASSES, labels_from_png


class JobSettings(BaseModel):
    """The part of ``labeling-job.json`` an export needs."""

    model_config = ConfigDict(extra="ignore")
    classes: list[str]
    unlabeled_classes: list[str] = []
    save: list[str]
    config: dict[str, object] = {}

    @field_validator("classes")
    @classmethod
    def _classes(cls, v: list[str]) -> list[str]:
        if not v or any(not name or any(ord(ch) < 32 for ch in name) for name in v) or len(set(v)) != len(v):
            raise ValueError("must be a list of distinct non-empty one-line class names")
        return v


@dataclass(frozen=True)
class Job:
    root: Path
    settings: JobSettings
    done: list[state.Record]  # sorted by name
    failed: int  # images whose latest line says failed

    @property
    def classes(self) -> list[str]:
        return self.settings.classes

    @property
    def labeled_classes(self) -> list[int]:
        """Indices of the classes that can appear in the labels (not left unlabeled)."""
        return [i for i, name in enumerate(self.classes) if name not in self.settings.unlabeled_classes]

    @property
    def preset(self) -> str:
        name = self.settings.config.get("name")
        return name if isinstance(name, str) else "custom"


@dataclass(frozen=True)
class Item:
    name: str  # the input's path relative to its input root, "/"-separated
    source: Path  # the file the job read (untrusted: see ``image``)
    labels: np.ndarray  # (H, W) int64 class indices, UNLABELED (-1) where left unlabeled

    @property
    def stem(self) -> str:
        return str(PurePosixPath(self.name).with_suffix(""))

    def image(self, image_root: Path | None) -> Path:
        """The labeled image: ``image_root / name``, or where the job read it. Either must be a file
        named ``name`` under a root (the recorded path is never taken as it is: a job folder from
        elsewhere could name any file) and an image of the labels' size."""
        if image_root is None:
            parts = PurePosixPath(self.name).parts
            if self.source.parts[-len(parts):] != parts:
                raise ValueError(f"{self.name}: the job read it from {self.source}, whose path does not end with "
                                 "its name; give --image-root (the folder the names are relative to)")
            image_root = Path(*self.source.parts[: -len(parts)]) if len(self.source.parts) > len(parts) else Path()
        path = resolve_inside(image_root, self.name, what=f"image of {self.name}")
        try:
            with open_image(path) as img:  # header only; the pixel limit applies
                size = img.size
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"{self.name}: cannot read its image {path} ({e}); restore it or give "
                                    "--image-root") from e
        if size != (self.labels.shape[1], self.labels.shape[0]):
            raise ValueError(f"{path} is {size[0]}x{size[1]}, its labels {self.labels.shape[1]}x"
                             f"{self.labels.shape[0]}: not the image that was labeled")
        return path


def read_job(root: Path) -> Job:
    """The settings and the finished images of the labeling job in ``root``."""
    path = root / state.JOB_FILE
    try:
        settings = JobSettings.model_validate_json(path.read_bytes())
    except OSError as e:
        raise FileNotFoundError(f"{root} is not a labeling job folder (cannot read {path}: {e.strerror})") from e
    except ValidationError as e:
        raise ValueError(f"{path} is not a labeling job's settings: {e.errors()[0]['msg']}") from e
    if "labels" not in settings.save:
        raise ValueError(f"the job in {root} saved {','.join(settings.save)} but no label PNGs; exports read "
                         "them: run `dapseg segment` again with --save labels,... into another --out")
    records, _ = state.read_records(root)
    if not records:  # a copied job without its hidden journals: the manifest lists the same lines
        records = _manifest_records(root / state.MANIFEST)
    for rec in records.values():
        check_name(rec.name, f"{root}: image name")
    done = sorted((r for r in records.values() if r.status == "done"), key=lambda r: r.name)
    return Job(root, settings, done, sum(r.status == "failed" for r in records.values()))


def _manifest_records(path: Path) -> dict[str, state.Record]:
    records: dict[str, state.Record] = {}
    try:
        lines = path.read_bytes().splitlines()
    except OSError:
        return records
    for n, line in enumerate(lines, 1):
        try:
            rec = state.Record.model_validate_json(line)
        except (ValidationError, ValueError) as e:
            raise ValueError(f"line {n} of {path} is not a manifest line: {e}") from e
        records[rec.name] = rec
    return records


def check_name(name: str, what: str) -> str:
    """An image name read back: relative, "/"-separated, no "..", no empty or hidden-dot parts."""
    parts = name.split("/")
    if not name or "\\" in name or "\x00" in name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"{what} {name!r} is not a relative path inside the job")
    return name


def items(job: Job) -> Iterator[Item]:
    """Each finished image with its labels, read from its label PNG and checked."""
    n = len(job.classes)
    for rec in job.done:
        stem = str(PurePosixPath(rec.name).with_suffix(""))
        png = resolve_inside(job.root, stem + SUFFIXES["labels"], what=f"label PNG of {rec.name}")
        try:
            with open_image(png) as img:  # size checked against the pixel limit before decoding
                img.load()
                values = np.asarray(img)
                mode = img.mode
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read the label PNG {png}: {e}") from e
        expected = ("P", "L") if n <= MAX_PALETTE_CLASSES else ("I;16", "I")
        if mode not in expected or values.ndim != 2:
            raise ValueError(f"{png}: a {mode} image, not the label PNG of {n} classes ({' or '.join(expected)})")
        try:
            labels = labels_from_png(values, n)
        except ValueError as e:
            raise ValueError(f"{png}: {e}") from e
        yield Item(rec.name, Path(rec.input), labels)


# ----------------------------------------------------------------------------- writing DEST

Writer = Callable[[Job, Path], int]  # (job, an empty folder) -> images written


def export(job_dir: str | os.PathLike[str], write: Writer, dest: str | os.PathLike[str], *,
           overwrite: bool = False) -> tuple[Job, int]:
    """Write ``job_dir``'s labels with ``write`` (a format of ``dapseg.labeling.formats``) into
    ``dest``: a folder, or a zip file where ``dest`` ends in ``.zip``. Returns the job and the count."""
    job = read_job(Path(job_dir))
    if not job.done:
        raise ValueError(f"the job in {job_dir} has no finished image to export")
    out = Path(dest)
    root, target = job.root.resolve(), out.resolve()
    if target == root or root in target.parents or target in root.parents:
        raise ValueError(f"--out {dest} and the job folder {job_dir} overlap; export somewhere else")
    _check_replaceable(out, overwrite)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.mkdir(parents=True)
        count = write(job, tmp)
        write_json(tmp / MARKER, {"job": str(root), "images": count, "failed_in_job": job.failed})
        if out.suffix == ".zip":
            atomic_write(out, lambda z: _zip(tmp, z))
        else:
            _replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return job, count


MARKER = ".dapseg-export.json"  # in every exported folder: what --overwrite may replace


def _check_replaceable(out: Path, overwrite: bool) -> None:
    """DEST may be new, an empty folder, or (``overwrite``) an earlier export: a folder with our
    marker, or a zip file. Anything else is never deleted."""
    if not (out.exists() or out.is_symlink()):
        return
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return
    earlier = (out.is_dir() and not out.is_symlink() and (out / MARKER).is_file()) or (
        out.is_file() and out.suffix == ".zip" and zipfile.is_zipfile(out))
    if not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose another --out"
                              + (" or add --overwrite" if earlier else ""))
    if not earlier:
        raise FileExistsError(f"{out} is not an earlier export (no {MARKER}); --overwrite replaces only "
                              "those: choose another --out")


def _zip(folder: Path, path: Path) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for file in sorted(folder.rglob("*")):
            if file.is_file() and file.name != MARKER:
                z.write(file, file.relative_to(folder).as_posix())


def _replace_folder(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` onto ``out`` (an old ``out`` is moved aside first, then removed)."""
    old = None
    if out.exists() or out.is_symlink():
        old = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.old")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()


def write_json(path: Path, doc: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1), encoding="utf-8")
