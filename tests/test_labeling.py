"""Labeling a collection with `dapseg segment` (issue 19): torchrun sharding, names mirroring the
inputs, resuming after `kill -9`, reruns that rewrite nothing, input lists, probs and COCO RLE, the
manifest, and ``Segmenter.predict_many``.

One reference run (in this process, one torch thread like every torchrun rank) labels a small tree of
photos; the other runs are compared with it file for file. Runs that must be real processes
(torchrun, ``kill -9``) go through subprocesses; the rest call ``dapseg.cli.main`` here (a subprocess
costs seconds of imports on a 2-core CI box).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dapseg.cli import main

CLASSES = "person, sky; clouds, cup"
NAMES = ["person", "sky; clouds", "cup"]
MODEL = ["--random-weights", "--tiny", "--preset", "naclip"]
ALL_KINDS = "labels,overlay,json,probs,rle"
# Inputs sorted by name; a/x.png is the 4th, where the kill test blocks the run.
TREE = {"a/b/y.png": (0, 6), "a/b/z.jpg": (1, 7), "a/c.png": (2, 8), "a/x.png": (0, 5), "d/w.png": (1, 9),
        "im0.png": (2, 6), "im1.jpg": (0, 10)}


def _photo(which: int, step: int) -> np.ndarray:
    from skimage import data

    photo = [data.astronaut, data.coffee, data.chelsea][which]()
    return np.ascontiguousarray(photo[::step, ::step])


def _write_tree(root: Path) -> None:
    for rel, (which, step) in TREE.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_photo(which, step)).save(root / rel)


def _segment(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`dapseg segment ARGS` in this process with one torch thread; (exit code, stdout, stderr)."""
    capsys.readouterr()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = main(["segment", *args])
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _files(out: Path) -> dict[str, Path]:
    """The outputs: every file whose path has no hidden part (the lock and the journals are hidden)."""
    return {p.relative_to(out).as_posix(): p for p in sorted(out.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(out).parts)}


def _manifest(out: Path, drop: tuple[str, ...] = ("seconds",)) -> list[dict]:
    lines = (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in lines]


def _same_files(a: Path, b: Path, *, ignore_input_path: bool = False) -> None:
    """Every output of ``a`` equals ``b``'s byte for byte (the manifest up to timings; with
    ``ignore_input_path``, the summary JSONs and manifest up to the path the image was read from)."""
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    for name, path in fa.items():
        if name == "manifest.jsonl":
            drop = ("seconds", "input") if ignore_input_path else ("seconds",)
            assert _manifest(a, drop) == _manifest(b, drop)
        elif ignore_input_path and _is_summary(name):
            ja, jb = (json.loads(p.read_text(encoding="utf-8")) for p in (path, fb[name]))
            assert {**ja, "image": None} == {**jb, "image": None}, name
        else:
            assert path.read_bytes() == fb[name].read_bytes(), name


def _is_summary(name: str) -> bool:
    return name.endswith(".json") and not name.endswith("_rle.json") and name != "labeling-job.json"


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tree") / "in"
    _write_tree(root)
    return root


@pytest.fixture(scope="module")
def reference(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, every output kind, the whole tree."""
    out = tmp_path_factory.mktemp("reference") / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = main(["segment", str(tree), "--recursive", "--classes", CLASSES, "--save", ALL_KINDS,
                   "--out", str(out), "--workers", "0", *MODEL])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    return out


def _env(cli_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    return {**cli_env, "DAPSEG_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}


# ----------------------------------------------------------------------------- names and outputs


def test_outputs_mirror_the_input_tree(reference: Path) -> None:
    suffixes = ["_labels.png", "_overlay.png", ".json", "_probs.npz", "_rle.json"]
    expected = {str(Path(rel).with_suffix("")) + s for rel in TREE for s in suffixes}
    assert set(_files(reference)) == expected | {"manifest.jsonl", "labeling-job.json"}


def test_manifest_has_one_line_per_image_with_its_shares(reference: Path, tree: Path) -> None:
    lines = _manifest(reference)
    assert [line["name"] for line in lines] == sorted(TREE)
    for line in lines:
        assert line["status"] == "done" and line["error"] is None
        assert line["input"] == str(tree / line["name"])
        assert all((reference / o).is_file() for o in line["outputs"])
        stem = str(Path(line["name"]).with_suffix(""))
        labels = np.asarray(Image.open(reference / f"{stem}_labels.png"))
        counts = np.bincount(labels.ravel(), minlength=len(NAMES)) / labels.size
        assert [line["pixel_share"][n] for n in NAMES] == pytest.approx(counts.tolist(), abs=1e-12)


def test_probs_are_float16_class_probabilities_at_input_size(reference: Path, tree: Path) -> None:
    from dapseg.api import Segmenter

    seg = Segmenter.from_preset("naclip", random_weights=True, tiny=True)
    for rel in ("a/x.png", "im1.jpg"):
        stem = str(Path(rel).with_suffix(""))
        with np.load(reference / f"{stem}_probs.npz", allow_pickle=False) as f:
            probs, classes = f["probs"], f["classes"]
        image = np.asarray(Image.open(tree / rel).convert("RGB"))
        assert probs.dtype == np.float16 and probs.shape == (len(NAMES), *image.shape[:2])
        assert classes.tolist() == NAMES
        torch.set_num_threads(1)
        expected = seg.predict(image, CLASSES).probs.numpy()
        np.testing.assert_allclose(probs.astype(np.float32), expected, atol=1e-3)  # float16 rounding
        labels = np.asarray(Image.open(reference / f"{stem}_labels.png"))
        top2 = np.sort(expected, axis=0)[-2:]
        clear = top2[1] - top2[0] > 1e-2  # argmax of the stored probs where no float16 tie is possible
        assert (probs.argmax(0) == labels)[clear].all()


def test_rle_decodes_to_the_label_masks(reference: Path) -> None:
    from pycocotools import mask as mask_utils

    for rel in TREE:
        stem = str(Path(rel).with_suffix(""))
        doc = json.loads((reference / f"{stem}_rle.json").read_text(encoding="utf-8"))
        labels = np.asarray(Image.open(reference / f"{stem}_labels.png"))
        h, w = labels.shape
        assert doc["images"] == [{"id": 1, "file_name": rel, "height": h, "width": w}]
        assert [c["name"] for c in doc["categories"]] == NAMES
        covered = np.zeros((h, w), np.int64)
        for ann in doc["annotations"]:
            rle = {"size": ann["segmentation"]["size"], "counts": ann["segmentation"]["counts"].encode()}
            mask = mask_utils.decode(rle)
            np.testing.assert_array_equal(mask, labels == ann["category_id"] - 1)
            assert ann["area"] == int(mask.sum())
            covered += mask
        assert (covered == 1).all()  # every pixel in exactly one class's mask
        assert {a["category_id"] - 1 for a in doc["annotations"]} == set(np.unique(labels).tolist())


# ----------------------------------------------------------------------------- torchrun, kill -9, rerun


def test_two_torchrun_processes_equal_one(reference: Path, tree: Path, cli_env, tmp_path: Path) -> None:
    out = tmp_path / "out2"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "dapseg", "segment", str(tree), "--recursive", "--classes", CLASSES, "--save", ALL_KINDS,
         "--out", str(out), "--workers", "1", *MODEL],
        capture_output=True, text=True, env=_env(cli_env, tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _same_files(reference, out)
    # Both ranks worked, on disjoint shares that cover every image once.
    shares = [{json.loads(line)["name"] for line in (out / ".dapseg" / "journal" / f"rank-{r}.jsonl")
               .read_text(encoding="utf-8").splitlines()} for r in (0, 1)]
    assert shares[0] and shares[1] and not shares[0] & shares[1] and shares[0] | shares[1] == set(TREE)
    assert proc.stdout.count("segmented 7/7 images") == 1  # one summary, from rank 0


def _stat(paths: dict[str, Path]) -> dict[str, tuple[int, int]]:
    return {name: (p.stat().st_ino, p.stat().st_mtime_ns) for name, p in paths.items()}


def test_kill_9_then_the_same_command_finishes_and_redoes_nothing(reference: Path, cli_env, tmp_path: Path,
                                                                   capsys) -> None:
    """The 4th input is a FIFO: decoding blocks on it, so the kill lands at a known point (3 images
    done), mid-run, with a decoding worker alive."""
    root = tmp_path / "in"
    _write_tree(root)
    (root / "a/x.png").unlink()
    os.mkfifo(root / "a/x.png")
    out = tmp_path / "out"
    args = [str(root), "--recursive", "--classes", CLASSES, "--save", ALL_KINDS, "--out", str(out), *MODEL]
    proc = subprocess.Popen([sys.executable, "-m", "dapseg", "segment", *args, "--workers", "1"],
                            env=_env(cli_env, tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    journal = out / ".dapseg" / "journal" / "rank-0.jsonl"
    deadline = time.monotonic() + 240
    while not (journal.exists() and journal.read_bytes().count(b"\n") == 3):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the run never reached the blocking input"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()
    finished = {name: p for name, p in _files(out).items() if name.startswith(("a/b/", "a/c"))}
    assert len(finished) == 3 * 5  # three images, five kinds, nothing of the others
    before = _stat(finished)

    (root / "a/x.png").unlink()
    Image.fromarray(_photo(*TREE["a/x.png"])).save(root / "a/x.png")
    rc, stdout, err = _segment(capsys, *args, "--workers", "0")
    assert rc == 0, err
    assert "4 done, 3 skipped" in stdout
    assert _stat(finished) == before  # the finished images were not rewritten
    names = [json.loads(line)["name"] for line in journal.read_text(encoding="utf-8").splitlines()]
    assert sorted(names) == sorted(TREE)  # each image done exactly once over both runs
    _same_files(reference, out, ignore_input_path=True)


def test_a_rerun_over_a_finished_out_rewrites_nothing(reference: Path, tree: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    state = [out / ".dapseg" / "journal" / "rank-0.jsonl"]
    before = _stat({**_files(out), **{str(p): p for p in state}})
    rc, stdout, err = _segment(capsys, str(tree), "--recursive", "--classes", CLASSES, "--save", ALL_KINDS,
                               "--out", str(out), *MODEL)
    assert rc == 0, err
    assert "0 done, 7 skipped" in stdout
    assert _stat({**_files(out), **{str(p): p for p in state}}) == before


# ----------------------------------------------------------------------------- input lists


def test_input_list_outputs_mirror_the_listed_paths(reference: Path, tree: Path, tmp_path: Path, capsys) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two images and an absolute one\na/x.png\n\nim1.jpg\n{tree / 'd/w.png'}\n",
                       encoding="utf-8")
    out = tmp_path / "out"
    rc, _, err = _segment(capsys, "--input-list", str(listing), "--input-root", str(tree), "--classes", CLASSES,
                          "--save", "labels,rle", "--out", str(out), *MODEL)
    assert rc == 0, err
    names = {"a/x_labels.png", "a/x_rle.json", "im1_labels.png", "im1_rle.json", "d/w_labels.png", "d/w_rle.json"}
    assert set(_files(out)) == names | {"manifest.jsonl", "labeling-job.json"}
    for name in names:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


def test_input_list_from_stdin(reference: Path, tree: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tree)
    monkeypatch.setattr(sys, "stdin", io.StringIO("a/b/z.jpg\n"))
    out = tmp_path / "out"
    rc, _, err = _segment(capsys, "--input-list", "-", "--classes", CLASSES, "--save", "labels",
                          "--out", str(out), *MODEL)
    assert rc == 0, err
    assert (out / "a/b/z_labels.png").read_bytes() == (reference / "a/b/z_labels.png").read_bytes()


@pytest.mark.parametrize("line", ["../escape.png", "/elsewhere/x.png"])
def test_input_list_line_outside_the_root_is_named(tree: Path, tmp_path: Path, capsys, line: str) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text(f"a/x.png\n{line}\n", encoding="utf-8")
    out = tmp_path / "out"
    rc, _, err = _segment(capsys, "--input-list", str(listing), "--input-root", str(tree), "--classes", CLASSES,
                          "--out", str(out), *MODEL)
    assert rc == 2 and f"line 2 of --input-list {listing}" in err, err
    assert not out.exists()


# ----------------------------------------------------------------------------- bad input, settings


def test_two_inputs_for_one_output_are_an_error_naming_both(tmp_path: Path, capsys) -> None:
    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
        Image.fromarray(_photo(0, 16)).save(tmp_path / folder / "x.png")
    out = tmp_path / "out"
    rc, _, err = _segment(capsys, str(tmp_path / "one"), str(tmp_path / "two"), "--classes", CLASSES,
                          "--out", str(out), *MODEL)
    assert rc == 2 and str(tmp_path / "one/x.png") in err and str(tmp_path / "two/x.png") in err, err
    assert "x_labels.png" in err and not out.exists()


def test_an_output_on_the_jobs_own_file_is_an_error(tmp_path: Path, capsys) -> None:
    Image.fromarray(_photo(0, 16)).save(tmp_path / "labeling-job.png")
    rc, _, err = _segment(capsys, str(tmp_path / "labeling-job.png"), "--classes", CLASSES,
                          "--out", str(tmp_path / "out"), *MODEL)
    assert rc == 2 and "labeling-job.json" in err and str(tmp_path / "labeling-job.png") in err, err


def test_bad_images_are_in_the_manifest_and_retried(tree: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "broken.png").write_bytes(b"not a png")
    inputs = [str(tree / "im0.png"), str(tmp_path / "broken.png"), str(tmp_path / "missing.png")]
    out = tmp_path / "out"
    args = [*inputs, "--classes", CLASSES, "--save", "labels", "--out", str(out), *MODEL]
    rc, stdout, err = _segment(capsys, *args)
    assert rc == 1 and "1 done, 0 skipped (done before), 2 failed" in stdout
    assert err.splitlines()[-3:] == [
        "2 failed:",
        f"  {tmp_path / 'broken.png'}: {_line(out, 'broken.png')['error']}",
        f"  {tmp_path / 'missing.png'}: {_line(out, 'missing.png')['error']}",
    ]
    assert "cannot decode" in _line(out, "broken.png")["error"] and "not found" in _line(out, "missing.png")["error"]
    mtime = (out / "im0_labels.png").stat().st_mtime_ns
    rc, stdout, _ = _segment(capsys, *args)  # the failed ones are tried again, the good one not
    assert rc == 1 and "0 done, 1 skipped (done before), 2 failed" in stdout
    assert (out / "im0_labels.png").stat().st_mtime_ns == mtime


def _line(out: Path, name: str) -> dict:
    (line,) = [r for r in _manifest(out) if r["name"] == name]
    return line


def test_other_settings_stop_unless_overwrite(tree: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    base = [str(tree / "im0.png"), "--save", "labels", "--out", str(out), *MODEL]
    assert _segment(capsys, *base, "--classes", CLASSES)[0] == 0
    before = _stat(_files(out))
    rc, _, err = _segment(capsys, *base, "--classes", "cat, dog")
    assert rc == 2 and f"{out} holds labels made with other settings (changed: classes" in err, err
    assert _stat(_files(out)) == before
    rc, stdout, _ = _segment(capsys, *base, "--classes", "cat, dog", "--overwrite")
    assert rc == 0 and "1 done, 0 skipped" in stdout
    assert json.loads((out / "labeling-job.json").read_text(encoding="utf-8"))["classes"] == ["cat", "dog"]


def test_a_busy_out_dir_names_the_holder(tree: Path, tmp_path: Path, capsys) -> None:
    from dapseg.folder_lock import hold_folder

    out = tmp_path / "out"
    with hold_folder(out, "out dir"):
        rc, _, err = _segment(capsys, str(tree / "im0.png"), "--classes", CLASSES, "--out", str(out), *MODEL)
    assert rc == 2 and "is in use by another dapseg run" in err and f"pid {os.getpid()}" in err, err
    assert not (out / "im0_labels.png").exists()


@pytest.mark.parametrize(("save", "message"), [("labels,mask", "unknown output kind(s) mask"),
                                               (",", "(none given)")])
def test_bad_save_kinds_are_named(save: str, message: str) -> None:
    from dapseg.labeling.outputs import parse_save

    with pytest.raises(ValueError, match=r"--save .*" + message.replace("(", r"\(").replace(")", r"\)")):
        parse_save(save)


def test_rle_without_pycocotools_names_the_extra(monkeypatch) -> None:
    from dapseg.labeling.outputs import parse_save

    monkeypatch.setitem(sys.modules, "pycocotools.mask", None)  # import fails
    with pytest.raises(RuntimeError, match=r"dapseg\[label\]"):
        parse_save("labels,rle")


# ----------------------------------------------------------------------------- predict_many


@pytest.fixture(scope="module")
def segmenter():
    from dapseg.api import Segmenter

    return Segmenter.from_preset("naclip", random_weights=True, tiny=True)


@pytest.mark.parametrize("workers", [0, 1])
def test_predict_many_yields_results_in_input_order(segmenter, tree: Path, workers: int) -> None:
    loaded = Image.open(tree / "d/w.png").convert("RGB")  # a PIL image read into memory
    sources = [tree / "im1.jpg", _photo(1, 12), str(tree / "a/x.png"), loaded]
    results = list(segmenter.predict_many(sources, CLASSES, batch=2, workers=workers))
    assert len(results) == len(sources)
    for source, result in zip(sources, results, strict=True):
        alone = segmenter.predict(source, CLASSES)
        torch.testing.assert_close(result.coarse_logits, alone.coarse_logits)
        assert torch.equal(result.labels, alone.labels)


def test_predict_many_raises_a_bad_image_in_its_turn(segmenter, tree: Path, tmp_path: Path) -> None:
    it = segmenter.predict_many([tree / "im0.png", tmp_path / "missing.png", tree / "im1.jpg"], ["cat"])
    assert next(it).labels.shape == _photo(*TREE["im0.png"]).shape[:2]
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        next(it)
    with pytest.raises(ValueError, match="batch >= 1"):  # at the call, before any iteration
        segmenter.predict_many([tree / "im0.png"], ["cat"], batch=0)


def test_a_json_and_an_rle_output_of_two_inputs_clash() -> None:
    """x_rle.png's summary (x_rle.json) is x.png's COCO file (x_rle.json): checked without listing
    every output file, so compare with the naive list here."""
    from dapseg.labeling.inputs import Input
    from dapseg.labeling.outputs import check_unique_outputs, output_names

    items = [Input(Path("in/x.png"), "x.png"), Input(Path("in/x_rle.png"), "x_rle.png")]
    for kinds in [("json", "rle"), ("rle", "json"), ("labels", "json"), ("labels", "rle", "probs", "overlay")]:
        names = [n for i in items for n in output_names(i, kinds).values()]
        clash = len(set(names)) < len(names)
        if clash:
            with pytest.raises(ValueError, match=r"in/x.png and in/x_rle.png would both be written to x_rle\.json"):
                check_unique_outputs(items, kinds, lambda name: False)
        else:
            check_unique_outputs(items, kinds, lambda name: False)
        assert clash == ({"json", "rle"} <= set(kinds))


@pytest.mark.parametrize("rank", [0, 1])
def test_on_main_hands_rank_0s_error_to_every_rank(monkeypatch, rank: int) -> None:
    """A failure of rank 0's step (a bad input list, a busy out dir) must stop the other ranks with its
    message instead of leaving them waiting for a value. The broadcast is replaced by a recorder."""
    from dapseg.eval import dist

    sent: list[object] = []

    def broadcast(obj: object, info: dist.DistInfo) -> object:
        sent.append(obj)
        return obj if info.is_main else (None, "ValueError on rank 0: bad line 3")

    def step() -> int:
        raise ValueError("bad line 3")

    monkeypatch.setattr(dist, "broadcast_object", broadcast)
    info = dist.DistInfo(rank=rank, world_size=2)
    expected = ValueError if rank == 0 else dist.MainRankError
    with pytest.raises(expected, match="bad line 3"):
        dist.on_main(step, info)
    assert len(sent) == 1  # one broadcast on each rank, as the collective needs
    if rank == 0:
        assert sent == [(None, "ValueError on rank 0: bad line 3")]
    assert dist.on_main(lambda: 7, dist.DistInfo()) == 7  # alone: just the call
