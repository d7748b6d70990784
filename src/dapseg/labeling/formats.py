"""The export formats of ``dapseg export`` (``dapseg.labeling.export``): each writes one labeling job
into an empty folder and returns how many images it wrote. Unlabeled pixels are written as each
format says "no label":

- ``coco``: ``annotations.json``, one dataset (COCO's stuff segmentation: one compressed-RLE
  annotation per class present in an image, ``iscrowd`` 0); unlabeled pixels are in no annotation.
- ``cvat``: CVAT's "Segmentation mask 1.1" (Pascal VOC's layout): ``labelmap.txt``,
  ``SegmentationClass/<name>.png`` painted in the label map's colours,
  ``ImageSets/Segmentation/default.txt``; unlabeled pixels are black, the colour of the
  ``background`` entry CVAT's own exporter writes first for the pixels no label covers.
- ``fiftyone``: FiftyOne's ``ImageSegmentationDirectory`` (``data/`` the images, ``labels/`` the
  masks under the same names) and ``mask_targets.json``; mask value = class index + 1, 0 unlabeled
  (FiftyOne draws 0 as no label).
- ``labelstudio``: ``tasks.json`` (each image by its Label Studio local-files URL, the labels as a
  prediction of brush masks) and ``labeling-config.xml``; unlabeled pixels are in no brush mask.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from PIL import Image

from dapseg.labeling import coco, labelstudio
from dapseg.labeling.export import Job, items, write_json
from dapseg.postprocess import UNLABELED
from dapseg.viz import display_palette


def write_coco(job: Job, out: Path) -> int:
    try:
        import pycocotools.mask  # noqa: F401
    except ImportError as e:
        raise RuntimeError("--format coco needs pycocotools: pip install 'dapseg[export]'") from e
    images, annotations = [], []
    for image_id, item in enumerate(items(job), 1):
        h, w = item.labels.shape
        images.append({"id": image_id, "file_name": item.name, "height": h, "width": w})
        annotations += coco.class_annotations(item.labels, image_id, len(annotations) + 1)
    doc = {"info": {"description": f"dapseg labels ({job.preset})", "version": "1.0"},
           "images": images, "annotations": annotations, "categories": coco.categories(job.classes)}
    write_json(out / "annotations.json", doc)
    return len(images)


# CVAT and Datumaro read labelmap.txt as "name:r,g,b:parts:actions", split on ":".
BACKGROUND = "background"


def write_cvat(job: Job, out: Path) -> int:
    colours = display_palette(len(job.classes))  # never black: black is the unlabeled background
    labeled = job.labeled_classes
    for i in labeled:
        name = job.classes[i]
        if ":" in name or name.strip() != name:
            raise ValueError(f"class {name!r}: CVAT's labelmap.txt cannot hold a name with ':' or surrounding spaces")
        if name == BACKGROUND:
            raise ValueError("a class named 'background' would be the Segmentation mask format's unlabeled "
                             "(black) label: segment with --unlabeled-classes background, or rename the class")
    lines = ["# label:color_rgb:parts:actions", f"{BACKGROUND}:0,0,0::"]
    lines += [f"{job.classes[i]}:{','.join(str(int(v)) for v in colours[i])}::" for i in labeled]
    (out / "labelmap.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    # One colour per label index, black at the end for UNLABELED (-1 indexes the last row).
    lut = np.concatenate([colours, np.zeros((1, 3), np.uint8)])
    ids = []
    for item in items(job):
        path = out / "SegmentationClass" / f"{item.stem}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(lut[item.labels]).save(path)
        ids.append(item.stem)
    (out / "ImageSets" / "Segmentation").mkdir(parents=True)
    (out / "ImageSets" / "Segmentation" / "default.txt").write_text("\n".join(ids) + "\n", encoding="utf-8")
    return len(ids)


def write_fiftyone(job: Job, out: Path, *, image_root: Path | None = None) -> int:
    """``image_root``: where the images are now (default: where the job read them)."""
    n = len(job.classes)
    dtype = np.uint8 if n < 255 else np.uint16  # values 0..n
    count = 0
    for item in items(job):
        source = item.image(image_root)
        image = out / "data" / item.name
        image.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, image)
        mask = out / "labels" / f"{item.stem}.png"
        mask.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((item.labels + 1).astype(dtype)).save(mask)  # UNLABELED (-1) -> 0
        count += 1
    write_json(out / "mask_targets.json", {str(i + 1): job.classes[i] for i in job.labeled_classes})
    return count


LOCAL_FILES = "/data/local-files/?d="


def write_labelstudio(job: Job, out: Path, *, image_prefix: str = LOCAL_FILES) -> int:
    tasks: list[dict[str, Any]] = []
    for item in items(job):
        results = labelstudio.brush_results(item.labels, job.classes)
        tasks.append({"data": {"image": image_prefix + quote(item.name)},
                      "predictions": [{"model_version": f"dapseg {job.preset}", "result": results}]})
    write_json(out / "tasks.json", tasks)
    colours = display_palette(len(job.classes))
    labeled = job.labeled_classes
    (out / "labeling-config.xml").write_text(
        labelstudio.labeling_config([job.classes[i] for i in labeled], colours[labeled]), encoding="utf-8")
    return len(tasks)


FORMATS = {"coco": write_coco, "cvat": write_cvat, "fiftyone": write_fiftyone, "labelstudio": write_labelstudio}
assert UNLABELED == -1  # the cvat colour table and the fiftyone +1 shift rely on it
