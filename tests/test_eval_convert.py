"""Converters: mapping tables checked against the references' facts; idempotent; refuse to overwrite."""

import numpy as np
import pytest
from PIL import Image

from dapseg.cli import main
from dapseg.data import DataError
from dapseg.data.convert import convert


def _raw(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8), mode="L").save(path)


def _coco_tree(root):
    # raw COCO-Stuff ids: 0 person, 10 (the 11th thing, traffic light), 12 (stop sign: id 11 is unused),
    # 89 toothbrush (last thing; 90 is unused), 91 (first stuff), 181 (last stuff), 255 unlabeled
    raw = np.array([[0, 10, 12, 89], [91, 181, 255, 0]])
    _raw(root / "annotations/val2017/000000000139.png", raw)
    _raw(root / "annotations/train2017/000000000009.png", raw[::-1])
    return raw


def test_coco_stuff_171_train_ids(tmp_path):
    _coco_tree(tmp_path)
    rep = convert("coco-stuff", tmp_path, progress=False)
    assert len(rep.written) == 2
    out = np.array(Image.open(tmp_path / "annotations/val2017/000000000139_labelTrainIds.png"))
    # things 0..79 in raw-id order skipping the 11 unused ids; stuff 80..170; 255 stays ignore
    assert out.tolist() == [[0, 10, 11, 79], [80, 170, 255, 0]]


def test_coco_object_background_plus_80_things(tmp_path):
    _coco_tree(tmp_path)
    convert("coco-object", tmp_path, progress=False)
    out = np.array(Image.open(tmp_path / "annotations/val2017/000000000139_instanceTrainIds.png"))
    # things -> 1..80; stuff and unlabeled -> background 0 (as the references' cvt_coco_object.py)
    assert out.tolist() == [[1, 11, 12, 80], [0, 0, 0, 1]]


def test_cityscapes_train_ids(tmp_path):
    ids = np.array([[7, 8, 11, 12, 13, 17, 19, 20, 21, 22], [23, 24, 25, 26, 27, 28, 31, 32, 33, 0]])
    _raw(tmp_path / "gtFine/val/bonn/bonn_000000_000019_gtFine_labelIds.png", ids)
    _raw(tmp_path / "gtFine/val/bonn/bonn_000000_000019_gtFine_color.png", ids)  # not an input
    rep = convert("cityscapes", tmp_path, progress=False)
    assert len(rep.written) == 1
    out = np.array(Image.open(tmp_path / "gtFine/val/bonn/bonn_000000_000019_gtFine_labelTrainIds.png"))
    assert out.tolist() == [list(range(10)), [*range(10, 19), 255]]


def test_idempotent_and_refuses_to_overwrite(tmp_path, capsys):
    _coco_tree(tmp_path)
    assert main(["convert", "coco-object", str(tmp_path), "--no-progress"]) == 0
    assert "2 written" in capsys.readouterr().out
    assert main(["convert", "coco-object", str(tmp_path), "--no-progress"]) == 0
    assert "0 written, 2 already up to date" in capsys.readouterr().out
    dst = tmp_path / "annotations/val2017/000000000139_instanceTrainIds.png"
    _raw(dst, np.zeros((2, 4)))
    with pytest.raises(DataError, match=r"000000000139_instanceTrainIds\.png exists and differs"):
        convert("coco-object", tmp_path, progress=False)
    rep = convert("coco-object", tmp_path, force=True, progress=False)
    assert rep.written == [dst]


def test_converter_bad_root(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        convert("cityscapes", tmp_path / "nope", progress=False)
    with pytest.raises(DataError, match=r"(?s)no gtFine/ folder.*labelIds\.png"):
        convert("cityscapes", tmp_path, progress=False)
