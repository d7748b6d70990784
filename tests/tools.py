"""The tools the export tests read exports back with, in the venvs ``bash .ci/tools.sh`` makes.

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


# The venv each tool lives in: Label Studio's server brings its SDK along, and Datumaro and FiftyOne
# resolve together (two venvs to install instead of four; see .ci/tools.sh).
TOOL_VENVS = {"label-studio": "label-studio", "label-studio-sdk": "label-studio", "datumaro": "readers",
              "fiftyone": "readers"}


def tool_python(name: str) -> Path:
    venv = TOOLS / TOOL_VENVS[name]
    python = venv / "bin" / "python"
    if not python.exists():
        msg = f"{name} is not installed in {venv}: run `bash .ci/tools.sh` to make its venv"
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
