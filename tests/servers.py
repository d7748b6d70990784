"""Servers the tests start in a subprocess (the web demo, Label Studio, dapseg serve): a free port and
the wait until one answers."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, proc: subprocess.Popen, log: Path, what: str, timeout_s: float,
                  poll_s: float = 0.5) -> None:
    """Return once ``url`` answers 200; fail with the end of ``log`` when ``proc`` exits or ``timeout_s``
    passes first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with code {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(poll_s)
    pytest.fail(f"{what} did not answer on {url} within {timeout_s:.0f} s:\n{log.read_text()[-4000:]}")
