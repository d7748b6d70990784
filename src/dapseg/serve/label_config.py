"""A Label Studio labeling config (XML) -> what dapseg segments: each ``BrushLabels`` control, the
``Image`` it labels, the task-data field holding that image, and the control's label values.

Class prompts: a label's text prompt is its ``value``, unless the operator's classes file
(``--classes-file``, the same format as ``dapseg segment --classes-file``: one class per line,
synonyms after ';' or ',') has a line whose first name is that value (case-insensitive): then every
name on that line is a query of the class (e.g. ``Sky; clouds`` for the label ``Sky``). The label's
``alias`` and ``hint`` attributes are not read: Label Studio shows both to annotators (the hint on
hover, the alias inside the label with ``showAlias``), so they are not free to carry prompt lists.
Pixels below ``postprocess.prob_thd``, and those of ``--unlabeled-classes``, belong to no label.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from xml.etree.ElementTree import Element

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

from dapseg.text import ClassSet


class LabelConfigError(ValueError):
    """The labeling config cannot be used for brush pre-annotation; the message says why."""


@dataclass(frozen=True)
class BrushTarget:
    """One ``<BrushLabels name=from_name toName=to_name>`` over ``<Image name=to_name value=$data_key>``."""

    from_name: str
    to_name: str
    data_key: str  # the task's data field with the image URL ("$image" -> "image")
    labels: tuple[str, ...]  # the Label values, in the config's order


def _tag(el: Element) -> str:
    return el.tag.lower() if isinstance(el.tag, str) else ""


def brush_targets(config_xml: str, max_classes: int) -> list[BrushTarget]:
    """Every BrushLabels control of ``config_xml`` with its image and labels.

    Raises ``LabelConfigError`` for XML that does not parse (or declares entities: parsed with
    defusedxml), a config without BrushLabels, a BrushLabels whose ``toName`` is not an ``Image`` with a
    ``$field`` value, labels without values or repeated, and more than ``max_classes`` labels.
    """
    try:
        root = SafeET.fromstring(config_xml)
    except (SafeET.ParseError, DefusedXmlException) as e:
        raise LabelConfigError(f"the labeling config is not valid XML: {e}") from e
    elements = list(root.iter())
    images = {el.get("name"): el for el in elements if _tag(el) == "image" and el.get("name")}
    targets = []
    for control in (el for el in elements if _tag(el) == "brushlabels"):
        name = control.get("name") or ""
        to_name = control.get("toName") or control.get("toname") or ""
        where = f"<BrushLabels name={name!r}>"
        if not name or not to_name:
            raise LabelConfigError(f"{where} needs both name and toName")
        image = images.get(to_name)
        if image is None:
            raise LabelConfigError(f"{where}: toName={to_name!r} is not an <Image> of the config")
        value = image.get("value") or ""
        if image.get("valueList") or image.get("valuelist"):
            raise LabelConfigError(f"<Image name={to_name!r}> uses valueList (several images per task); "
                                   "dapseg serve pre-annotates one image per Image tag")
        if not value.startswith("$") or len(value) < 2 or "." in value:
            raise LabelConfigError(f"<Image name={to_name!r}> has value={value!r}; expected a task field such "
                                   "as \"$image\"")
        labels = [el.get("value") for el in control.iter() if _tag(el) == "label"]
        if not labels:
            raise LabelConfigError(f"{where} has no <Label> children (labels loaded from task data are not "
                                   "supported)")
        if any(not v or not v.strip() for v in labels):
            raise LabelConfigError(f"{where} has a <Label> without a value")
        if len(labels) > max_classes:
            raise LabelConfigError(f"{where} has {len(labels)} labels, more than the server's limit of "
                                   f"{max_classes} (--max-classes)")
        repeated = sorted({v for v in labels if labels.count(v) > 1})
        if repeated:
            raise LabelConfigError(f"{where} lists the label(s) {', '.join(map(repr, repeated))} twice")
        targets.append(BrushTarget(name, to_name, value[1:], tuple(labels)))  # type: ignore[arg-type]
    if not targets:
        raise LabelConfigError("the labeling config has no <BrushLabels> control: dapseg serve pre-annotates "
                               "images with brush masks (e.g. <BrushLabels name=\"tag\" toName=\"image\">"
                               "<Label value=\"sky\"/></BrushLabels>)")
    return targets


class Prompts:
    """Label value -> the queries dapseg embeds for it (the value, or its classes-file line), and the
    classes added after every project's labels whose pixels are left unlabeled (``--unlabeled-classes``:
    a "background" that absorbs what is none of the labels, so it is not forced into one)."""

    def __init__(self, classes: ClassSet | None = None, unlabeled: ClassSet | None = None) -> None:
        self._by_name = {syns[0].casefold(): syns for syns in classes.synonyms} if classes is not None else {}
        self.unlabeled = unlabeled.synonyms if unlabeled is not None else ()

    @classmethod
    def from_args(cls, classes_file: str | os.PathLike[str] | None, unlabeled: str = "") -> Prompts:
        """``--classes-file`` and ``--unlabeled-classes`` ("background; wall, floor": classes by ',',
        synonyms by ';')."""
        return cls(ClassSet.from_file(classes_file) if classes_file else None,
                   ClassSet.parse(unlabeled) if unlabeled.strip() else None)

    def class_set(self, labels: Sequence[str]) -> ClassSet:
        """The classes of a target: its labels in order, then the unlabeled classes; a name in two
        classes is an error naming both."""
        synonyms = tuple(self._by_name.get(label.casefold(), (label.strip(),)) for label in labels)
        try:
            return ClassSet(synonyms + self.unlabeled,
                            unlabeled_classes=tuple(range(len(synonyms), len(synonyms) + len(self.unlabeled))))
        except ValueError as e:
            raise LabelConfigError(f"the labels {list(labels)} with the classes file and --unlabeled-classes: "
                                   f"{e}") from e

    def describe(self) -> dict[str, list[list[str]]]:
        """The mapping and the unlabeled classes, for the model version hash and the logs."""
        return {"labels": [list(syns) for _, syns in sorted(self._by_name.items())],
                "unlabeled": [list(syns) for syns in self.unlabeled]}
