"""`dapseg export` (issue 27): a labeling job's labels as COCO, CVAT, FiftyOne and Label Studio data,
each read back with that tool's own library: pycocotools here; Datumaro (what CVAT imports with),
FiftyOne's importer and label-studio-sdk in their own venvs (``tests/tools.py``). Every mask must
equal the job's label PNG, unlabeled pixels (255) in no mask of any format."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from dapseg.cli import main
from tools import run_tool

CLASSES = ["person", "sky; clouds", "cup", "background"]
IMAGES = {"a/x.png": data.astronaut, "b.jpg": data.coffee, "c d.png": data.chelsea}


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A job of three images (one with a space in its name) and one that failed, some pixels unlabeled."""
    root = tmp_path_factory.mktemp("export")
    for name, photo in IMAGES.items():
        (root / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(photo()[::10, ::10])).save(root / "in" / name)
    (root / "in" / "bad.png").write_bytes(b"not a png")
    rc = main(["segment", str(root / "in"), "--recursive", "--classes", ", ".join(CLASSES), "--unlabeled-classes",
               "background", "--out", str(root / "job"), "--save", "labels", "--random-weights", "--tiny",
               "--preset", "naclip", "--set", "postprocess.prob_thd=0.3", "--device", "cpu", "--workers", "0"])
    assert rc == 1  # bad.png failed, the others are done
    return root / "job"


def _labels(job: Path) -> dict[str, np.ndarray]:
    """name -> (H, W) class indices, -1 unlabeled: the label PNGs as written (255 = unlabeled)."""
    out = {}
    for name in IMAGES:
        png = np.asarray(Image.open(job / (name.rsplit(".", 1)[0] + "_labels.png"))).astype(np.int64)
        out[name] = np.where(png == 255, -1, png)
    return out


def test_the_job_has_unlabeled_pixels_and_several_classes(job: Path) -> None:
    labels = np.concatenate([v.ravel() for v in _labels(job).values()])
    assert (labels == -1).any() and len(set(labels.tolist()) - {-1}) >= 2
    assert 3 not in labels  # "background" is left unlabeled


def test_coco_loads_in_pycocotools_and_every_mask_is_the_label_png(job: Path, tmp_path: Path, capsys) -> None:
    from pycocotools.coco import COCO
    from pycocotools.mask import toBbox

    assert main(["export", str(job), "--format", "coco", "--out", str(tmp_path / "coco")]) == 0
    assert "exported 3 image(s)" in capsys.readouterr().out
    coco = COCO(str(tmp_path / "coco" / "annotations.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == CLASSES
    expected = _labels(job)
    images = coco.loadImgs(coco.getImgIds())
    assert sorted(i["file_name"] for i in images) == sorted(IMAGES) and len({i["id"] for i in images}) == 3
    ann_ids = coco.getAnnIds()
    assert len(set(ann_ids)) == len(ann_ids)
    for image in images:
        labels = expected[image["file_name"]]
        assert (image["height"], image["width"]) == labels.shape
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
        assert sorted(a["category_id"] - 1 for a in anns) == sorted(set(labels.ravel().tolist()) - {-1})
        covered = np.zeros(labels.shape, bool)
        for ann in anns:
            mask = coco.annToMask(ann).astype(bool)
            assert (mask == (labels == ann["category_id"] - 1)).all()
            assert ann["iscrowd"] == 0 and ann["area"] == mask.sum()
            assert ann["bbox"] == pytest.approx(toBbox(coco.annToRLE(ann)).tolist())
            covered |= mask
        assert (covered == (labels != -1)).all()  # unlabeled pixels are in no annotation


DATUMARO = """
import json, sys
import numpy as np
import datumaro as dm
p = json.load(sys.stdin)
# CVAT's importer calls its Datumaro fork's "voc", which reads every VOC task; Datumaro 1.x names the
# segmentation task's reader "voc_segmentation" (its "voc" reads ImageSets/Main only)
ds = dm.Dataset.import_from(p["dir"], "voc_segmentation")
names = [c.name for c in ds.categories()[dm.AnnotationType.label]]
items = {}
for k, item in enumerate(ds):
    masks = [(names[a.label], a.image.astype(bool)) for a in item.annotations if a.type == dm.AnnotationType.mask]
    np.savez(f"{p['out']}/{k}.npz", *[m for _, m in masks])
    items[item.id] = {"file": f"{k}.npz", "labels": [n for n, _ in masks], "subset": item.subset}
print(json.dumps({"labels": names, "items": items}))
"""


@pytest.mark.parametrize("zipped", [False, True])
def test_cvat_segmentation_mask_imports_with_datumaro(job: Path, tmp_path: Path, zipped: bool) -> None:
    dest = tmp_path / ("cvat.zip" if zipped else "cvat")
    assert main(["export", str(job), "--format", "cvat", "--out", str(dest)]) == 0
    folder = dest
    if zipped:  # CVAT uploads the zip and extracts it before importing
        folder = tmp_path / "unzipped"
        with zipfile.ZipFile(dest) as z:
            assert {"labelmap.txt", "ImageSets/Segmentation/default.txt"} <= set(z.namelist())
            z.extractall(folder)
    (tmp_path / "masks").mkdir()
    got = run_tool("datumaro", DATUMARO, {"dir": str(folder), "out": str(tmp_path / "masks")})
    assert got["labels"] == ["background", "person", "sky; clouds", "cup"]  # black background first, as CVAT's
    expected = _labels(job)
    assert sorted(got["items"]) == sorted(n.rsplit(".", 1)[0] for n in IMAGES)
    for name, labels in expected.items():
        item = got["items"][name.rsplit(".", 1)[0]]
        assert item["subset"] == "default"
        masks = np.load(tmp_path / "masks" / item["file"])
        by_label = {label: masks[f"arr_{i}"] for i, label in enumerate(item["labels"])}
        want = {"background": labels == -1, **{CLASSES[c]: labels == c for c in set(labels.ravel().tolist()) - {-1}}}
        assert sorted(by_label) == sorted(want)
        for label, mask in want.items():
            assert (by_label[label] == mask).all(), label


FIFTYONE = """
import json, sys
import numpy as np
from fiftyone.utils.data.importers import ImageSegmentationDirectoryImporter
p = json.load(sys.stdin)
importer = ImageSegmentationDirectoryImporter(dataset_dir=p["dir"], load_masks=True)  # Dataset.from_dir's
items = {}
with importer:
    for k, (image_path, _, label) in enumerate(importer):
        np.save(f"{p['out']}/{k}.npy", label.mask)
        items[image_path] = f"{k}.npy"
print(json.dumps(items))
"""


def test_fiftyone_image_segmentation_directory_reads_with_fiftyones_importer(job: Path, tmp_path: Path) -> None:
    dest = tmp_path / "fo"
    assert main(["export", str(job), "--format", "fiftyone", "--out", str(dest)]) == 0
    targets = json.loads((dest / "mask_targets.json").read_text())
    assert targets == {"1": "person", "2": "sky; clouds", "3": "cup"}  # 0: no label
    (tmp_path / "masks").mkdir()
    got = run_tool("fiftyone", FIFTYONE, {"dir": str(dest), "out": str(tmp_path / "masks")}, timeout=600)
    expected = _labels(job)
    assert sorted(got) == sorted(str(dest / "data" / n) for n in IMAGES)
    for name, labels in expected.items():
        image = dest / "data" / name
        assert image.read_bytes() == (job.parent / "in" / name).read_bytes()
        mask = np.load(tmp_path / "masks" / got[str(image)])
        assert (mask == labels + 1).all()  # unlabeled -1 -> 0


LABEL_STUDIO = """
import json, sys
import numpy as np
from label_studio_sdk.converter.brush import decode_rle
from label_studio_sdk.label_interface import LabelInterface
p = json.load(sys.stdin)
tasks = json.load(open(p["tasks"]))
interface = LabelInterface(open(p["config"]).read())
out = []
for k, task in enumerate(tasks):
    prediction = task["predictions"][0]
    errors = interface.validate_prediction(prediction, return_errors=True)
    masks, names = [], []
    for r in prediction["result"]:
        h, w = r["original_height"], r["original_width"]
        masks.append(decode_rle(r["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 0)  # Label Studio reads alpha
        names.append(r["value"]["brushlabels"])
    np.savez(f"{p['out']}/{k}.npz", *masks)
    out.append({"image": task["data"]["image"], "names": names, "errors": errors or [], "file": f"{k}.npz"})
print(json.dumps(out))
"""


def test_labelstudio_tasks_decode_with_label_studios_own_decoder(job: Path, tmp_path: Path) -> None:
    dest = tmp_path / "ls"
    assert main(["export", str(job), "--format", "labelstudio", "--out", str(dest)]) == 0
    config = ET.parse(dest / "labeling-config.xml").getroot()
    assert [e.get("value") for e in config.iter("Label")] == ["person", "sky; clouds", "cup"]
    (tmp_path / "masks").mkdir()
    got = run_tool("label-studio-sdk", LABEL_STUDIO, {"tasks": str(dest / "tasks.json"),
                                                      "config": str(dest / "labeling-config.xml"),
                                                      "out": str(tmp_path / "masks")})
    expected = _labels(job)
    urls = {"/data/local-files/?d=a/x.png": "a/x.png", "/data/local-files/?d=b.jpg": "b.jpg",
            "/data/local-files/?d=c%20d.png": "c d.png"}
    assert sorted(t["image"] for t in got) == sorted(urls)
    for task in got:
        assert task["errors"] == []  # the prediction is valid for the labeling config
        labels = expected[urls[task["image"]]]
        masks = np.load(tmp_path / "masks" / task["file"])
        present = sorted(set(labels.ravel().tolist()) - {-1})
        assert task["names"] == [[CLASSES[c]] for c in present]
        for i, c in enumerate(present):
            assert (masks[f"arr_{i}"] == (labels == c)).all()


def test_export_refuses_a_non_job_a_busy_dest_and_a_bad_png(job: Path, tmp_path: Path, capsys) -> None:
    assert main(["export", str(tmp_path), "--format", "coco", "--out", str(tmp_path / "o")]) == 2
    assert "is not a labeling job folder" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    assert main(["export", str(job), "--format", "coco", "--out", str(tmp_path / "busy")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err and (tmp_path / "busy" / "keep.txt").exists()
    assert main(["export", str(job), "--format", "coco", "--out", str(tmp_path / "busy"), "--overwrite"]) == 2
    assert "not an earlier export" in capsys.readouterr().err and (tmp_path / "busy" / "keep.txt").exists()
    for dest in (job / "inside", job.parent):  # inside the job, or a folder holding it
        assert main(["export", str(job), "--format", "coco", "--out", str(dest), "--overwrite"]) == 2
        assert "overlap" in capsys.readouterr().err
    assert (job / "labeling-job.json").exists()

    assert main(["export", str(job), "--format", "coco", "--out", str(tmp_path / "again")]) == 0
    (tmp_path / "again" / "annotations.json").write_text("old")
    assert main(["export", str(job), "--format", "coco", "--out", str(tmp_path / "again")]) == 2
    assert main(["export", str(job), "--format", "coco", "--out", str(tmp_path / "again"), "--overwrite"]) == 0
    assert json.loads((tmp_path / "again" / "annotations.json").read_text())["images"]  # an earlier export replaced
    capsys.readouterr()

    copy = tmp_path / "copy"
    shutil.copytree(job, copy)
    Image.fromarray(np.full((4, 4), 7, np.uint8)).save(copy / "b_labels.png")  # 7: no class of 4
    assert main(["export", str(copy), "--format", "coco", "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "b_labels.png" in err and "pixel value 7" in err
    assert not (tmp_path / "o2").exists() and not list(tmp_path.glob(".o2*"))  # nothing half-written


RLE_ONLY = """
import json, sys
import numpy as np
from label_studio_sdk.converter.brush import decode_rle
p = json.load(sys.stdin)
print(json.dumps([(decode_rle(r).reshape(h, w, 4) > 0).tolist() for r, (h, w) in zip(p["rles"], p["shapes"])]))
"""


def test_brush_rle_edge_cases_decode_with_label_studio() -> None:
    from dapseg.labeling.labelstudio import mask_to_rle

    rng = np.random.default_rng(0)
    masks = [np.ones((1, 1), bool), np.zeros((3, 5), bool), np.ones((130, 130), bool),  # 67600 values: > 2**16
             rng.random((9, 11)) > 0.5, np.pad(np.ones((3, 70), bool), ((1, 1), (1, 1)))]  # runs of every size
    got = run_tool("label-studio-sdk", RLE_ONLY, {"rles": [mask_to_rle(m) for m in masks],
                                                  "shapes": [m.shape for m in masks]})
    for mask, rgba in zip(masks, got, strict=True):
        assert (np.array(rgba) == mask[:, :, None]).all()  # all four channels painted where the mask is


def test_fiftyone_copies_only_the_labeled_images_from_their_root(job: Path, tmp_path: Path, capsys) -> None:
    """The job's recorded input paths are untrusted: an image is taken as <root>/<name> and must have
    its labels' size; --image-root finds moved images."""
    moved = tmp_path / "moved"
    shutil.copytree(job.parent / "in", moved)
    copy = tmp_path / "job"
    shutil.copytree(job, copy)
    journal = next((copy / ".dapseg" / "journal").glob("rank-*.jsonl"))
    lines = [json.loads(line) for line in journal.read_text().splitlines()]
    for line in lines:
        if line["name"] == "b.jpg":
            line["input"] = "/etc/passwd"  # a job folder from elsewhere could name any file
    journal.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main(["export", str(copy), "--format", "fiftyone", "--out", str(tmp_path / "fo")]) == 2
    assert "does not end with its name" in capsys.readouterr().err and not (tmp_path / "fo").exists()

    assert main(["export", str(copy), "--format", "fiftyone", "--out", str(tmp_path / "fo"),
                 "--image-root", str(moved)]) == 0
    assert (tmp_path / "fo" / "data" / "b.jpg").read_bytes() == (moved / "b.jpg").read_bytes()
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(moved / "a" / "x.png")  # not the labeled image
    assert main(["export", str(copy), "--format", "fiftyone", "--out", str(tmp_path / "fo2"),
                 "--image-root", str(moved)]) == 2
    assert "not the image that was labeled" in capsys.readouterr().err
