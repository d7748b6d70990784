"""The tools the export tests read exports back with, each in its own venv (``bash .ci/tools.sh``).

``run_tool(name, script, payload)`` runs ``script`` with that venv's Python, the JSON ``payload`` on
stdin, and returns what the script prints as JSON. A venv that is missing skips the test with the
command that makes it, or fails it under CI (``CI=true``), where ``.ci/run`` made every one.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

TOOLS = Path(os.environ.get("DAPSEG_TOOLS_DIR", Path(__file__).resolve().parents[1] / ".venv-tools"))


def tool_python(name: str) -> Path:
    python = TOOLS / name / "bin" / "python"
    if not python.exists():
        msg = f"{name} is not installed in {TOOLS / name}: run `bash .ci/tools.sh` to make its venv"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return python


def run_tool(name: str, script: str, payload: Any, timeout: float = 300) -> Any:
    env = {**os.environ, "FIFTYONE_DO_NOT_TRACK": "true", "PYTHONNOUSERSITE": "1"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([str(tool_python(name)), "-c", script], input=json.dumps(payload), capture_output=True,
                          text=True, timeout=timeout, env=env)
    assert done.returncode == 0, f"{name} failed:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])
