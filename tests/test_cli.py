"""End-to-end tests of ``dapseg segment / presets / download`` (issue 2, "Bad input").

Tiny random-weight models, offline, an empty weights cache. The full runs (a folder of photos with
a missing and a corrupt image; ``download`` offline) go through ``python -m dapseg`` in a
subprocess; the argument checks call the same entry point, ``dapseg.cli.main(argv)``, in this
process, because each subprocess costs seconds of imports (torch, open_clip) on a 2-core CI box.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data

SMOKE = ["--preset", "naclip", "--random-weights", "--tiny"]
CLASSES = "person, sky; clouds, cup"
N_CLASSES = 3
PRESETS = ["clip", "maskclip", "sclip", "naclip", "naclip-pamr"]  # issue 2's presets
HEADS = ["vanilla", "maskclip", "sclip", "naclip"]


def _small(img: np.ndarray, scale: int) -> np.ndarray:
    """Shrink a photo by an integer factor (keeps tests fast; the preset resizes to short side 336)."""
    return np.asarray(Image.fromarray(img).resize((img.shape[1] // scale, img.shape[0] // scale)))


def _photos(folder: Path) -> dict[str, np.ndarray]:
    """astronaut.png, coffee.jpg, chelsea.png in ``folder``; returns the arrays as decoded from disk."""
    folder.mkdir(parents=True, exist_ok=True)
    images = {
        "astronaut.png": _small(data.astronaut(), 4),  # (128, 128)
        "coffee.jpg": _small(data.coffee(), 4),  # (100, 150)
        "chelsea.png": _small(data.chelsea(), 3),  # (100, 150)
    }
    for name, img in images.items():
        Image.fromarray(img).save(folder / name)
    return {name: np.asarray(Image.open(folder / name).convert("RGB")) for name in images}


def _check_outputs(out: Path, stem: str, size: tuple[int, int], classes: list[str]) -> None:
    """The three outputs of one image: palette labels, overlay, JSON consistent with the labels."""
    h, w = size
    with Image.open(out / f"{stem}_labels.png") as lab:
        assert lab.format == "PNG" and lab.mode == "P"
        labels = np.asarray(lab)
    assert labels.shape == (h, w)
    assert labels.max() < len(classes)
    with Image.open(out / f"{stem}_overlay.png") as ov:
        assert ov.format == "PNG" and ov.mode == "RGB"
        assert ov.width > w and ov.height >= h  # the image plus a legend panel to its right
    summary = json.loads((out / f"{stem}.json").read_text(encoding="utf-8"))
    assert summary["classes"] == classes
    assert summary["size"] == [h, w]
    shares = summary["pixel_share"]
    assert list(shares) == classes
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-9)
    # The shares are those of the label PNG, counted here independently.
    counts = np.bincount(labels.ravel(), minlength=len(classes)) / labels.size
    assert [shares[c] for c in classes] == pytest.approx(counts.tolist(), abs=1e-9)


def _no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr


# ----------------------------------------------------------------------------- one folder, mixed inputs

@pytest.fixture(scope="module")
def folder_run(cli_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    """``segment imgs/ missing.png`` where imgs/ holds three photos and a corrupt .jpg."""
    root = tmp_path_factory.mktemp("folder_run")
    photos = _photos(root / "imgs")
    rng = np.random.default_rng(0)
    (root / "imgs" / "broken.jpg").write_bytes(rng.integers(0, 256, 2000, dtype=np.uint8).tobytes())
    missing = root / "missing.png"
    out = root / "out"
    env = {**cli_env, "DAPSEG_CACHE": str(root / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "dapseg", "segment", str(root / "imgs"), str(missing),
         "--classes", CLASSES, "--out", str(out), *SMOKE],
        capture_output=True, text=True, env=env, timeout=300,
    )
    return proc, photos, root, out


def test_segment_folder_writes_three_outputs_per_image(folder_run) -> None:
    proc, photos, _, out = folder_run
    for name, img in photos.items():
        _check_outputs(out, Path(name).stem, img.shape[:2], ["person", "sky; clouds", "cup"])
    assert "segmented 3/5 images" in proc.stdout
    # Atomic writes leave no temporaries behind; the failed images leave no outputs. Besides the
    # outputs: the job's settings, its manifest, and the hidden journal (the lock files end with the run).
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted([f"{s}{suffix}" for s in ("astronaut", "coffee", "chelsea")
                              for suffix in ("_labels.png", "_overlay.png", ".json")]
                             + ["labeling-job.json", "manifest.jsonl", ".dapseg"])
    assert sorted(p.name for p in (out / ".dapseg" / "journal").iterdir()) == ["rank-0.jsonl"]


def test_segment_missing_image_is_named_and_exit_code_nonzero(folder_run) -> None:
    proc, _, root, _ = folder_run
    assert proc.returncode != 0
    _no_traceback(proc)
    lines = proc.stderr.strip().splitlines()
    missing_lines = [line for line in lines if str(root / "missing.png") in line]
    assert missing_lines and "not found" in missing_lines[0]


def test_segment_corrupt_image_is_named(folder_run) -> None:
    proc, _, root, _ = folder_run
    broken = [line for line in proc.stderr.splitlines() if str(root / "imgs" / "broken.jpg") in line]
    assert broken and "cannot decode" in broken[0]


def test_segment_failures_reported_at_the_end(folder_run) -> None:
    proc, _, root, _ = folder_run
    lines = proc.stderr.strip().splitlines()
    # The report is the last thing printed: a count, then one line per failed image.
    assert lines[-3].strip() == "2 failed:"
    assert {lines[-2].split(": ")[0].strip(), lines[-1].split(": ")[0].strip()} == {
        str(root / "imgs" / "broken.jpg"),
        str(root / "missing.png"),
    }


def test_segment_glob_and_classes_file_with_synonyms(cli, tmp_path: Path) -> None:
    photos = _photos(tmp_path / "imgs")
    classes_file = tmp_path / "classes.txt"
    classes_file.write_text("person; astronaut\n\nsky; clouds; heaven\ncat\n", encoding="utf-8")
    out = tmp_path / "out"
    proc = cli("segment", str(tmp_path / "imgs" / "*.png"), "--classes-file", str(classes_file),
                   "--out", str(out), *SMOKE)
    assert proc.returncode == 0, proc.stderr
    classes = ["person; astronaut", "sky; clouds; heaven", "cat"]
    for name in ("astronaut.png", "chelsea.png"):  # the glob matches the PNGs only
        _check_outputs(out, Path(name).stem, photos[name].shape[:2], classes)
    assert not (out / "coffee.json").exists()
    assert "segmented 2/2 images" in proc.stdout


def test_output_names_mirror_the_input_path_alone(tmp_path: Path) -> None:
    """Names never depend on the order or on the other inputs (issue 19); clashes are errors
    (tests/test_labeling.py)."""
    from dapseg.labeling.inputs import collect_inputs

    for rel in ("x/a.png", "x/a_1.png", "x/sub/a.png", "b.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / rel)
    folder = {i.rel for i in collect_inputs([str(tmp_path / "x")], recursive=True)}
    assert folder == {"a.png", "a_1.png", "sub/a.png"}
    alone = collect_inputs([str(tmp_path / "x" / "a_1.png"), str(tmp_path / "b.png")])
    assert [i.rel for i in alone] == ["a_1.png", "b.png"]
    globbed = collect_inputs([str(tmp_path / "x" / "*" / "a.png")])
    assert [i.rel for i in globbed] == ["sub/a.png"]
    assert [i.stem for i in globbed] == ["sub/a"]


# ----------------------------------------------------------------------------- bad class lists

@pytest.mark.parametrize(
    ("classes", "expected"),
    [
        ("", "class list is empty"),
        ("cat,,dog", "class 2 has an empty name"),
        ("cat, dog, cat", "duplicate class name 'cat'"),
        ("Cat, dog; CAT", "duplicate class name 'CAT'"),  # case-insensitive, across synonyms
    ],
)
def test_segment_bad_classes_clear_error(cli, tmp_path: Path, classes: str, expected: str) -> None:
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    proc = cli("segment", str(img), "--classes", classes, "--out", str(tmp_path / "out"), *SMOKE)
    assert proc.returncode != 0
    _no_traceback(proc)
    assert expected in proc.stderr
    assert not (tmp_path / "out" / "a.json").exists()


def test_missing_classes_file_is_named(cli, tmp_path: Path) -> None:
    missing = tmp_path / "classes.txt"
    proc = cli("segment", str(tmp_path / "a.png"), "--classes-file", str(missing),
               "--out", str(tmp_path / "out"), *SMOKE)
    assert proc.returncode != 0
    assert f"cannot read class file {missing}" in proc.stderr


# ----------------------------------------------------------------------------- bad settings

def test_unknown_preset_lists_valid_presets(cli, tmp_path: Path) -> None:
    proc = cli("segment", str(tmp_path / "a.png"), "--classes", "cat", "--preset", "nope",
                   "--random-weights", "--tiny", "--out", str(tmp_path / "out"))
    assert proc.returncode != 0
    _no_traceback(proc)
    assert "unknown preset 'nope'" in proc.stderr
    for name in PRESETS:
        assert name in proc.stderr


def test_unknown_head_lists_valid_heads(cli, tmp_path: Path) -> None:
    proc = cli("segment", str(tmp_path / "a.png"), "--classes", "cat", "--set", "head.name=nope",
                   "--out", str(tmp_path / "out"), *SMOKE)
    assert proc.returncode != 0
    _no_traceback(proc)
    assert "unknown head 'nope'" in proc.stderr
    for name in HEADS:
        assert name in proc.stderr


def test_unwritable_output_directory_is_named(cli, tmp_path: Path) -> None:
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a regular file", encoding="utf-8")
    out = blocker / "out"  # its parent is a file: unwritable even for root
    proc = cli("segment", str(img), "--classes", "cat, dog", "--out", str(out), *SMOKE)
    assert proc.returncode != 0
    _no_traceback(proc)
    assert f"output directory {out}" in proc.stderr
    assert "not writable" in proc.stderr


def test_tiny_without_random_weights_is_refused(cli, tmp_path: Path) -> None:
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    proc = cli("segment", str(img), "--classes", "cat, dog", "--preset", "naclip", "--tiny",
                   "--out", str(tmp_path / "out"))
    assert proc.returncode != 0
    _no_traceback(proc)
    assert "--tiny needs --random-weights" in proc.stderr


# ----------------------------------------------------------------------------- presets, download

def test_presets_lists_presets(cli) -> None:
    proc = cli("presets")
    assert proc.returncode == 0, proc.stderr
    listed = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    for name in PRESETS:
        assert name in listed
    assert "naclip-fsa" in listed  # every preset gets its FSA variant


def test_download_offline_fails_fast_naming_weights_and_command(run_cli) -> None:
    start = time.monotonic()
    proc = run_cli("download", "naclip", timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    _no_traceback(proc)
    assert elapsed < 60
    assert "weights missing: CLIP ViT-B-16 (openai)" in proc.stderr
    assert "dapseg download naclip" in proc.stderr


# ----------------------------------------------------------------------------- large image (API)

def test_image_larger_than_4096_is_segmented_at_input_size() -> None:
    from dapseg import Segmenter

    seg = Segmenter.from_preset("naclip", random_weights=True, tiny=True)
    rng = np.random.default_rng(0)
    # A wide strip (300 x 4200): the preset resizes it to 336 x 4704 and slides 224/112 windows.
    img = np.repeat(_small(data.coffee(), 2)[:, :1, :], 4200, axis=1)[:150]
    img = np.concatenate([img, rng.integers(0, 256, (150, 4200, 3), dtype=np.uint8)], axis=0)
    res = seg.predict(img, "cup, table, noise")
    assert res.labels.shape == (300, 4200) and res.labels.dtype == torch.int64
    # Naive labels: bilinear upsampling of the coarse logits, softmax(40 * logits), argmax. The
    # banded computation must agree except where two classes tie to float precision.
    full = F.interpolate(res.coarse_logits[None], size=(300, 4200), mode="bilinear", align_corners=False)[0]
    probs = torch.softmax(full * seg.config.postprocess.logit_scale, dim=0)
    top2 = probs.topk(2, dim=0).values
    differ = res.labels != probs.argmax(dim=0)
    assert bool(((top2[0] - top2[1])[differ] < 1e-4).all())
    assert res.label_image().size == (4200, 300)
