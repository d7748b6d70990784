"""`dapseg segment` as a job (issue 27, item 5): under torchrun, bad images end the run with one line
(no torch failure report), the lock files end with the run, and --threads sets torch's threads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from dapseg.cli import main

MODEL = ["--random-weights", "--tiny", "--preset", "naclip", "--device", "cpu"]


def _images(folder: Path) -> None:
    folder.mkdir(parents=True)
    Image.fromarray(np.ascontiguousarray(data.astronaut()[::12, ::12])).save(folder / "a.png")
    Image.fromarray(np.ascontiguousarray(data.coffee()[::12, ::12])).save(folder / "b.png")
    (folder / "bad.png").write_bytes(b"not a png")


def test_torchrun_with_bad_images_exits_with_one_line_and_no_torch_report(cli_env, tmp_path: Path) -> None:
    _images(tmp_path / "in")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "dapseg", "segment", str(tmp_path / "in"), "--classes", "person, cup", "--out", str(out),
         "--workers", "0", *MODEL],
        capture_output=True, text=True, timeout=600,
        env={**cli_env, "DAPSEG_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stdout.count("segmented 2/3 images") == 1
    failed_lines = [ln for ln in proc.stderr.splitlines() if "failed" in ln]
    assert len(failed_lines) == 1 and "1 image(s) failed" in failed_lines[0] and "manifest.jsonl" in failed_lines[0]
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(m["name"], m["status"]) for m in manifest] == [("a.png", "done"), ("b.png", "done"),
                                                           ("bad.png", "failed")]
    assert not list(out.glob(".dapseg.lock*"))  # the lock files end with the job


def test_single_process_keeps_exit_code_1_for_bad_images(tmp_path: Path, capsys) -> None:
    _images(tmp_path / "in")
    threads = torch.get_num_threads()
    try:
        rc = main(["segment", str(tmp_path / "in"), "--classes", "person, cup", "--out", str(tmp_path / "out"),
                   "--workers", "0", "--threads", "1", *MODEL])
        assert torch.get_num_threads() == 1  # --threads took effect
    finally:
        torch.set_num_threads(threads)
    assert rc == 1
    err = capsys.readouterr().err
    assert "1 failed:" in err and "bad.png" in err
    assert not list((tmp_path / "out").glob(".dapseg.lock*"))


@pytest.mark.parametrize("command", [["segment", "x.png", "--classes", "a"],
                                     ["eval", "--dataset", "voc21", "--data-root", "nowhere"]])
def test_threads_below_one_is_an_error_naming_it(command: list[str], capsys) -> None:
    assert main([*command, "--threads", "0", *MODEL]) == 2
    assert "--threads must be >= 1, got 0" in capsys.readouterr().err
