"""Bad and odd inputs through the user's surface, `dapseg segment`, in one place.

Every input that cannot be used must end with a clear message that names the culprit (file,
argument, class, setting), a non-zero exit code, no traceback and no partial output files; every
image that decodes must give finite probabilities and logits. The command runs in-process
(``dapseg.cli.main``, tiny random-weight models) except for one subprocess check that a real run
prints no traceback.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dapseg.api import Segmenter
from dapseg.cli import main

TINY = ["--random-weights", "--tiny", "--preset", "naclip"]


def segment(capsys: pytest.CaptureFixture[str], inputs: list[str | Path], *args: str) -> tuple[int, str]:
    """Run `dapseg segment INPUTS ARGS` in-process; (exit code, stderr)."""
    capsys.readouterr()
    rc = main(["segment", *map(str, inputs), *args])
    return rc, capsys.readouterr().err


def assert_clean_failure(rc: int, err: str, culprit: str, out: Path) -> None:
    assert rc != 0
    assert culprit in err, err
    assert "Traceback" not in err
    assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())  # nothing written, no stray folder


def output_files(out: Path, stem: str) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith((stem, f".{stem}"))) if out.exists() else []


# ----------------------------------------------------------------------------- images


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from skimage import data

    d = tmp_path_factory.mktemp("images")
    photo = data.astronaut()[::8, ::8]  # (64, 64, 3)
    paths = {name: d / name for name in (
        "empty.png", "text.png", "truncated.jpg", "good.png",
        "one_pixel.png", "wide.png", "deep16.png", "rgba.png", "black.jpg",
    )}
    paths["empty.png"].write_bytes(b"")
    paths["text.png"].write_text("this is not an image\n", encoding="utf-8")
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="JPEG")
    paths["truncated.jpg"].write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    Image.fromarray(photo).save(paths["good.png"])
    Image.fromarray(photo[:1, :1]).save(paths["one_pixel.png"])
    wide = np.tile(photo[:10, :, :], (1, 10000 // 64 + 1, 1))[:, :10000]  # 10 high, 10000 wide
    Image.fromarray(np.ascontiguousarray(wide)).save(paths["wide.png"])
    deep = (np.linspace(0, 65535, 48 * 40).reshape(40, 48)).astype(np.uint16)
    Image.fromarray(deep).save(paths["deep16.png"])
    rgba = np.concatenate([photo, np.full((*photo.shape[:2], 1), 128, np.uint8)], axis=-1)
    Image.fromarray(rgba, mode="RGBA").save(paths["rgba.png"])
    Image.fromarray(np.zeros((30, 50, 3), np.uint8)).save(paths["black.jpg"])
    return paths


def test_images_that_do_not_decode_are_named_and_leave_no_files(images, capsys, tmp_path):
    out = tmp_path / "out"
    bad = {"empty.png": "cannot decode", "text.png": "cannot decode", "truncated.jpg": "cannot decode"}
    rc, err = segment(capsys, [*(images[n] for n in bad), images["good.png"]], "--classes", "person, sky",
                      "--out", str(out), *TINY)
    assert rc == 1  # the others were still segmented
    assert "Traceback" not in err
    for name, why in bad.items():
        line = next((ln for ln in err.splitlines() if str(images[name]) in ln), "")
        assert why in line, err
        assert output_files(out, Path(name).stem) == []
    assert output_files(out, "good") == ["good.json", "good_labels.png", "good_overlay.png"]
    # no temporary files left (the journal folder is the job's own; the lock files end with the run)
    assert not [p for p in out.rglob(".*.tmp*")]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".dapseg"]


ODD_IMAGES = ["one_pixel.png", "wide.png", "deep16.png", "rgba.png", "black.jpg"]


def test_odd_images_that_decode_are_segmented(images, capsys, tmp_path):
    out = tmp_path / "out"
    rc, err = segment(capsys, [images[n] for n in ODD_IMAGES], "--classes", "person, sky; clouds",
                      "--out", str(out), *TINY)
    assert rc == 0, err
    for name in ODD_IMAGES:
        stem = Path(name).stem
        assert output_files(out, stem) == [f"{stem}.json", f"{stem}_labels.png", f"{stem}_overlay.png"]
        with Image.open(images[name]) as src, Image.open(out / f"{stem}_labels.png") as labels:
            assert labels.size == src.size
        summary = json.loads((out / f"{stem}.json").read_text(encoding="utf-8"))
        shares = list(summary["pixel_share"].values())
        assert all(np.isfinite(shares)) and sum(shares) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("preset", ["naclip", "proxyclip", "dap"])
def test_no_nan_for_any_image_that_decodes(images, preset):
    seg = Segmenter.from_preset(preset, random_weights=True, tiny=True, device="cpu")
    for name in [*ODD_IMAGES, "good.png"]:
        result = seg.predict(images[name], ["person", "sky", "rocket"])  # no synonyms: probs sum to 1
        with Image.open(images[name]) as src:
            assert tuple(result.labels.shape) == src.size[::-1]
        assert torch.isfinite(result.probs).all(), name
        assert torch.isfinite(result.logits).all(), name
        torch.testing.assert_close(result.probs.sum(0), torch.ones(result.labels.shape), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- classes


@pytest.mark.parametrize(
    ("classes", "culprit"),
    [
        ("", "class list is empty"),
        (",,,", "class 1 has an empty name"),
        ("cat, dog, Cat", "duplicate class name 'Cat' (in classes 1 and 3)"),
        ("cat; cat", "duplicate class name 'cat'"),
    ],
)
def test_unusable_class_lists_are_refused(images, capsys, tmp_path, classes, culprit):
    out = tmp_path / "out"
    rc, err = segment(capsys, [images["good.png"]], "--classes", classes, "--out", str(out), *TINY)
    assert_clean_failure(rc, err, culprit, out)


@pytest.mark.parametrize(
    ("classes", "extra"),
    [
        (["cat"], []),
        (["🐱", "🐶; 🐕", "🌤️ sky"], []),
        (["a" * 10_000, "dog"], []),
        ([f"thing {i}" for i in range(1000)], ["--set", "templates=none"]),  # 1 prompt per class, not 80
    ],
    ids=["one-class", "emoji", "10k-character-name", "1000-classes"],
)
def test_odd_but_valid_class_lists_are_segmented(images, capsys, tmp_path, classes, extra):
    out = tmp_path / "out"
    rc, err = segment(capsys, [images["good.png"]], "--classes", ", ".join(classes), "--out", str(out),
                      *TINY, *extra)
    assert rc == 0, err
    summary = json.loads((out / "good.json").read_text(encoding="utf-8"))
    assert summary["classes"] == classes
    shares = list(summary["pixel_share"].values())
    assert len(shares) == len(classes) and all(np.isfinite(shares))
    with Image.open(out / "good_labels.png") as labels:
        assert int(np.asarray(labels).max()) < len(classes)


# ----------------------------------------------------------------------------- configs


def test_config_with_python_tag_is_refused_and_never_executed(images, capsys, tmp_path):
    marker = tmp_path / "executed"
    config = tmp_path / "evil.yaml"
    config.write_text(f"base: naclip\ninference: !!python/object/apply:os.system [\"touch {marker}\"]\n",
                      encoding="utf-8")
    out = tmp_path / "out"
    rc, err = segment(capsys, [images["good.png"]], "--classes", "cat", "--out", str(out),
                      "--random-weights", "--tiny", "--config", str(config))
    assert_clean_failure(rc, err, str(config), out)
    assert "python/object/apply" in err and not marker.exists()


def test_config_with_python_tag_in_a_real_process(images, run_cli, tmp_path):
    marker = tmp_path / "executed"
    config = tmp_path / "evil.yaml"
    config.write_text(f"inference: !!python/object/apply:os.system [\"touch {marker}\"]\n", encoding="utf-8")
    proc = run_cli("segment", str(images["good.png"]), "--classes", "cat", "--out", str(tmp_path / "out"),
                   "--random-weights", "--tiny", "--config", str(config))
    assert proc.returncode == 2 and str(config) in proc.stderr
    assert "Traceback" not in proc.stderr and not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "culprit"),
    [
        (["--config", "{tmp}/missing.yaml"], "cannot read config file {tmp}/missing.yaml"),
        (["--config", "{tmp}/list.yaml"], "config file {tmp}/list.yaml must hold a mapping"),
        (["--config", "{tmp}/broken.toml"], "config file {tmp}/broken.toml is not valid TOML"),
        (["--set", "windw=3"], "unknown setting 'windw'"),
        (["--set", "inference.windw=3"], "invalid setting inference.windw"),
        (["--set", "inference.crop=big"], "invalid setting inference.crop"),
        (["--set", "postprocess.prob_thd=[1]"], "invalid setting postprocess.prob_thd"),
        (["--set", "inference.stride=300"], "inference.stride (300) is larger than inference.crop (224)"),
        (["--set", "inference.short_side=0"], "invalid setting inference.short_side: must be >= 1"),
        (["--set", "inference.short_side=-336"], "invalid setting inference.short_side: must be >= 1"),
        (["--set", "inference.max_batch=0"], "invalid setting inference.max_batch: must be >= 1"),
        (["--set", "inference.crop=0"], "invalid setting inference.crop: must be >= 1"),
        (["--set", "postprocess.prob_thd=1.5"], "invalid setting postprocess.prob_thd: must be in [0, 1]"),
        (["--set", "inference.mode=diagonal"], "invalid setting inference.mode"),
    ],
)
def test_bad_configs_and_settings_are_named(images, capsys, tmp_path, args, culprit):
    (tmp_path / "list.yaml").write_text("- base: naclip\n", encoding="utf-8")
    (tmp_path / "broken.toml").write_text("base = 'naclip\n", encoding="utf-8")
    args = [a.format(tmp=tmp_path) for a in args]
    if "--config" not in args:
        args = [*args, "--preset", "naclip"]
    out = tmp_path / "out"
    rc, err = segment(capsys, [images["good.png"]], "--classes", "cat", "--out", str(out),
                      "--random-weights", "--tiny", *args)
    assert_clean_failure(rc, err, culprit.format(tmp=tmp_path), out)


# ----------------------------------------------------------------------------- weights


class _RunsCode:
    """Unpickling this would call os.system: a weights file must never be unpickled this way."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _truncated(path: Path) -> Path:
    data = path.read_bytes()
    cut = path.with_name(f"truncated{path.suffix}")
    cut.write_bytes(data[: len(data) // 2])
    return cut


@pytest.mark.parametrize("kind", ["torch-save", "raw-pickle", "truncated-pt", "truncated-safetensors"])
def test_bad_weight_files_are_refused_and_never_executed(images, capsys, tmp_path, kind):
    from safetensors.torch import save_file

    marker = tmp_path / "executed"
    state = {"visual.proj": torch.zeros(4, 4)}
    if kind == "torch-save":
        path = tmp_path / "evil.pt"
        torch.save({"visual.proj": _RunsCode(marker)}, path)
        culprit = f"refusing weights file {path}"
    elif kind == "raw-pickle":
        path = tmp_path / "evil.bin"
        path.write_bytes(pickle.dumps({"visual.proj": _RunsCode(marker)}))
        culprit = f"refusing weights file {path}"
    elif kind == "truncated-pt":
        full = tmp_path / "full.pt"
        torch.save(state, full)
        path = _truncated(full)
        culprit = f"cannot read weights file {path} (truncated, corrupt"
    else:
        full = tmp_path / "full.safetensors"
        save_file(state, str(full))
        path = _truncated(full)
        culprit = f"cannot read weights file {path} (truncated, corrupt"
    out = tmp_path / "out"
    # Real (not random) weights: the file is read before the full-size CLIP is even built.
    rc, err = segment(capsys, [images["good.png"]], "--classes", "cat", "--out", str(out), "--preset", "clip",
                      "--clip-weights", str(path))
    assert_clean_failure(rc, err, culprit, out)
    assert not marker.exists()


# ----------------------------------------------------------------------------- output


def test_unwritable_out_is_named_before_any_work(images, capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x", encoding="utf-8")
    out = blocker / "out"  # its parent is a file: unwritable even for root
    rc, err = segment(capsys, [images["good.png"]], "--classes", "cat", "--out", str(out), *TINY)
    assert_clean_failure(rc, err, f"output directory {out} is not writable", out)
    assert blocker.read_text(encoding="utf-8") == "x"


def test_a_run_that_fails_early_creates_no_output_folder(images, capsys, tmp_path):
    out = tmp_path / "new" / "out"
    rc, err = segment(capsys, [images["good.png"]], "--classes", "cat", "--out", str(out), *TINY,
                      "--set", "inference.max_batch=0")
    assert_clean_failure(rc, err, "inference.max_batch", out)
    assert not (tmp_path / "new").exists()
