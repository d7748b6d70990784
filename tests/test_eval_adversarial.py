"""Evaluations a cluster can trust, tried as an adversary would: planted pickles in every file read back,
hostile split files, SIGTERM and SIGKILL mid-run, two runs into one work dir, bad labels with
--skip-bad, a full disk, and odd values (class names, --set, image shapes, crops).

Real subprocesses where the behaviour is about processes and signals (`python -m dapseg eval`, and
torchrun for the every-rank check); in-process `dapseg.cli.main` elsewhere (faster, same code).
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from dapseg.cli import error_message, main
from dapseg.config import load_preset, parse_override
from dapseg.data import DataError, SegDataset
from dapseg.data.spec import load_dataset_spec
from dapseg.eval.checkpoint import Checkpointer, CorruptCheckpointError
from dapseg.eval.collect import finished_records
from dapseg.eval.runner import RunOptions, evaluate
from dapseg.text import ClassSet, TextEmbedder
from eval_synth import FakePredictor, make_dataset

# planted pickles use protocol 4; torch warns before refusing them
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol")

SRC = Path(__file__).resolve().parents[1] / "src"
FAST = ["--random-weights", "--tiny", "--no-progress", "--set", "inference.short_side=32", "--set",
        "inference.crop=32", "--set", "inference.stride=16", "--set", "templates=simple_imagenet"]
QUIET = RunOptions(num_workers=0, progress=False, checkpoint_every=1)
SETTINGS = {"preset": "fake"}


class Planted:
    """A pickle that, if ever unpickled, creates ``marker`` (through a global that torch refuses)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def eval_args(data: Path, work: Path, *extra: str, preset: str = "naclip") -> list[str]:
    return ["eval", "--preset", preset, "--dataset", "voc21", "--data-root", str(data), "--work-dir", str(work),
            *FAST, *extra]


def run_main(capsys: pytest.CaptureFixture[str], args: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(args)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_clean_error(rc: int, err: str, *culprits: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err and "DataLoader worker" not in err, err
    for c in culprits:
        assert c in err, err


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_dataset(root, "voc21", n=3, seed=1)
    return root


# ----------------------------------------------------------------------------- 1. nothing read back runs code

def test_every_torch_load_under_src_says_weights_only_true():
    offenders = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                kw = {k.arg: k.value for k in node.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                if not ok:
                    offenders.append(f"{path.relative_to(SRC)}:{node.lineno}")
            if isinstance(node, ast.ImportFrom) and node.module == "torch" and any(
                    a.name == "load" for a in node.names):
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno} (from torch import load)")
    assert not offenders, f"torch.load without weights_only=True: {offenders}"


@pytest.fixture
def finished(tmp_path: Path) -> tuple[SegDataset, Path]:
    """A dataset and a work dir where a (fake) evaluation was interrupted twice: state-base.pt holds the
    first image, a part file the second."""
    make_dataset(tmp_path / "data", "voc21", n=4, seed=2)
    ds = SegDataset("voc21", tmp_path / "data")
    for _ in range(2):
        with pytest.raises(KeyboardInterrupt):
            evaluate(ds, FakePredictor(21, fail_after=1), tmp_path / "w", SETTINGS, QUIET)
    assert (tmp_path / "w" / "state-base.pt").is_file() and list((tmp_path / "w").glob("state-g*-r0.pt"))
    return ds, tmp_path / "w"


def _plant(path: Path, marker: Path, how: str) -> None:
    if how == "raw pickle":
        path.write_bytes(pickle.dumps(Planted(marker)))
    else:  # a torch file of the right shape whose matrix is the pickle
        torch.save({"gen": 0, "cm": Planted(marker), "done": [], "bad": {}}, path)


@pytest.mark.parametrize("how", ["raw pickle", "torch file"])
@pytest.mark.parametrize("which", ["state-base.pt", "part"])
def test_planted_pickle_in_a_checkpoint_is_refused_naming_the_file(finished, tmp_path, which, how):
    ds, work = finished
    target = work / "state-base.pt" if which == "state-base.pt" else next(work.glob("state-g*-r0.pt"))
    marker = tmp_path / "MARKER"
    _plant(target, marker, how)
    with pytest.raises(CorruptCheckpointError) as e:
        evaluate(ds, FakePredictor(21), work, SETTINGS, QUIET)
    assert str(target) in str(e.value) and ("delete" in str(e.value))
    assert "could run code" in str(e.value)
    assert not marker.exists()


def test_planted_pickle_stops_dapseg_eval_resuming(data, tmp_path, capsys):
    work = tmp_path / "w"
    assert run_main(capsys, eval_args(data, work, "--workers", "0", "--limit", "2"))[0] == 0
    marker = tmp_path / "MARKER"
    base = work / "naclip" / "voc21" / "state-base.pt"
    _plant(base, marker, "raw pickle")
    rc, _, err = run_main(capsys, eval_args(data, work, "--workers", "0", "--limit", "2"))
    assert_one_clean_error(rc, err, str(base), "delete the work dir")
    assert not marker.exists()


def _state(cm: torch.Tensor, **over) -> dict:
    return {"gen": 0, "cm": cm, "done": [0], "bad": {}, **over}


C21 = torch.zeros(21, 21, dtype=torch.long)


@pytest.mark.parametrize("payload,why", [
    (_state(torch.zeros(20, 20, dtype=torch.long)), "20 classes"),
    (_state(C21.float()), "int64"),
    (_state(C21 - 1), "negative"),
    ({"gen": 0, "cm": C21, "done": [0]}, "keys"),
    (_state(C21, done=[0, 0]), "distinct"),
    (_state(C21, bad={5: "x"}), "not done"),
    (_state(C21, gen=-1), "gen"),
    ([1, 2, 3], "keys"),
])
def test_checkpoint_contents_are_validated(finished, payload, why):
    ds, work = finished
    torch.save(payload, work / "state-base.pt")
    with pytest.raises(CorruptCheckpointError, match=why) as e:
        evaluate(ds, FakePredictor(21), work, SETTINGS, QUIET)
    assert str(work / "state-base.pt") in str(e.value)


def test_torn_checkpoint_names_the_file_and_how_to_recover(finished):
    ds, work = finished
    part = next(work.glob("state-g*-r0.pt"))
    part.write_bytes(part.read_bytes()[:100])
    with pytest.raises(CorruptCheckpointError) as e:
        evaluate(ds, FakePredictor(21), work, SETTINGS, QUIET)
    assert str(part) in str(e.value) and "delete that file" in str(e.value)
    part.unlink()  # the recovery the message gives: its image is computed again, the base is kept
    again = FakePredictor(21)
    resumed = evaluate(ds, again, work, SETTINGS, QUIET)
    full = evaluate(ds, FakePredictor(21), work.parent / "full", SETTINGS, QUIET)
    assert torch.equal(resumed.cm, full.cm) and again.calls == 3


@pytest.mark.parametrize("content", [b"\x80\x04K\x01.", b"[1, 2]", b"{\"settings\": 3}"])
def test_fingerprint_that_is_not_json_object_is_named(finished, tmp_path, content):
    ds, work = finished
    (work / "fingerprint.json").write_bytes(content)
    with pytest.raises(CorruptCheckpointError, match=r"fingerprint\.json"):
        evaluate(ds, FakePredictor(21), work, SETTINGS, QUIET)


def test_result_files_that_are_not_records_are_left_out_of_the_tables(tmp_path):
    marker = tmp_path / "MARKER"
    good = {"preset": "a", "dataset": "voc21", "mIoU": 1.0, "mAcc": None, "aAcc": 2.0, "n_images": 1,
            "n_bad": 0, "per_class": [{"class": "x", "IoU": 1.0, "Acc": None}]}
    files = {"a/voc21": json.dumps(good), "b/voc21": pickle.dumps(Planted(marker)),
             "c/voc21": json.dumps({**good, "preset": "c", "mIoU": "NaN"}), "d/voc21": "[]",
             "e/voc21": json.dumps({**good, "preset": "e", "per_class": [{"class": 3}]})}
    for job, text in files.items():
        (tmp_path / job).mkdir(parents=True)
        (tmp_path / job / "result.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    records, warnings = finished_records(tmp_path, [])
    assert [r["preset"] for r in records] == ["a"]
    assert sorted(w.split(" (")[0] for w in warnings) == sorted(
        f"left out of the tables: {tmp_path / j / 'result.json'}" for j in ("b/voc21", "c/voc21", "d/voc21", "e/voc21"))
    assert not marker.exists()


def _embedder(cache: Path, calls: list[str]) -> TextEmbedder:
    def encode(texts: list[str]) -> torch.Tensor:
        calls.extend(texts)
        g = torch.Generator().manual_seed(len(texts[0]))
        return torch.randn(len(texts), 8, generator=g)

    return TextEmbedder(encode, "fake:model", "none", cache, dim=8)


@pytest.mark.parametrize("planted", ["pickle", "nan", "wrong size", "not normalised", "float64", "2-D", "list"])
def test_text_cache_entries_are_validated_and_recomputed(tmp_path, planted):
    calls: list[str] = []
    fresh = _embedder(None, calls).embed_query("cat")  # type: ignore[arg-type]
    first = _embedder(tmp_path, calls)
    first.embed_query("cat")
    (path,) = tmp_path.glob("*.pt")
    marker = tmp_path / "MARKER"
    bad = {"pickle": None, "nan": torch.full((8,), float("nan")), "wrong size": torch.ones(7) / 7 ** 0.5,
           "not normalised": torch.ones(8), "float64": fresh.double(), "2-D": fresh[None], "list": [1.0] * 8}[planted]
    if planted == "pickle":
        path.write_bytes(pickle.dumps(Planted(marker)))
    else:
        torch.save(bad, path)
    calls.clear()
    again = _embedder(tmp_path, calls).embed_query("cat")
    assert calls == ["cat"]  # recomputed, not taken from the planted file
    assert torch.equal(again, fresh) and not marker.exists()
    assert torch.equal(torch.load(path, weights_only=True), fresh)  # and the cache repaired


# ----------------------------------------------------------------------------- 2. nothing leaves its folders

def _hostile_line(kind: str, root: Path, outside: Path) -> str:
    """A split-file line naming an image outside the dataset, with its ground truth beside it."""
    img_dir, ann_dir = root / "JPEGImages", root / "SegmentationClass"
    target = outside / "victim"
    Image.fromarray(np.full((20, 20, 3), 7, np.uint8)).save(target.with_suffix(".jpg"), format="JPEG")
    Image.fromarray(np.zeros((20, 20), np.uint8), mode="L").save(target.with_suffix(".png"))
    if kind == "absolute":
        return str(target)
    if kind == "dotdot":
        return os.path.relpath(target, img_dir)
    (img_dir / "link").symlink_to(outside)
    (ann_dir / "link").symlink_to(outside)
    return "link/victim"


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink"])
def test_hostile_split_file_is_refused_naming_the_line(tmp_path, capsys, kind):
    data = tmp_path / "data"
    make_dataset(data, "voc21", n=3, seed=4)
    root = data / "VOCdevkit" / "VOC2012"
    outside = tmp_path / "outside"
    outside.mkdir()
    split = root / "ImageSets" / "Segmentation" / "val.txt"
    split.write_text(split.read_text() + _hostile_line(kind, root, outside) + "\n")
    before = {p.name: p.read_bytes() for p in outside.iterdir()}
    work = tmp_path / "w"
    rc, _, err = run_main(capsys, eval_args(data, work, "--workers", "0", "--save-pred", "--show", "10"))
    assert_one_clean_error(rc, err, f"line 4 of split file {split}")
    assert {p.name: p.read_bytes() for p in outside.iterdir()} == before  # ground truth and image untouched
    assert not list(work.rglob("*.png")) and not list(work.rglob("*.jpg"))


@pytest.mark.parametrize("command", ["eval-all", "sweep"])
def test_eval_all_and_sweep_refuse_a_hostile_split_file_too(tmp_path, capsys, command):
    data = tmp_path / "data"
    make_dataset(data, "voc21", n=2, seed=4)
    root = data / "VOCdevkit" / "VOC2012"
    (tmp_path / "outside").mkdir()
    split = root / "ImageSets" / "Segmentation" / "val.txt"
    split.write_text(split.read_text() + _hostile_line("absolute", root, tmp_path / "outside") + "\n")
    args = [command, "--preset", "naclip", "--dataset", "voc21", "--data-root", str(data), "--work-dir",
            str(tmp_path / "w"), "--workers", "0", *FAST]
    rc, _, err = run_main(capsys, [*args, "--grid", "logit_scale=10"] if command == "sweep" else args)
    assert rc != 0 and f"line 3 of split file {split}" in err and "Traceback" not in err, err
    assert not list((tmp_path / "w").rglob("*.pt"))  # refused before any image was evaluated


def test_scanned_dataset_refuses_a_symlinked_image_leading_out(tmp_path):
    make_dataset(tmp_path / "data", "ade20k", n=2, seed=1)
    spec = load_dataset_spec("ade20k")
    root = tmp_path / "data" / spec.root
    (tmp_path / "out.jpg").write_bytes((root / spec.img_dir / "img_000.jpg").read_bytes())
    (root / spec.img_dir / "evil.jpg").symlink_to(tmp_path / "out.jpg")
    with pytest.raises(DataError, match=r"file .*evil\.jpg.* leads outside"):
        SegDataset("ade20k", tmp_path / "data")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(line=st.lists(st.sampled_from(["a", "/", ".", "..", "x/", "\\", "~", "img_000", "\x00"]), min_size=1,
                     max_size=8).map("".join))
def test_any_split_line_is_refused_or_stays_inside(tmp_path_factory, line):
    data = tmp_path_factory.mktemp("d")
    make_dataset(data, "voc21", n=1, seed=0)
    root = data / "VOCdevkit" / "VOC2012"
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text(f"img_000\n{line}\n")
    try:
        ds = SegDataset("voc21", data)
    except DataError as e:
        assert "line 2 of split file" in str(e) or "missing" in str(e) or not line.strip(), str(e)
        return
    for name in ds.names:
        img, ann = ds.paths(name)
        assert (root / "JPEGImages").resolve() in img.parents and (root / "SegmentationClass").resolve() in ann.parents


def test_dataset_name_cannot_lead_the_job_folder_out(tmp_path, capsys):
    spec = load_dataset_spec("voc21").model_dump()
    spec["name"] = "../../escaped"
    yaml_path = tmp_path / "evil.yaml"
    yaml_path.write_text(json.dumps(spec))  # JSON is YAML
    make_dataset(tmp_path / "data", "voc21", n=1, seed=0)
    rc, _, err = run_main(capsys, ["eval", "--preset", "naclip", "--dataset", str(yaml_path), "--data-root",
                                   str(tmp_path / "data"), "--work-dir", str(tmp_path / "a" / "w"), *FAST])
    assert_one_clean_error(rc, err, "job folder", "leads outside")
    assert not (tmp_path / "escaped").exists()


# ----------------------------------------------------------------------------- 3, 4. signals and workers

def _children(pid: int) -> set[int]:
    kids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            kids.add(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _popen(args: list[str], env: dict[str, str], module: list[str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *(module or ["-m", "dapseg"]), *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def slow_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough images that a run is still going when the test signals it."""
    root = tmp_path_factory.mktemp("slow")
    make_dataset(root, "voc21", n=8, seed=7)
    return root


@pytest.fixture(scope="module")
def uninterrupted(slow_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The job folder of an uninterrupted run on ``slow_data`` (the reference for resumed runs)."""
    work = tmp_path_factory.mktemp("full")
    assert main(eval_args(slow_data, work, "--workers", "0")) == 0
    return work / "naclip" / "voc21"


def _record(path: Path) -> dict:
    rec = json.loads(path.read_text())
    return {k: v for k, v in rec.items() if k not in ("seconds", "provenance")}


def test_sigterm_mid_eval_keeps_progress_and_resuming_gives_the_same_result(slow_data, uninterrupted, tmp_path,
                                                                            cli_env, capsys):
    args = eval_args(slow_data, tmp_path / "w", "--checkpoint-every", "1", "--workers", "2")
    proc = _popen(args, {**cli_env, "DAPSEG_CACHE": str(tmp_path / "cache")})
    job = tmp_path / "w" / "naclip" / "voc21"
    _wait_for(lambda: any(job.glob("state-g*-r0.pt")) or proc.poll() is not None, 180, "the first checkpoint")
    workers = _children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    m = re.search(r"terminated \(SIGTERM\): kept (\d+) image\(s\) finished in this run \((\d+) of 8 done", err)
    assert m is not None, err
    kept = int(m.group(1))
    assert 1 <= kept < 8 and "Traceback" not in err and not (job / "result.json").exists()
    state, _ = Checkpointer(job, 21, 0).load()
    assert len(state.done) == kept  # what the message says is what was saved
    assert len(workers) == 2
    _wait_for(lambda: not any(_alive(p) for p in workers), 5, "the decoding workers to exit")

    # the same command again finishes the rest; the result is that of an uninterrupted run
    rc, out, _ = run_main(capsys, args)
    assert rc == 0 and "naclip on voc21 (8 images evaluated)" in out
    assert _record(job / "result.json") == _record(uninterrupted / "result.json")
    assert torch.equal(Checkpointer(job, 21, 0).load()[0].cm, Checkpointer(uninterrupted, 21, 0).load()[0].cm)


def test_kill_9_leaves_no_process_of_the_eval(slow_data, tmp_path, cli_env):
    proc = _popen(eval_args(slow_data, tmp_path / "w", "--checkpoint-every", "1", "--workers", "2"),
                  {**cli_env, "DAPSEG_CACHE": str(tmp_path / "cache")})
    job = tmp_path / "w" / "naclip" / "voc21"
    try:
        _wait_for(lambda: any(job.glob("state-g*-r0.pt")) or proc.poll() is not None, 180, "the first checkpoint")
        workers = _children(proc.pid)
        assert len(workers) == 2 and proc.poll() is None
    finally:
        proc.kill()
        proc.communicate()
    _wait_for(lambda: not any(_alive(p) for p in workers), 5, "the orphaned workers to die")


def test_sigterm_under_torchrun_keeps_every_ranks_progress(tmp_path, cli_env, capsys):
    """Each rank saves its own part and says so (resuming is checked against an uninterrupted run above
    and, across process counts, in test_eval_runner)."""
    data = tmp_path / "data"
    make_dataset(data, "voc21", n=16, seed=8)  # 8 per rank: both are mid-run when the signal comes
    args = eval_args(data, tmp_path / "w", "--checkpoint-every", "1", "--workers", "0", "--device", "cpu")
    proc = _popen(args, {**cli_env, "DAPSEG_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"},
                  module=["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "dapseg"])
    job = tmp_path / "w" / "naclip" / "voc21"
    _wait_for(lambda: all(any(job.glob(f"state-g*-r{r}.pt")) for r in (0, 1)) or proc.poll() is not None, 240,
              "a checkpoint of each rank")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    kept = {int(r): int(n) for r, n in re.findall(r"rank (\d): terminated \(SIGTERM\): kept (\d+) image", err)}
    assert set(kept) == {0, 1}, err
    state, _ = Checkpointer(job, 21, 0).load()
    assert len(state.done) == kept[0] + kept[1] < 16
    rc, out, _ = run_main(capsys, args)  # one process finishes what two left
    assert rc == 0 and "naclip on voc21 (16 images evaluated)" in out


# ----------------------------------------------------------------------------- 5. two runs, one work dir

def test_two_evals_into_one_work_dir(slow_data, tmp_path, cli_env, capsys):
    """The same job twice: the second stops at once naming the first; another preset meanwhile runs,
    and the final tables hold both presets whichever finished last."""
    work = tmp_path / "w"
    first = _popen(eval_args(slow_data, work, "--checkpoint-every", "1", "--workers", "0"),
                   {**cli_env, "DAPSEG_CACHE": str(tmp_path / "cache")})
    job = work / "naclip" / "voc21"
    try:
        _wait_for(lambda: any(job.glob("state-g*-r0.pt")) or first.poll() is not None, 180, "the first run")
        first.send_signal(signal.SIGSTOP)  # holds the lock, frozen mid-run
        rc, _, err = run_main(capsys, eval_args(slow_data, work, "--workers", "0"))
        assert_one_clean_error(rc, err, "in use by another dapseg run", f"pid {first.pid} ")
        rc, out, _ = run_main(capsys, eval_args(slow_data, work, "--workers", "0", "--limit", "2", preset="clip"))
        assert rc == 0 and "clip on voc21 (2 images evaluated)" in out
    finally:
        first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    import pandas as pd

    table = pd.read_csv(work / "results.csv")
    assert sorted(table["preset"]) == ["clip", "naclip"]
    assert dict(zip(table["preset"], table["n_images"], strict=True)) == {"clip": 2, "naclip": 8}


def test_eval_all_tables_are_the_union_of_finished_jobs(data, tmp_path, capsys):
    work = tmp_path / "w"
    for preset in ("clip", "naclip"):
        rc, _, _ = run_main(capsys, ["eval-all", "--preset", preset, "--dataset", "voc21", "--data-root", str(data),
                                     "--work-dir", str(work), "--limit", "1", "--workers", "0", *FAST])
        assert rc == 0
    payload = json.loads((work / "results.json").read_text())
    assert sorted(r["preset"] for r in payload["results"]) == ["clip", "naclip"]
    assert payload["results"][0]["preset"] == "naclip"  # this run's jobs first


def test_sweep_tables_are_the_union_of_finished_combinations(data, tmp_path, capsys):
    work = tmp_path / "w"
    base = ["sweep", "--preset", "naclip", "--dataset", "voc21", "--data-root", str(data), "--work-dir", str(work),
            "--limit", "1", "--workers", "0", *FAST]
    assert run_main(capsys, [*base, "--grid", "logit_scale=10,40"])[0] == 0
    assert run_main(capsys, [*base, "--grid", "stride=8"])[0] == 0
    import pandas as pd

    table = pd.read_csv(work / "sweep.csv")
    assert len(table) == 3 and {"logit_scale", "stride"} <= set(table.columns)
    assert sorted(table["logit_scale"].dropna().tolist()) == [10, 40]
    assert list(table["mIoU"]) == sorted(table["mIoU"], reverse=True)


# ----------------------------------------------------------------------------- 6. bad labels with --skip-bad

@pytest.fixture
def faulty(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray], dict[str, str]]:
    data = tmp_path / "data"
    stored = make_dataset(data, "voc21", n=6, seed=9)
    ann = data / "VOCdevkit" / "VOC2012" / "SegmentationClass"
    faults = {"img_001": "is 5x4 but image", "img_002": "value 77 is outside the 21 classes",
              "img_003": "has mode RGB", "img_004": "cannot read label"}
    Image.fromarray(np.zeros((4, 5), np.uint8), mode="L").save(ann / "img_001.png")
    lab = stored["img_002"].copy()
    lab[0, 0] = 77
    Image.fromarray(lab.astype(np.uint8), mode="L").save(ann / "img_002.png")
    Image.fromarray(np.zeros((*stored["img_003"].shape, 3), np.uint8)).save(ann / "img_003.png")
    (ann / "img_004.png").write_bytes(b"not a png")
    return data, stored, faults


def test_skip_bad_skips_and_lists_every_label_fault(faulty, tmp_path, capsys):
    data, stored, faults = faulty
    work = tmp_path / "w"
    rc, out, err = run_main(capsys, eval_args(data, work, "--skip-bad"))  # the default: 2 decoding workers
    assert rc == 0, err
    assert "skipped 4 bad image(s)" in out and "Traceback" not in err
    for name, why in faults.items():
        lines = [line for line in err.splitlines() if line.startswith(f"skipped {name}:")]
        assert len(lines) == 1 and why in lines[0], err
        assert re.search(rf"^  {name}: .*{re.escape(why)}", out, re.M), out
    rec = json.loads((work / "naclip" / "voc21" / "result.json").read_text())
    # n_images: the images actually evaluated (issue 24: it said 6 with 4 of 6 skipped)
    assert rec["n_bad"] == 4 and sorted(rec["bad"]) == sorted(faults) and rec["n_images"] == 2
    assert "voc21 (2 images evaluated, 4 skipped)" in out, out
    labelled = sum(int((stored[n] != 255).sum()) for n in ("img_000", "img_005"))
    assert int(Checkpointer(work / "naclip" / "voc21", 21, 0).load()[0].cm.sum()) == labelled


# every fault reaches the main process the same way (Sample.error); the two the issue names are enough
@pytest.mark.parametrize("name", ["img_001", "img_002"])
def test_without_skip_bad_a_label_fault_is_one_clean_line(faulty, tmp_path, capsys, name):
    data, _, faults = faulty
    split = data / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt"
    split.write_text(f"img_000\n{name}\n")
    rc, _, err = run_main(capsys, eval_args(data, tmp_path / "w"))  # 2 workers: no worker traceback
    assert_one_clean_error(rc, err, faults[name], "--skip-bad")
    assert len(err.strip().splitlines()) == 1, err


# ----------------------------------------------------------------------------- 7. full disk, failing tables

_LIMITED = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, ({0}, {0})); "
            "from dapseg.cli import main; sys.exit(main(sys.argv[1:]))")


def test_file_size_limit_names_the_file_and_the_os_error(data, tmp_path, cli_env):
    proc = subprocess.run([sys.executable, "-c", _LIMITED.format(3000), *eval_args(data, tmp_path / "w",
                          "--workers", "0")], capture_output=True, text=True, timeout=300,
                          env={**cli_env, "DAPSEG_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 2, proc.stderr
    assert re.search(r"cannot write \S+state-base\.pt: File too large", proc.stderr), proc.stderr
    assert "inline_container" not in proc.stderr and "Traceback" not in proc.stderr


def test_checkpoint_save_on_a_full_file_system_names_the_file(tmp_path, cli_env):
    code = ("import resource, torch; from pathlib import Path; from dapseg.eval.checkpoint import Checkpointer, State\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))\n"
            f"ck = Checkpointer(Path({str(tmp_path)!r}), 30, 0)\n"
            "try:\n    ck.save_part(State(torch.zeros(30, 30, dtype=torch.long), {1}), 3)\n"
            "except OSError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=cli_env)
    assert proc.stdout.strip() == f"cannot write {tmp_path / 'state-g3-r0.pt'}: File too large", proc.stderr
    assert not list(tmp_path.iterdir())  # no torn file left behind


def test_a_table_that_cannot_be_written_does_not_lose_the_others(data, tmp_path, capsys):
    work = tmp_path / "w"
    (work / "results.xlsx").mkdir(parents=True)  # stands in for any failure of that one file
    rc, out, err = run_main(capsys, eval_args(data, work, "--workers", "0", "--limit", "2"))
    assert rc == 2 and f"cannot write {work / 'results.xlsx'}" in err and "Traceback" not in err
    assert "naclip on voc21 (2 images evaluated): mIoU" in out  # the metrics are printed first
    for name in ("results.csv", "results.md", "results.json"):
        assert (work / name).is_file()
    assert json.loads((work / "results.json").read_text())["results"][0]["preset"] == "naclip"


# ----------------------------------------------------------------------------- 8. odd values

def test_set_with_a_python_tag_is_a_clean_error(data, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    rc, _, err = run_main(capsys, eval_args(data, tmp_path / "w", "--set",
                                            f"x=!!python/object/apply:os.system [\"touch {marker}\"]"))
    assert_one_clean_error(rc, err, "override 'x'", "not a plain YAML value")
    assert not marker.exists()


@settings(max_examples=60, deadline=None)
@given(value=st.text(max_size=30))
def test_any_set_value_parses_or_is_a_value_error(value):
    with contextlib.suppress(ValueError):  # anything else (a YAML error, a TypeError) fails the test
        parse_override(f"key={value}")


@settings(max_examples=80, deadline=None)
@given(names=st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=5))
def test_class_names_with_control_characters_are_refused_naming_the_class(names):
    def control(text: str) -> bool:  # C0, DEL and C1: Unicode's "Cc" category, written out
        return any(ord(c) < 32 or 127 <= ord(c) < 160 for c in text)

    try:
        classes = ClassSet.from_list(names, allow_repeats=True)
    except ValueError as e:
        m = re.match(r"class (\d+) ", str(e))
        assert m is not None, str(e)
        if "control character" in str(e):
            assert control(names[int(m.group(1)) - 1]), str(e)  # the class named is the culprit
        else:
            assert "empty name" in str(e), str(e)
        return
    assert not any(control(s) for syns in classes.synonyms for s in syns)  # none slipped through


def test_eval_refuses_a_class_file_with_a_nul(tmp_path, capsys):
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(["background", "ca\x00t", *[f"c{i}" for i in range(19)]]) + "\n")
    spec = {**load_dataset_spec("voc21").model_dump(), "classes": str(classes)}
    yaml_path = tmp_path / "voc.yaml"
    yaml_path.write_text(json.dumps(spec))
    make_dataset(tmp_path / "data", "voc21", n=1, seed=0)
    rc, _, err = run_main(capsys, ["eval", "--preset", "naclip", "--dataset", str(yaml_path), "--data-root",
                                   str(tmp_path / "data"), "--work-dir", str(tmp_path / "w"), *FAST])
    assert_one_clean_error(rc, err, "class 2 ", "control character")


@pytest.mark.parametrize("overrides,where", [
    ({"head.params.bogus": 1}, "invalid setting head.params.bogus"),
    ({"refine.name": "pamr", "refine.params.bogus": 1}, "invalid setting refine.params.bogus"),
    ({"inference.mode": "splice", "inference.params.kind": "zzz"}, "invalid setting inference.params.kind"),
    ({"fsa.enabled": True, "fsa.params.bogus": 1}, "invalid setting plugins.0.params.bogus"),
])
def test_params_errors_are_reported_where_they_were_written(overrides, where):
    with pytest.raises(ValueError) as e:
        load_preset("naclip", overrides)
    assert error_message(e.value).startswith(where), error_message(e.value)


@pytest.fixture(scope="module")
def trident():
    from dapseg.api import Segmenter

    return Segmenter(load_preset("trident"), random_weights=True, tiny=True)


@pytest.mark.parametrize("shape", [(3, 40000), (40000, 3)])
def test_trident_on_very_thin_images(trident, shape):
    img = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    res = trident.predict(img, ["sky", "road"])
    assert tuple(res.labels.shape) == shape and bool(torch.isfinite(res.logits).all())


def test_trident_huge_crop_fails_before_any_window(tmp_path, capsys):
    img = tmp_path / "small.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(img)
    capsys.readouterr()
    rc = main(["segment", str(img), "--classes", "a, b", "--out", str(tmp_path / "out"), "--random-weights",
               "--tiny", "--preset", "trident", "--set", "inference.crop=20000", "--set", "inference.stride=20000"])
    err = capsys.readouterr().err
    assert rc != 0 and "inference.crop=20000 needs about" in err and "GiB" in err and "Traceback" not in err
