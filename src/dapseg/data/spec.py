"""Benchmark dataset settings as data: one YAML file per dataset under ``dapseg/configs/datasets``.

A spec says where the files are (MMSegmentation layout), how labels are read (``reduce_zero_label``,
``ignore_index``), which class-name file to use, and which segmenter settings the references use on
it: ``settings`` for every method, ``methods[<preset>]`` for one method (a preset name matches its
own entry or that of the preset it is named after: ``naclip-pamr`` -> ``naclip``). Command-line
``--set`` overrides come last.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, field_validator, model_validator


class DatasetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    title: str = ""
    root: str  # sub-directory of --data-root where the dataset lives (MMSeg layout)
    img_dir: str
    ann_dir: str
    split: str | None = None  # file of image stems, relative to the dataset root; None = scan img_dir
    img_suffix: str = ".jpg"
    seg_suffix: str = ".png"
    classes: str  # file name in dapseg/configs/classes, or a path
    num_classes: int
    background: bool = False  # class 0 is "background" (prob_thd turns unsure pixels into it)
    reduce_zero_label: bool = False  # label 0 -> ignore, k -> k-1 (MMSeg semantics)
    ignore_index: int = 255
    settings: dict[str, Any] = {}  # segmenter overrides (dotted keys) for every method
    methods: dict[str, dict[str, Any]] = {}  # per-method overrides, keyed by preset name

    @field_validator("num_classes")
    @classmethod
    def _classes_positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be >= 1")
        return v

    @model_validator(mode="after")
    def _ignore_outside_classes(self) -> DatasetSpec:
        if 0 <= self.ignore_index < self.num_classes:
            raise ValueError(
                f"ignore_index {self.ignore_index} is a valid class index (num_classes={self.num_classes})"
            )
        return self

    # ------------------------------------------------------------------ derived

    def class_file(self) -> Path:
        path = Path(self.classes)
        if path.is_absolute() or path.exists():
            return path
        return _config_dir() / "classes" / self.classes

    def class_names(self) -> list[str]:
        """One entry per class (synonyms kept on the line as written)."""
        path = self.class_file()
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise FileNotFoundError(
                f"dataset {self.name!r}: cannot read class file {path}: {e.strerror}"
            ) from e
        names = [line.strip() for line in lines if line.strip()]
        if len(names) != self.num_classes:
            raise ValueError(
                f"dataset {self.name!r}: class file {path} has {len(names)} classes, "
                f"num_classes is {self.num_classes}"
            )
        return names

    def overrides_for(self, preset: str) -> dict[str, Any]:
        """Segmenter overrides of this dataset for ``preset`` (dataset-wide, then the method's own)."""
        # Without a background class a probability threshold would invent class 0; the references
        # leave prob_thd at 0 there, whatever the method's default.
        out: dict[str, Any] = {} if self.background else {"postprocess.prob_thd": 0.0}
        out.update(self.settings)
        method = method_key(preset, self.methods)
        if method is not None:
            out.update(self.methods[method])
        return out

    def layout(self) -> str:
        """The expected on-disk tree, for error messages and the README."""
        img = f"{self.img_dir}/<name>{self.img_suffix}"
        ann = f"{self.ann_dir}/<name>{self.seg_suffix}"
        lines = [f"<data-root>/{self.root}/", f"    {img}", f"    {ann}"]
        if self.split:
            lines.append(f"    {self.split}   (one image name per line, without suffix)")
        else:
            lines.append(f"    (every *{self.img_suffix} under {self.img_dir}/, sub-folders included)")
        return "\n".join(lines)


def method_key(preset: str, methods: dict[str, Any]) -> str | None:
    """The entry of ``methods`` for ``preset``: exact name, else drop '-suffix' parts from the right."""
    name = preset
    while True:
        if name in methods:
            return name
        if "-" not in name:
            return None
        name = name.rsplit("-", 1)[0]


def _config_dir() -> Path:
    return Path(str(resources.files("dapseg") / "configs"))


def list_datasets() -> list[str]:
    return sorted(p.stem for p in (_config_dir() / "datasets").glob("*.yaml"))


# The eight standard benchmarks in the order of the references' tables, then the two large ones.
STANDARD = ["voc21", "context60", "coco_object", "voc20", "context59", "coco_stuff171", "cityscapes",
            "ade20k"]
EXTRA = ["ade847", "context459"]


def load_dataset_spec(name_or_path: str | Path) -> DatasetSpec:
    """A spec by registry name (``voc21``) or from a YAML file of the same shape."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = _config_dir() / "datasets" / f"{name_or_path}.yaml"
        if not path.is_file():
            valid = ", ".join(list_datasets())
            raise ValueError(f"unknown dataset {name_or_path!r}; valid datasets: {valid}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise FileNotFoundError(f"cannot read dataset file {path}: {e.strerror}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a dataset spec must be a mapping")
    try:
        return DatasetSpec.model_validate(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
