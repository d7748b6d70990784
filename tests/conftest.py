"""Shared fixtures: tiny random-weight models, real photos from skimage.data, a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

# Before any hub client is imported (they read this once): tests never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
# `inference.precision: auto` stays float32 on every test machine's CPU, bf16 units or not (the tests'
# numbers are float32's; test_precision checks the CPU rule itself). Subprocesses inherit it.
os.environ["DAPSEG_CPU_NATIVE_BF16"] = "0"


def _torch_settings_from_env() -> None:
    """Optional global torch settings, to check that results do not depend on them:
    DAPSEG_TEST_THREADS=N (intra-op threads) and DAPSEG_TEST_DETERMINISTIC=1
    (``torch.use_deterministic_algorithms(True)``). Subprocesses (CLI tests) inherit the variables
    but not these settings."""
    threads = os.environ.get("DAPSEG_TEST_THREADS")
    deterministic = os.environ.get("DAPSEG_TEST_DETERMINISTIC", "") not in ("", "0")
    if not threads and not deterministic:
        return
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    if deterministic:
        torch.use_deterministic_algorithms(True)


_torch_settings_from_env()


def pytest_report_header(config: pytest.Config) -> str:
    keys = ("DAPSEG_TEST_THREADS", "DAPSEG_TEST_DETERMINISTIC", "DAPSEG_REQUIRE_BROWSER")
    return "dapseg test settings: " + ", ".join(f"{k}={os.environ.get(k, '')!r}" for k in keys)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tests never download: hubs offline, an empty weights cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DAPSEG_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["HF_HUB_OFFLINE"] = "1"
    return env


@pytest.fixture
def run_cli(cli_env: dict[str, str], tmp_path: Path):
    """Run `python -m dapseg ARGS` and return the CompletedProcess."""

    def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        env = {**cli_env, "DAPSEG_CACHE": str(tmp_path / "cache")}
        return subprocess.run(
            [sys.executable, "-m", "dapseg", *args], capture_output=True, text=True, env=env, timeout=timeout
        )

    return run


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()  # (512, 512, 3) uint8


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    """``dapseg ARGS`` in this process: returns a CompletedProcess-like (returncode, stdout, stderr)."""
    from dapseg.cli import main

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        capsys.readouterr()
        try:
            rc = main(list(args))
        except SystemExit as e:  # argparse errors exit
            rc = e.code if isinstance(e.code, int) else 1
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(["dapseg", *args], rc, captured.out, captured.err)

    return run
