"""End to end: `dapseg eval / eval-all / sweep` with tiny random-init models on synthetic trees."""

import json
import sys

import pandas as pd
import pytest

from dapseg.cli import main
from eval_synth import make_dataset

FAST = ["--random-weights", "--tiny", "--workers", "0", "--no-progress", "--set", "inference.short_side=32",
        "--set", "inference.crop=32", "--set", "inference.stride=16", "--set", "templates=simple_imagenet"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_dataset(root, "voc21", n=3, seed=1)  # voc20 shares the VOC tree
    return root


def test_eval_subprocess_end_to_end(run_cli, data, tmp_path):
    work = tmp_path / "w"
    r = run_cli("eval", "--preset", "naclip", "--dataset", "voc21", "--data-root", str(data), "--work-dir",
                str(work), "--limit", "2", "--save-pred", "--show", "1", *FAST)
    assert r.returncode == 0, r.stderr
    assert "naclip on voc21 (2 images evaluated): mIoU" in r.stdout
    rec = json.loads((work / "results.json").read_text())["results"][0]
    assert rec["n_images"] == 2 and len(rec["per_class"]) == 21 and 0 <= rec["mIoU"] <= 100
    prov = rec["provenance"]
    assert {"dapseg", "torch", "open_clip", "timm"} <= set(prov["versions"]) and prov["versions"]["torch"]
    assert prov["machine"]["device"] == "cpu" and prov["machine"]["dtype"] == "float32"
    seg = rec["settings"]["segmenter"]
    assert seg["inference"]["short_side"] == 32 and seg["postprocess"]["prob_thd"] == 0.1  # naclip on voc21
    assert seg["head"]["name"] == "naclip" and rec["settings"]["class_file"]["path"].endswith("voc21.txt")
    assert rec["settings"]["random_weights"] is True
    xlsx = pd.read_excel(work / "results.xlsx", sheet_name=None)
    assert {"summary", "voc21"} <= set(xlsx) and len(xlsx["voc21"]) == 21
    assert len(list((work / "naclip/voc21/pred").glob("*.png"))) == 2
    assert len(list((work / "naclip/voc21/show").glob("*.jpg"))) == 1
    # same work dir, different settings: refused with the difference named
    r2 = run_cli("eval", "--preset", "naclip", "--dataset", "voc21", "--data-root", str(data), "--work-dir",
                 str(work), "--limit", "2", *FAST, "--set", "postprocess.prob_thd=0.3")
    assert r2.returncode == 2 and "different settings" in r2.stderr and "prob_thd" in r2.stderr


def test_eval_all_two_presets_one_table(data, tmp_path, capsys):
    work = tmp_path / "w"
    rc = main(["eval-all", "--preset", "naclip", "--preset", "clip", "--dataset", "voc21", "--dataset", "voc20",
               "--dataset", "ade20k", "--data-root", str(data), "--work-dir", str(work), "--limit", "1", *FAST])
    out = capsys.readouterr().out
    assert rc == 0
    assert "not found under" in out and "ade20k" in out
    summary = pd.read_excel(work / "results.xlsx", sheet_name="summary", index_col=0)
    assert list(summary.index) == ["naclip", "clip"] and list(summary.columns) == ["voc21", "voc20", "average"]
    assert summary.loc["clip", "average"] == pytest.approx(summary.loc["clip", ["voc21", "voc20"]].mean(),
                                                           abs=0.01)
    csv = pd.read_csv(work / "results.csv")
    assert len(csv) == 4 and set(csv["dataset"]) == {"voc21", "voc20"}
    payload = json.loads((work / "results.json").read_text())
    assert payload["skipped_not_found"] == ["ade20k"]
    clip_voc20 = next(r for r in payload["results"] if r["preset"] == "clip" and r["dataset"] == "voc20")
    assert clip_voc20["settings"]["segmenter"]["postprocess"]["prob_thd"] == 0.0  # no background class


def test_sweep_grid_sorted_and_resumable(data, tmp_path, capsys):
    work = tmp_path / "w"
    args = ["sweep", "--preset", "naclip", "--dataset", "voc21", "--data-root", str(data), "--work-dir",
            str(work), "--grid", "stride=8,16 logit_scale=10,40", "--limit", "1", *FAST]
    assert main(args) == 0
    table = pd.read_csv(work / "sweep.csv")
    assert len(table) == 4 and set(map(tuple, table[["stride", "logit_scale"]].values)) == {
        (8, 10), (8, 40), (16, 10), (16, 40)}
    assert list(table["mIoU"]) == sorted(table["mIoU"], reverse=True)
    first = (work / "sweep.md").read_text()
    assert "stride=8,logit_scale=10" in capsys.readouterr().out
    assert main(args) == 0  # everything done: resumed from checkpoints, same table
    assert (work / "sweep.md").read_text() == first


def test_sweep_bad_grid_key_fails_before_compute(data, tmp_path, capsys):
    rc = main(["sweep", "--preset", "naclip", "--dataset", "voc21", "--data-root", str(data), "--work-dir",
               str(tmp_path / "w"), "--grid", "no_such_setting=1,2", *FAST])
    assert rc == 2 and "no_such_setting" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_eval_missing_data_root_shows_layout(tmp_path, capsys):
    rc = main(["eval", "--preset", "naclip", "--dataset", "context60", "--data-root", str(tmp_path / "none"),
               "--work-dir", str(tmp_path / "w"), *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and "Expected layout" in err and "SegmentationClassContext/<name>.png" in err


def test_eval_unwritable_work_dir_named_first(data, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    rc = main(["eval", "--preset", "naclip", "--dataset", "voc21", "--data-root", str(data),
               "--work-dir", str(tmp_path / "f" / "w"), *FAST])
    assert rc == 2 and "work dir" in capsys.readouterr().err


_WITHOUT_PANDAS = "import sys; sys.modules['pandas'] = None; from dapseg.cli import main; sys.exit(main(sys.argv[1:]))"


def test_segmenting_needs_no_eval_extra(tmp_path, cli_env):
    """pandas (the `eval` extra) missing from a fresh interpreter: segmenting does not need it."""
    import subprocess
    import sys

    from PIL import Image
    from skimage import data as skdata

    image = tmp_path / "photo.png"
    Image.fromarray(skdata.astronaut()[::16, ::16]).save(image)
    args = ["segment", str(image), "--classes", "person, sky", "--out", str(tmp_path / "out"),
            "--random-weights", "--tiny", "--preset", "naclip"]
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_PANDAS, *args], capture_output=True, text=True,
                          env={**cli_env, "DAPSEG_CACHE": str(tmp_path / "cache")}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "photo.json").is_file()


@pytest.mark.parametrize("command", ["eval", "eval-all", "sweep"])
def test_evaluating_without_the_eval_extra_says_what_to_install(command, data, tmp_path, monkeypatch, capsys):
    """pandas missing: the evaluation commands say at once what to install, before any work (in this
    process: pandas is imported only where it is used, so hiding it here is hiding it)."""
    monkeypatch.setitem(sys.modules, "pandas", None)  # `import pandas` now raises ImportError
    monkeypatch.setenv("DAPSEG_CACHE", str(tmp_path / "cache"))
    args = [command, "--preset", "naclip", "--dataset", "voc21", "--data-root", str(data),
            "--work-dir", str(tmp_path / "w"), *FAST]
    if command == "sweep":
        args += ["--grid", "inference.stride=8,16"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "need pandas (the `eval` extra): pip install 'dapseg[eval]'" in err
    assert "Traceback" not in err and not (tmp_path / "w").exists()
