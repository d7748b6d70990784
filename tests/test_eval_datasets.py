"""Dataset readers on synthetic trees in each exact on-disk layout; label conventions; bad input."""

import numpy as np
import pytest
from PIL import Image

from dapseg.data import DataError, SegDataset, list_datasets, load_dataset_spec
from dapseg.data.spec import EXTRA, STANDARD
from eval_synth import expected_classes, make_dataset, write_label

ALL = STANDARD + EXTRA


def test_registry_has_the_ten_benchmarks_and_class_files_match():
    assert sorted(ALL) == list_datasets()
    # facts from the references' configs (ProxyCLIP cfg_*.py / custom_datasets.py)
    facts = {  # name: (num_classes, background, reduce_zero_label, short_side, prob_thd)
        "voc21": (21, True, False, 336, 0.2), "voc20": (20, False, True, 336, 0.0),
        "context60": (60, True, False, 336, 0.15), "context59": (59, False, True, 336, 0.0),
        "coco_object": (81, True, False, 336, 0.25), "coco_stuff171": (171, False, False, 336, 0.0),
        "cityscapes": (19, False, False, 448, 0.0), "ade20k": (150, False, True, 448, 0.0),
        "ade847": (847, False, False, 448, 0.0), "context459": (459, False, False, 448, 0.0),
    }
    for name, (C, bg, rzl, short, thd) in facts.items():
        spec = load_dataset_spec(name)
        assert (spec.num_classes, spec.background, spec.reduce_zero_label) == (C, bg, rzl), name
        assert len(spec.class_names()) == C
        ov = spec.overrides_for("proxyclip")
        assert ov["inference.short_side"] == short and ov.get("postprocess.prob_thd", 0.0) == thd, name
    assert load_dataset_spec("voc21").class_names()[0].startswith("sky; wall; tree")  # ProxyCLIP bg synonyms
    assert load_dataset_spec("cityscapes").overrides_for("proxyclip")["inference.crop"] == 224


def test_method_overrides_follow_the_preset_family():
    spec = load_dataset_spec("voc21")
    assert spec.overrides_for("naclip-pamr")["postprocess.prob_thd"] == 0.1
    assert spec.overrides_for("naclip-pamr")["inference.mode"] == "whole"
    assert spec.overrides_for("trident-h14-fsa")["inference.short_side"] == 448
    assert spec.overrides_for("dap")["postprocess.prob_thd"] == 0.2
    # no background: prob_thd forced to 0 whatever the method
    assert load_dataset_spec("ade20k").overrides_for("dap")["postprocess.prob_thd"] == 0.0


@pytest.mark.parametrize("name", ALL)
def test_reader_on_synthetic_layout(tmp_path, name):
    stored = make_dataset(tmp_path, name, n=3, seed=len(name),
                          extra_unlisted=1 if load_dataset_spec(name).split else 0)
    ds = SegDataset(name, tmp_path)
    assert ds.names == sorted(stored)
    spec = ds.spec
    for i, n in enumerate(ds.names):
        s = ds[i]
        assert s.name == n and s.image.dtype == np.uint8 and s.image.shape[2] == 3
        assert s.image.shape[:2] == s.label.shape
        np.testing.assert_array_equal(s.label, expected_classes(stored[n], spec))
        valid = s.label[s.label != spec.ignore_index]
        assert valid.min() >= 0 and valid.max() < spec.num_classes


def test_reduce_zero_label_and_background_conventions(tmp_path):
    lab = np.array([[0, 1, 2, 255]])
    img = np.zeros((1, 4, 3), np.uint8)
    for name, expect in [("voc21", [0, 1, 2, 255]), ("voc20", [255, 0, 1, 255]),
                         ("context60", [0, 1, 2, 255]), ("context59", [255, 0, 1, 255]),
                         ("ade20k", [255, 0, 1, 255]), ("coco_object", [0, 1, 2, 255])]:
        spec = load_dataset_spec(name)
        root = tmp_path / name / spec.root
        stem = "a/x" if name == "cityscapes" else "x"
        (root / spec.img_dir).mkdir(parents=True)
        Image.fromarray(img).save(root / spec.img_dir / f"{stem}{spec.img_suffix}", format="PNG")
        write_label(root / spec.ann_dir / f"{stem}{spec.seg_suffix}", lab, spec)
        if spec.split:
            (root / spec.split).parent.mkdir(parents=True, exist_ok=True)
            (root / spec.split).write_text("x\n")
        assert SegDataset(name, tmp_path / name)[0].label.tolist() == [expect], name


def test_data_root_may_be_the_dataset_folder_itself(tmp_path):
    make_dataset(tmp_path, "ade20k", n=2)
    assert len(SegDataset("ade20k", tmp_path / "ade" / "ADEChallengeData2016")) == 2
    assert len(SegDataset("ade20k", tmp_path, limit=1)) == 1


# ------------------------------------------------------------------ bad input

def test_missing_root_shows_expected_layout(tmp_path):
    with pytest.raises(DataError, match=r"(?s)Expected layout.*JPEGImages/<name>\.jpg.*val\.txt"):
        SegDataset("voc21", tmp_path / "nowhere")


def test_missing_split_file_shows_expected_layout(tmp_path):
    make_dataset(tmp_path, "voc21", n=2)
    (tmp_path / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").unlink()
    with pytest.raises(DataError, match=r"(?s)split file .*val\.txt not found.*Expected layout"):
        SegDataset("voc21", tmp_path)


def test_missing_label_file_is_named(tmp_path):
    make_dataset(tmp_path, "voc21", n=2)
    (tmp_path / "VOCdevkit/VOC2012/SegmentationClass/img_001.png").unlink()
    with pytest.raises(DataError, match=r"img_001\.png"):
        SegDataset("voc21", tmp_path)


def test_size_mismatch_names_the_file(tmp_path):
    make_dataset(tmp_path, "ade20k", n=2)
    p = tmp_path / "ade/ADEChallengeData2016/annotations/validation/img_001.png"
    Image.fromarray(np.ones((5, 5), np.uint8), mode="L").save(p)
    with pytest.raises(DataError, match=r"img_001\.png is 5x5 but image .*img_001\.jpg is 24x32"):
        SegDataset("ade20k", tmp_path)[1]


def test_label_value_out_of_range_names_file_and_value(tmp_path):
    make_dataset(tmp_path, "cityscapes", n=2)
    p = next((tmp_path / "cityscapes/gtFine/val").rglob("*.png"))
    lab = np.array(Image.open(p))
    lab[0, 0] = 33  # a raw label id: the dataset was not converted to train ids
    Image.fromarray(lab, mode="L").save(p)
    ds = SegDataset("cityscapes", tmp_path)
    i = ds.names.index(str(p.relative_to(tmp_path / "cityscapes/gtFine/val"))[: -len("_gtFine_labelTrainIds.png")])
    with pytest.raises(DataError, match=rf"{p.name}: value 33 is outside the 19 classes"):
        ds[i]


def test_colour_label_is_refused(tmp_path):
    make_dataset(tmp_path, "ade20k", n=1)
    p = tmp_path / "ade/ADEChallengeData2016/annotations/validation/img_000.png"
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(p)
    with pytest.raises(DataError, match="mode RGB"):
        SegDataset("ade20k", tmp_path)[0]


def test_corrupt_image_error_or_skip(tmp_path):
    make_dataset(tmp_path, "ade20k", n=2)
    p = tmp_path / "ade/ADEChallengeData2016/images/validation/img_000.jpg"
    p.write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError, match=r"cannot read image .*img_000\.jpg"):
        SegDataset("ade20k", tmp_path)[0]
    s = SegDataset("ade20k", tmp_path, skip_bad=True)[0]
    assert s.image is None and "img_000.jpg" in s.error


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError, match="valid datasets: ade20k, ade847"):
        load_dataset_spec("voc2012")


def test_dataset_present_tells_shared_trees_apart(tmp_path):
    from dapseg.data import dataset_present

    make_dataset(tmp_path, "context60", n=1)
    make_dataset(tmp_path, "coco_stuff171", n=1)
    assert dataset_present(load_dataset_spec("context60"), tmp_path)
    assert dataset_present(load_dataset_spec("context59"), tmp_path)  # same files, other decoding
    assert not dataset_present(load_dataset_spec("context459"), tmp_path)  # no pc459 labels
    assert dataset_present(load_dataset_spec("coco_stuff171"), tmp_path)
    assert not dataset_present(load_dataset_spec("coco_object"), tmp_path)  # not converted yet
    assert not dataset_present(load_dataset_spec("ade20k"), tmp_path)


@pytest.mark.parametrize("name", ALL)
def test_shipped_class_files_build_the_evaluation_class_set(name):
    """The references' files repeat a few names across classes (coco_object's background lists
    'bed', ade847 has 'screen' twice); evaluation must accept them, user lists must not."""
    from dapseg.text import ClassSet

    names = load_dataset_spec(name).class_names()
    classes = ClassSet.from_list(names, allow_repeats=True)
    assert len(classes) == load_dataset_spec(name).num_classes
    assert max(classes.query_to_class) == len(classes) - 1
    if name == "coco_object":
        with pytest.raises(ValueError, match="duplicate class name 'bed'"):
            ClassSet.from_list(names)


def test_repeated_query_ties_go_to_the_first_class():
    """A name in two classes gives both the same probability; argmax keeps the first, as the references."""
    import torch

    from dapseg.postprocess import class_probs, labels_from_probs
    from dapseg.text import ClassSet

    classes = ClassSet.from_list(["sky; bed", "bed", "cat"], allow_repeats=True)
    assert classes.query_to_class == [0, 0, 1, 2]
    logits = torch.tensor([0.1, 0.9, 0.9, 0.2]).view(4, 1, 1)  # the two 'bed' queries score alike
    labels = labels_from_probs(class_probs(logits, 40.0, classes.query_to_class), 0.0)
    assert labels.item() == 0
