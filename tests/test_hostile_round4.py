"""Hostile inputs, round 4 (issue 24): each test builds the hostile input and checks the clear line,
the unchanged outside file or the refused value.

Decompression bombs are PNGs of a few dozen bytes whose header declares a huge size
(``hostile_files.png_declaring``): 50000x50000 is above twice Pillow's limit (Pillow refuses it while
opening), 10000x10000 is between Pillow's warning and its refusal (dapseg's own check refuses it).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from dapseg import images
from dapseg.cli import main
from hostile_files import png_declaring, truncated_png

CLASSES = "person, sky, cup"
MODEL = ["--random-weights", "--tiny", "--preset", "naclip"]
# small windows on small images: seconds per hundred images
FAST = [*MODEL, "--set", "inference.short_side=null", "--set", "inference.crop=32", "--set", "inference.stride=32",
        "--set", "templates=none"]
DEFAULT_LIMIT = Image.MAX_IMAGE_PIXELS


@pytest.fixture(autouse=True)
def _restore_pixel_limits():
    """``--max-pixels`` sets the process's limit (and may raise Pillow's): put both back."""
    before = (images._process_limit, Image.MAX_IMAGE_PIXELS)
    yield
    images._process_limit, Image.MAX_IMAGE_PIXELS = before


def _image(path: Path, size: int = 32, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def _manifest(out: Path) -> dict[str, dict]:
    lines = (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    return {(rec := json.loads(line))["name"]: rec for line in lines}


def _tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- 1. decompression bombs


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow warns between 1x and 2x
def test_load_image_refuses_before_decoding_and_names_the_file_and_limit(tmp_path: Path) -> None:
    bomb = png_declaring(tmp_path / "bomb.png", 50000, 50000)
    with pytest.raises(images.ImageTooLargeError, match=rf"{bomb}.*{DEFAULT_LIMIT:,}"):
        images.load_image(bomb)
    # Below Pillow's refusal (it only warns there): dapseg's own check, on the declared size
    between = png_declaring(tmp_path / "between.png", 10000, 10000)
    with pytest.raises(images.ImageTooLargeError, match=rf"{between} declares 10000x10000 = 100,000,000 pixels, "
                       rf"more than the limit of {DEFAULT_LIMIT:,}"):
        images.load_image(between)
    small = _image(tmp_path / "small.png", 40)
    with pytest.raises(images.ImageTooLargeError, match=r"1,600 pixels, more than the limit of 1,000"):
        images.load_image(small, max_pixels=1000)
    with pytest.raises(images.ImageTooLargeError, match=r"\(PIL image\)"):  # a PIL image, not decoded yet
        images.load_image(Image.open(small), max_pixels=1000)
    assert images.load_image(small, max_pixels=1600).shape == (40, 40, 3)
    assert images.load_image(small, max_pixels=0).shape == (40, 40, 3)  # 0: no limit
    images.check_pixels((40, 40), "x", 1600)  # the check other readers call: at the limit is fine
    with pytest.raises(images.ImageTooLargeError, match=r"upload\.png"):
        images.check_pixels((41, 40), "upload.png", 1600)


def test_set_pixel_limit_is_the_process_default_and_raises_pillows_own(tmp_path: Path) -> None:
    small = _image(tmp_path / "small.png", 40)
    images.set_pixel_limit(1000)
    with pytest.raises(images.ImageTooLargeError, match="limit of 1,000"):
        images.load_image(small)
    assert Image.MAX_IMAGE_PIXELS == DEFAULT_LIMIT  # a lower limit leaves Pillow's alone
    images.set_pixel_limit(4 * DEFAULT_LIMIT)
    assert Image.MAX_IMAGE_PIXELS == 4 * DEFAULT_LIMIT  # Pillow must not refuse below ours
    with pytest.raises(ValueError, match=">= 0"):
        images.set_pixel_limit(-1)


def test_a_bomb_a_truncated_and_an_empty_file_fail_alone_in_segment(tmp_path: Path, capsys) -> None:
    src = tmp_path / "in"
    for i in range(4):
        _image(src / f"ok{i}.png", seed=i)
    png_declaring(src / "bomb.png", 50000, 50000)
    png_declaring(src / "between.png", 10000, 10000)
    truncated_png(src / "cut.png")
    (src / "empty.png").write_bytes(b"")
    out = tmp_path / "out"
    # --workers 1: decoded in a DataLoader process, whose error must reach the manifest like the others
    rc, stdout, err = _run(capsys, "segment", str(src), "--classes", CLASSES, "--out", str(out), "--workers", "1",
                           "--save", "labels", *FAST)
    assert rc == 1 and "4 done, 0 skipped (done before), 4 failed" in stdout, err
    assert "Traceback" not in err
    manifest = _manifest(out)
    assert {n for n, r in manifest.items() if r["status"] == "done"} == {f"ok{i}.png" for i in range(4)}
    failed = {n: r["error"] for n, r in manifest.items() if r["status"] == "failed"}
    assert str(src / "bomb.png") in failed["bomb.png"] and f"{DEFAULT_LIMIT:,}" in failed["bomb.png"]
    assert "declares 10000x10000" in failed["between.png"] and f"limit of {DEFAULT_LIMIT:,}" in failed["between.png"]
    assert "truncated" in failed["cut.png"] and "cannot decode" in failed["empty.png"]
    for name, error in failed.items():
        assert f"  {src / name}: {error}" in err  # the closing list names each one


def test_max_pixels_on_the_command_line(tmp_path: Path, capsys) -> None:
    img = _image(tmp_path / "in" / "x.png", 40)
    out = tmp_path / "out"
    rc, _, err = _run(capsys, "segment", str(img), "--classes", CLASSES, "--out", str(out), "--workers", "0",
                      "--max-pixels", "1000", *FAST)
    assert rc == 1 and f"{img}: image {img} declares 40x40 = 1,600 pixels, more than the limit of 1,000" in err, err
    rc, stdout, err = _run(capsys, "segment", str(img), "--classes", CLASSES, "--out", str(out), "--workers", "0",
                           "--max-pixels", "1600", *FAST)
    assert rc == 0 and "1 done" in stdout, err


def test_eval_skip_bad_skips_a_bomb_and_counts_what_it_evaluated(tmp_path: Path, capsys) -> None:
    from eval_synth import make_dataset

    data = tmp_path / "data"
    make_dataset(data, "voc21", n=3, seed=2)
    img_dir = data / "VOCdevkit" / "VOC2012" / "JPEGImages"
    png_declaring(tmp_path / "bomb.png", 50000, 50000)
    (img_dir / "img_001.jpg").write_bytes((tmp_path / "bomb.png").read_bytes())  # a bomb named .jpg
    work = tmp_path / "w"
    args = ["eval", "--preset", "naclip", "--dataset", "voc21", "--data-root", str(data), "--work-dir", str(work),
            "--random-weights", "--tiny", "--no-progress", "--set", "inference.short_side=32", "--set",
            "inference.crop=32", "--set", "inference.stride=16", "--set", "templates=none", "--workers", "1"]
    rc, out, err = _run(capsys, *args)
    assert rc == 2 and str(img_dir / "img_001.jpg") in err and "Traceback" not in err, err
    rc, out, err = _run(capsys, *args, "--skip-bad")
    assert rc == 0 and "Traceback" not in err, err
    assert "voc21 (2 images evaluated, 1 skipped)" in out, out
    rec = json.loads((work / "naclip" / "voc21" / "result.json").read_text(encoding="utf-8"))
    assert rec["n_images"] == 2 and rec["n_bad"] == 1 and f"{DEFAULT_LIMIT:,}" in rec["bad"]["img_001"]


def test_analyze_skip_bad_skips_a_bomb(tmp_path: Path, capsys) -> None:
    from eval_synth import make_dataset

    data = tmp_path / "data"
    make_dataset(data, "voc21", n=3, seed=1)
    label = data / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "img_002.png"
    png_declaring(label, 50000, 50000)  # a label map can be a bomb too
    rc, _, err = _run(capsys, "analyze", "--dataset", "voc21", "--data-root", str(data), "--out",
                        str(tmp_path / "o"), "--random-weights", "--tiny", "--workers", "0", "--no-progress",
                        "--device", "cpu", "--window", "32", "--skip-bad")
    assert rc == 0 and "Traceback" not in err, err
    payload = json.loads((tmp_path / "o" / "ap.json").read_text(encoding="utf-8"))
    assert payload["n_images"] == 2 and str(label) in payload["bad"]["img_002"]


def test_segmenter_predict_and_predict_many_with_on_error_yield(tmp_path: Path) -> None:
    from dapseg import ImageFailure
    from dapseg.api import Segmenter

    seg = Segmenter.from_preset("naclip", random_weights=True, tiny=True, overrides={"templates": "none"})
    bomb = png_declaring(tmp_path / "bomb.png", 50000, 50000)
    with pytest.raises(images.ImageTooLargeError, match=str(bomb)):
        seg.predict(bomb, ["cat"])
    good = [_image(tmp_path / f"g{i}.png", seed=i) for i in range(2)]
    cut = truncated_png(tmp_path / "cut.png")
    sources = [good[0], bomb, tmp_path / "missing.png", cut, good[1]]
    for workers in (0, 1):
        results = list(seg.predict_many(sources, ["cat", "dog"], workers=workers, on_error="yield"))
        assert [type(r).__name__ for r in results] == ["SegmentationResult", "ImageFailure", "ImageFailure",
                                                       "ImageFailure", "SegmentationResult"]
        failures = [r for r in results if isinstance(r, ImageFailure)]
        assert [f.index for f in failures] == [1, 2, 3] and [f.source for f in failures] == sources[1:4]
        assert isinstance(failures[0].error, images.ImageTooLargeError) and str(bomb) in failures[0].message
        assert "not found" in failures[1].message and "truncated" in failures[2].message
        assert np.array_equal(results[4].labels.numpy(), seg.predict(good[1], ["cat", "dog"]).labels.numpy())
    with pytest.raises(images.ImageTooLargeError):  # the default still raises in its turn
        list(seg.predict_many([good[0], bomb], ["cat"]))
    with pytest.raises(ValueError, match="on_error"):
        seg.predict_many([good[0]], ["cat"], on_error="skip")  # type: ignore[arg-type]
    strict = Segmenter(seg.config, random_weights=True, tiny=True, max_pixels=100)
    with pytest.raises(images.ImageTooLargeError, match="limit of 100 pixels"):
        strict.predict(good[0], ["cat"])


def test_the_demo_answers_a_bomb_with_the_clear_line(tmp_path: Path) -> None:
    gr = pytest.importorskip("gradio")
    from gradio.data_classes import ImageData

    from dapseg.api import Segmenter
    from dapseg.config import load_preset
    from dapseg.demo.backend import DemoSession, Knobs
    from dapseg.pool import SegmenterPool

    bomb = png_declaring(tmp_path / "bomb.png", 50000, 50000)
    # Gradio opens each upload's header with Pillow before the demo sees it: the demo process switches
    # Pillow's own check off (dapseg checks every read itself) and asks Gradio not to decode uploads.
    images.check_pixels_before_pillow()
    widget = gr.Image(type="filepath", image_mode=None)
    assert widget.preprocess(ImageData(path=str(bomb), orig_name="bomb.png")) == str(bomb)
    session = DemoSession(SegmenterPool(lambda name: Segmenter(load_preset(name), device="cpu",
                                                               random_weights=True, tiny=True)), tmp_path / "d")
    out = session.run(str(bomb), "cat, dog", "naclip", Knobs.from_config(load_preset("naclip")))
    assert str(bomb) in out.error and f"limit of {DEFAULT_LIMIT:,} pixels" in out.error, out.error
    assert "internal error" not in out.error


# ----------------------------------------------------------------------------- 2. the journal stays inside OUT


@pytest.mark.parametrize("planted", [".dapseg", ".dapseg/journal", ".dapseg/journal/rank-0.jsonl"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_symlinked_journal_or_state_folder_is_refused(tmp_path: Path, capsys, planted: str,
                                                       overwrite: bool) -> None:
    img = _image(tmp_path / "in" / "x.png")
    outside = tmp_path / "outside"
    (outside / "journal").mkdir(parents=True)
    (outside / "journal" / "rank-0.jsonl").write_text("precious\n")
    (outside / "rank-0.jsonl").write_text("precious\n")
    before = _tree(outside)
    out = tmp_path / "out"
    link = out / planted
    link.parent.mkdir(parents=True)
    target = {".dapseg": outside, ".dapseg/journal": outside / "journal"}.get(planted, outside / "rank-0.jsonl")
    link.symlink_to(target)
    rc, _, err = _run(capsys, "segment", str(img), "--classes", CLASSES, "--out", str(out), "--workers", "0",
                      *(["--overwrite"] if overwrite else []), *FAST)
    assert rc == 2 and f"{out / planted} is a symlink" in err and "Traceback" not in err, err
    assert _tree(outside) == before  # nothing appended, created or deleted outside OUT
    assert not (out / "x_labels.png").exists()  # refused before any work


def test_the_journal_refuses_a_link_planted_after_the_checks(tmp_path: Path) -> None:
    from dapseg.labeling.job import Journal, Record

    out = tmp_path / "out"
    (out / ".dapseg" / "journal").mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (out / ".dapseg" / "journal" / "rank-3.jsonl").symlink_to(victim)
    journal = Journal(out, 3)
    with pytest.raises(ValueError, match=r"rank-3\.jsonl is a symlink"):
        journal.append(Record(name="x.png", input="x.png", outputs=[], status="failed", seconds=0.0))
    assert victim.read_text() == "precious\n"


# ----------------------------------------------------------------------------- 3. one finite rule for every float


def _float_fields(model: type[BaseModel]) -> list[str]:
    def has_float(annotation: object) -> bool:
        return annotation is float or any(has_float(a) for a in typing.get_args(annotation))

    return [name for name, info in model.model_fields.items() if has_float(info.annotation)]


def _float_params() -> list[tuple[str, str, str]]:
    from dapseg.registry import all_registries

    found = []
    for section, registry in all_registries().items():
        for name in registry.names():
            params = registry.get(name).params
            if params is not None:
                found += [(section, name, field) for field in _float_fields(params)]
    return found


FLOAT_PARAMS = _float_params()


def test_the_registries_have_float_params_to_check() -> None:
    assert len(FLOAT_PARAMS) >= 15 and ("head", "naclip", "sigma") in FLOAT_PARAMS


@pytest.mark.parametrize(("section", "name", "field"), FLOAT_PARAMS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "nan", "inf"])
def test_every_float_param_of_every_registry_refuses_nan_and_inf(section, name, field, value) -> None:
    from dapseg.registry import all_registries

    registry = all_registries()[section]
    with pytest.raises(ValueError, match=rf"{field}"):
        registry.validate(name, {field: value})


def test_a_parameter_may_say_it_takes_infinity() -> None:
    from dapseg.registry import HEADS, check_finite

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        cap: float = Field(1.0, allow_inf_nan=True)  # inf: no cap
        scale: float = 1.0
        nested: list[float] = [1.0]

    check_finite(Params(cap=math.inf))
    with pytest.raises(ValueError, match=r"scale = inf"):
        check_finite(Params(scale=math.inf))
    with pytest.raises(ValueError, match=r"nested\[1\] = nan"):
        check_finite(Params(nested=[1.0, math.nan]))

    @HEADS.register("toy_finite", params=Params)
    def toy(params: Params) -> None:  # pragma: no cover (never built)
        raise AssertionError

    try:
        assert HEADS.validate("toy_finite", {"cap": "inf"})["cap"] == math.inf
        with pytest.raises(ValueError, match="scale = nan"):
            HEADS.validate("toy_finite", {"scale": "nan"})
    finally:
        HEADS.unregister("toy_finite")


@pytest.mark.parametrize(("setting", "culprit"), [("head.params.sigma=nan", "sigma = nan"),
                                                  ("head.params.sigma=inf", "sigma = inf"),
                                                  ("postprocess.logit_scale=nan", "postprocess.logit_scale")])
def test_nan_on_the_command_line_is_refused(tmp_path: Path, capsys, setting: str, culprit: str) -> None:
    img = _image(tmp_path / "x.png")
    rc, _, err = _run(capsys, "segment", str(img), "--classes", CLASSES, "--out", str(tmp_path / "out"),
                      *MODEL, "--set", setting)
    assert rc == 2 and culprit in err and "finite" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- 4. the smaller ones


def test_a_byte_order_mark_is_not_part_of_a_class_or_a_path(tmp_path: Path, capsys) -> None:
    from dapseg.text import ClassSet

    classes = tmp_path / "classes.txt"
    classes.write_bytes("\ufeffcat\ndog; puppy\n".encode())
    assert ClassSet.from_file(classes).names == ["cat", "dog; puppy"]
    img = _image(tmp_path / "in" / "x.png")
    listing = tmp_path / "in" / "list.txt"
    listing.write_bytes("\ufeffx.png\n".encode())
    rc, stdout, err = _run(capsys, "segment", "--input-list", str(listing), "--classes-file", str(classes),
                           "--out", str(tmp_path / "out"), "--workers", "0", *FAST)
    assert rc == 0 and "1 done" in stdout, err
    assert json.loads((tmp_path / "out" / "x.json").read_text())["classes"] == ["cat", "dog; puppy"]
    assert img.exists()


DEEP = "[" * 100_000 + "]" * 100_000


def test_a_deeply_nested_labeling_job_file_names_the_file_and_the_way_out(tmp_path: Path, capsys) -> None:
    img = _image(tmp_path / "x.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "labeling-job.json").write_text(DEEP)
    rc, _, err = _run(capsys, "segment", str(img), "--classes", CLASSES, "--out", str(out), *FAST)
    assert rc == 2 and str(out / "labeling-job.json") in err and "--overwrite" in err, err
    assert "nested too deeply" in err and "Traceback" not in err and "recursion" not in err
    rc, stdout, err = _run(capsys, "segment", str(img), "--classes", CLASSES, "--out", str(out), "--overwrite",
                           "--workers", "0", *FAST)
    assert rc == 0 and "1 done" in stdout, err


@pytest.mark.parametrize("depth", [100_000, 150])  # beyond Python's parser; parsed, but deeper than any of ours
def test_a_deeply_nested_fingerprint_names_the_file_and_the_way_out(tmp_path: Path, capsys, depth: int) -> None:
    from eval_synth import make_dataset

    data = tmp_path / "data"
    make_dataset(data, "voc21", n=1, seed=2)
    job = tmp_path / "w" / "naclip" / "voc21"
    job.mkdir(parents=True)
    (job / "fingerprint.json").write_text("[" * depth + "]" * depth)
    rc, _, err = _run(capsys, "eval", "--preset", "naclip", "--dataset", "voc21", "--data-root", str(data),
                      "--work-dir", str(tmp_path / "w"), "--random-weights", "--tiny", "--no-progress",
                      "--workers", "0", "--set", "inference.short_side=32", "--set", "inference.crop=32",
                      "--set", "inference.stride=16")
    assert rc == 2 and str(job / "fingerprint.json") in err and "delete the work dir" in err, err
    assert "nested" in err and "Traceback" not in err


def test_journal_lines_for_other_names_or_outputs_are_not_the_jobs(tmp_path: Path, capsys) -> None:
    src = tmp_path / "in"
    for name in ("a.png", "b.png"):
        _image(src / name)
    out = tmp_path / "out"
    args = ["segment", str(src), "--classes", CLASSES, "--out", str(out), "--workers", "0", "--save", "labels",
            *FAST]
    rc, stdout, _ = _run(capsys, *args, "--max-pixels", "1")  # both fail: the job's settings are recorded
    assert rc == 1
    images.set_pixel_limit(DEFAULT_LIMIT)  # what the next process would have
    journal = out / ".dapseg" / "journal" / "rank-0.jsonl"
    planted = [{"name": "ghost.png", "input": "/etc/passwd", "outputs": ["../../elsewhere.png"], "status": "done",
                "seconds": 0.1},
               {"name": "a.png", "input": str(src / "a.png"), "outputs": ["../a_labels.png"], "status": "done",
                "seconds": 0.1}]
    with open(journal, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(p) + "\n" for p in planted))
    rc, stdout, err = _run(capsys, *args)
    assert rc == 0 and "2 done, 0 skipped" in stdout, (stdout, err)  # a.png's planted line did not count
    manifest = _manifest(out)
    assert sorted(manifest) == ["a.png", "b.png"]  # no ghost
    assert manifest["a.png"]["outputs"] == ["a_labels.png"] and (out / "a_labels.png").exists()


def test_one_symlink_rule_for_folder_scans_globs_and_input_lists(tmp_path: Path, capsys) -> None:
    src = tmp_path / "in"
    _image(src / "ok.png")
    outside = _image(tmp_path / "secret" / "s.png", seed=3)
    (src / "link.png").symlink_to(outside)
    listing = src / "list.txt"
    listing.write_text("ok.png\nlink.png\n")
    out = tmp_path / "out"
    for inputs in ([str(src)], [str(src / "*.png")], ["--input-list", str(listing)]):
        rc, _, err = _run(capsys, "segment", *inputs, "--classes", CLASSES, "--out", str(out), *FAST)
        assert rc == 2 and (str(src / "link.png") in err or "'link.png'" in err), (inputs, err)
        assert "leads outside" in err and "symlinks leading out are refused" in err, err
        assert not out.exists()  # before any work
    inside = src / "sub"
    _image(inside / "t.png", seed=4)
    (src / "link.png").unlink()
    (src / "link.png").symlink_to(inside / "t.png")  # a link that stays inside is an input like any other
    rc, stdout, err = _run(capsys, "segment", str(src), "--classes", CLASSES, "--out", str(out), "--workers", "0",
                           *FAST)
    assert rc == 0 and "2 done" in stdout, err
    # a file named on the command line is read where it is
    rc, stdout, err = _run(capsys, "segment", str(src / "link.png"), str(tmp_path / "secret" / "s.png"),
                           "--classes", CLASSES, "--out", str(tmp_path / "out2"), "--workers", "0", *FAST)
    assert rc == 0, err


def test_a_folder_named_like_an_image_fails_alone(tmp_path: Path, capsys) -> None:
    img = _image(tmp_path / "a.png")
    (tmp_path / "x.jpg").mkdir()
    _image(tmp_path / "x.jpg" / "inner.png")
    out = tmp_path / "out"
    rc, stdout, err = _run(capsys, "segment", str(img), str(tmp_path / "x.jpg"), "--classes", CLASSES,
                           "--out", str(out), "--workers", "0", *FAST)
    assert rc == 1 and "1 done, 0 skipped (done before), 1 failed" in stdout, err
    assert "expected an image file, got a directory" in _manifest(out)["x.jpg"]["error"]
    assert f"  {tmp_path / 'x.jpg'}: expected an image file, got a directory" in err


def test_a_large_class_list_keeps_the_legend_to_the_classes_present() -> None:
    from dapseg.viz import LEGEND_ROWS, legend, overlay

    names = [f"class {i}" for i in range(2000)]
    labels = np.zeros((8, 8), dtype=np.int64)
    labels[:4] = 7
    labels[4:, :2] = 1999
    img = overlay(np.zeros((8, 8, 3), np.uint8), labels, names)
    shares = [0.0] * 2000
    shares[0], shares[7], shares[1999] = 0.25, 0.5, 0.25
    assert img.height == legend(names[:4]).height  # 3 rows + the "not shown" row = 4 rows of a 4-name list
    assert legend(names[:LEGEND_ROWS]).height == 22 * LEGEND_ROWS + 10  # a short list shows every class
    from dapseg.viz import legend_rows

    assert legend_rows(2000, shares) == ([0, 7, 1999], 1997)
    many = [1.0 / 2000] * 2000
    shown, left = legend_rows(2000, many)
    assert len(shown) == LEGEND_ROWS and left == 2000 - LEGEND_ROWS


# ----------------------------------------------------------------------------- SIGTERM under torchrun


def test_sigterm_under_dapseg_torchrun_exits_143_without_a_traceback(tmp_path: Path, cli_env) -> None:
    """Two ranks each block on a FIFO (their second input) after one image; the scheduler's SIGTERM
    reaches the launcher and both ranks (one process group). torchrun would exit 1 with its own
    traceback here; ``python -m dapseg.torchrun`` says how the job ended in one line and exits 143."""
    src = tmp_path / "in"
    for i in (0, 1, 4, 5):
        _image(src / f"im{i}.png", seed=i)
    for i in (2, 3):  # rank 0 takes im0, im2, im4; rank 1 im1, im3, im5 (round robin over sorted names)
        os.mkfifo(src / f"im{i}.png")
    out = tmp_path / "out"
    env = {**cli_env, "DAPSEG_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dapseg.torchrun", "--standalone", "--nproc_per_node=2",
                             "-m", "dapseg", "segment", str(src), "--classes", CLASSES, "--out", str(out),
                             "--workers", "1", "--save", "labels", *FAST],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    journals = [out / ".dapseg" / "journal" / f"rank-{r}.jsonl" for r in (0, 1)]
    deadline = time.monotonic() + 240
    try:
        while not all(j.exists() and j.read_bytes().count(b"\n") == 1 for j in journals):
            assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
            assert time.monotonic() < deadline, "the ranks never reached their blocking input"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler: the launcher and every rank
        _, err_bytes = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    err = err_bytes.decode()
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err and "ChildFailedError" not in err and "SignalException" not in err, err[-3000:]
    assert "dapseg.torchrun: terminated" in err and "run the same command to resume" in err
    assert err.count("terminated (SIGTERM)") >= 2  # each rank said it stopped (and what it kept)
    assert (out / "im0_labels.png").exists() and (out / "im1_labels.png").exists()
