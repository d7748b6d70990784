"""`dapseg serve` as the ML backend of a real Label Studio server (PyPI's `label-studio`).

Label Studio runs on 127.0.0.1 with a fresh SQLite database, a user and legacy token from its
environment variables, and local file serving on. Its SDK (tests/labelstudio_driver.py, run by Label
Studio's own Python) makes a project with a BrushLabels config, imports images three ways (a
local-files storage, an upload, a task whose image is on another host), connects `dapseg serve`, runs
"retrieve predictions" and decodes the stored brush RLE with Label Studio's decoder. The masks must
equal `dapseg segment`'s labels of the same images with the same classes; the score must be the mean
top-class probability of `segment --save probs`.

Label Studio pins packages the project does not take (Django, numpy, opencv), so it lives in its own
virtual environment, `.venv-tools/label-studio` (made by `bash .ci/tools.sh`, as .ci/run does; found as
tests/tools.py finds the export tests' tools). Without it the tests skip with the command that makes
it, or fail under CI=true. Run them alone with `pytest -m labelstudio`. The browser test also needs Chromium (as
tests/test_demo_browser.py); DAPSEG_UPDATE_SCREENSHOT=1 writes docs/labelstudio.png.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import skimage.data
from PIL import Image

from servers import free_port, wait_until_up
from tools import tool_python

REPO = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).resolve().parent / "labelstudio_driver.py"
LS_START_S = 420.0  # a fresh database migrates first: ~40 s on an idle 2-core machine, ~200 s under load
SERVE_START_S = 180.0
CHROMIUM = Path(os.environ.get("DAPSEG_CHROMIUM", "/usr/bin/chromium"))

# the first test also starts Label Studio (up to LS_START_S) and dapseg serve
pytestmark = [pytest.mark.labelstudio, pytest.mark.timeout(900)]

# Label order = the classes' order; "Person" and "Rocket" take their synonyms from the classes file,
# "Sky" and "Cat" have no line there and are their own prompt; serve's --unlabeled-classes adds
# "background; wall" after them, whose pixels belong to no region (255 in segment's label PNG).
LABELS = ["Person", "Sky", "Rocket", "Cat"]
CLASSES_FILE = "person; astronaut\nrocket; missile\n"
SEGMENT_CLASSES = "person; astronaut, Sky, rocket; missile, Cat, background; wall"
UNLABELED_PNG = 255
CONFIG = ('<View><Image name="image" value="$image" zoom="true"/>'
          '<BrushLabels name="tag" toName="image">'
          + "".join(f'<Label value="{v}"/>' for v in LABELS)
          + "</BrushLabels></View>")
BAD_URL = "http://images.example.invalid/photo.png"  # not Label Studio's host: refused by dapseg serve


def _own_venv_env() -> dict[str, str]:
    """The environment for Label Studio's venv: nothing of the project's Python path leaks in."""
    env = {**os.environ, "PYTHONNOUSERSITE": "1"}
    env.pop("PYTHONPATH", None)
    return env


def _stop(proc: subprocess.Popen) -> None:
    """Stop a server started in its own process group, with whatever it started."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _save_photo(path: Path, img: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(img)).save(path)
    return path


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    python = tool_python("label-studio")  # skips (fails under CI) with the command that makes it
    exe = python.parent / "label-studio"
    tmp = tmp_path_factory.mktemp("labelstudio")
    root = tmp / "files"  # LOCAL_FILES_DOCUMENT_ROOT and dapseg serve's --local-files-root
    photos = {
        "astronaut.png": _save_photo(root / "photos" / "astronaut.png", skimage.data.astronaut()[::2, ::2]),
        "cat.png": _save_photo(root / "photos" / "cat.png", skimage.data.chelsea()[::2, ::2]),
    }
    upload = _save_photo(tmp / "upload" / "coffee.png", skimage.data.coffee()[::2, ::2])
    port, token = free_port(), secrets.token_hex(20)
    env = {
        **_own_venv_env(),
        "LABEL_STUDIO_USERNAME": "annotator@example.com", "LABEL_STUDIO_PASSWORD": secrets.token_hex(8),
        "LABEL_STUDIO_USER_TOKEN": token,
        "LABEL_STUDIO_BASE_DATA_DIR": str(tmp / "data"),
        "LOCAL_FILES_SERVING_ENABLED": "true", "LOCAL_FILES_DOCUMENT_ROOT": str(root),
        # dapseg serve runs on 127.0.0.1: Label Studio refuses ML backends (and their webhook) on
        # local addresses unless told otherwise
        "ML_BLOCK_LOCAL_IP": "false", "SSRF_PROTECTION_ENABLED": "false",
        "LATEST_VERSION_CHECK": "false", "COLLECT_ANALYTICS": "false",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    log = tmp / "label-studio.log"
    cmd = [str(exe), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port),
           "--data-dir", str(tmp / "data"), "--enable-legacy-api-token"]
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/health", proc, log, "label-studio", LS_START_S)
        print(f"label-studio answered /health after {time.monotonic() - t0:.0f} s")
        yield SimpleNamespace(url=url, token=token, password=env["LABEL_STUDIO_PASSWORD"],
                              user=env["LABEL_STUDIO_USERNAME"], python=python, root=root,
                              photos=photos, upload=upload, log=log, tmp=tmp)
    finally:
        _stop(proc)


def _driver(ls: SimpleNamespace, *args: str) -> dict:
    r = subprocess.run([str(ls.python), str(DRIVER), *args, "--url", ls.url, "--token", ls.token],
                       capture_output=True, text=True, timeout=300, env={**_own_venv_env(), "NO_PROXY": "127.0.0.1"})
    assert r.returncode == 0, f"driver {args[0]} failed:\n{r.stderr[-4000:]}\nlabel-studio log:\n" \
                              f"{ls.log.read_text()[-3000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def predicted(label_studio, tmp_path_factory, cli_env):
    """The project after dapseg serve pre-annotated it: what the SDK read back, and serve's log."""
    ls = label_studio
    setup = _driver(ls, "setup", "--photos", str(ls.root / "photos"), "--upload", str(ls.upload),
                    "--bad-url", BAD_URL, "--config", CONFIG)
    tmp = tmp_path_factory.mktemp("serve")
    classes_file = tmp / "classes.txt"
    classes_file.write_text(CLASSES_FILE)
    port = free_port()
    log = tmp / "serve.log"
    env = {**cli_env, "DAPSEG_CACHE": str(tmp / "cache"), "NO_PROXY": "127.0.0.1,localhost",
           "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": setup["pat"]}  # a personal access token
    cmd = [sys.executable, "-m", "dapseg", "serve", "--random-weights", "--tiny", "--device", "cpu",
           "--classes-file", str(classes_file), "--unlabeled-classes", "background; wall",
           "--local-files-root", str(ls.root), "--max-tasks", "2",
           "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    backend = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{backend}/health", proc, log, "dapseg serve", SERVE_START_S)
        with urllib.request.urlopen(f"{backend}/health", timeout=10) as r:
            health = json.load(r)
        # Two rounds: at most 2 tasks per request (--max-tasks 2), the others are asked for again
        result = _driver(ls, "predict", "--project", str(setup["project"]), "--backend", backend,
                         "--out", str(tmp / "masks"), "--times", "2")
    finally:
        _stop(proc)
    return SimpleNamespace(setup=setup, health=health, result=result, serve_log=log.read_text(), tmp=tmp)


def _task_files(ls: SimpleNamespace, setup: dict) -> dict[int, Path]:
    """Task id -> the image file it names (the bad task excluded)."""
    out = {}
    for task_id, url in setup["tasks"].items():
        if url.startswith("/data/local-files/"):
            out[int(task_id)] = ls.photos[url.rsplit("/", 1)[1]]
        elif url.startswith("/data/upload/"):
            out[int(task_id)] = ls.upload
    return out


def test_label_studio_stores_dapseg_masks_equal_to_segment(label_studio, predicted, run_cli, tmp_path):
    ls, setup, result = label_studio, predicted.setup, predicted.result
    files = _task_files(ls, setup)
    assert len(files) == 3, setup["tasks"]
    bad_task = next(int(t) for t, url in setup["tasks"].items() if url == BAD_URL)

    # Label Studio connected the backend and took its model version ("dapseg-<preset>-<settings hash>")
    assert result["backend_state"] == "CO", result
    version = predicted.health["model_version"]
    assert version.startswith("dapseg-dap-") and result["backend_version"] == version
    # At most 2 tasks per request: the first round predicted at most 2, the second the rest
    assert 1 <= result["counts"][0] <= 2 and result["counts"][1] == 3, result["counts"]
    assert "more than the server's 2 per request" in predicted.serve_log
    # The task on another host failed alone, named, and has no prediction
    assert f"task {bad_task}: {BAD_URL!r} is not on Label Studio's host" in predicted.serve_log
    by_task = {p["task"]: p for p in result["predictions"]}
    assert sorted(by_task) == sorted(files)
    # Local files were read from --local-files-root, the upload downloaded from Label Studio with the
    # personal access token (exchanged for an access token)
    assert "/data/local-files/" not in predicted.serve_log.split("Uvicorn running", 1)[1]
    assert "GET " + ls.url + "/data/upload/" in predicted.serve_log and '"HTTP/1.1 200 OK"' in predicted.serve_log
    assert "POST " + ls.url + "/api/token/refresh/" in predicted.serve_log

    # dapseg segment on the same files with the same classes
    out = tmp_path / "segment"
    unlabeled_pixels = 0
    r = run_cli("segment", *map(str, files.values()), "--classes", SEGMENT_CLASSES, "--random-weights", "--tiny",
                "--device", "cpu", "--unlabeled-classes", "background", "--save", "labels,probs", "--out", str(out))
    assert r.returncode == 0, r.stderr
    for task_id, path in files.items():
        expected = np.asarray(Image.open(out / f"{path.stem}_labels.png"))
        prediction = by_task[task_id]
        assert prediction["model_version"] == version
        regions = prediction["regions"]
        present = [LABELS[c] for c in np.unique(expected) if c < len(LABELS)]
        assert [reg["label"] for reg in regions] == present  # one result per class present, in label order
        decoded = np.full(expected.shape, UNLABELED_PNG, dtype=np.uint8)  # no region covers the pixel
        for reg in regions:
            assert (reg["type"], reg["from_name"], reg["to_name"]) == ("brushlabels", "tag", "image")
            assert (reg["height"], reg["width"]) == expected.shape
            mask = np.load(reg["mask"])
            assert not (mask & (decoded != UNLABELED_PNG)).any(), "two regions cover one pixel"
            decoded[mask] = LABELS.index(reg["label"])
        np.testing.assert_array_equal(decoded, expected, err_msg=f"task {task_id} ({path.name})")
        unlabeled_pixels += int((expected == UNLABELED_PNG).sum())
        # score: the mean over pixels of the top class probability
        probs = np.load(out / f"{path.stem}_probs.npz")["probs"].astype(np.float64)  # (C, H, W) float16
        assert prediction["score"] == pytest.approx(probs.max(axis=0).mean(), abs=2e-3)
    assert unlabeled_pixels > 0, "no pixel went to the unlabeled class: the comparison did not cover them"


@pytest.mark.usefixtures("predicted")
def test_label_studio_shows_the_pre_annotation_in_the_browser(label_studio, predicted):
    """The labeling page of a pre-annotated task, logged in with headless Chromium, lists dapseg's regions
    (one brush region per class present, as Label Studio 1.23's regions panel shows them)."""
    if not CHROMIUM.is_file():
        msg = f"Chromium not found at {CHROMIUM} (see .ci/install-browser.sh)"
        if os.environ.get("DAPSEG_REQUIRE_BROWSER", "") not in ("", "0"):
            pytest.fail(msg)
        pytest.skip(msg)
    from playwright.sync_api import sync_playwright

    ls = label_studio
    files = _task_files(ls, predicted.setup)
    task_id = next(t for t, path in files.items() if path.name == "astronaut.png")
    labels = [reg["label"] for p in predicted.result["predictions"] if p["task"] == task_id for reg in p["regions"]]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.set_default_timeout(90_000)
            page.goto(f"{ls.url}/user/login/")
            page.fill("input[name=email]", ls.user)
            page.fill("input[name=password]", ls.password)
            page.click("button[type=submit]")
            page.wait_for_url(lambda u: "/user/login" not in u)  # logged in: the home page
            page.goto(f"{ls.url}/projects/{predicted.setup['project']}/data?task={task_id}")
            page.wait_for_selector("canvas")
            # The regions panel lists one brush region per class dapseg found
            page.wait_for_selector(".lsf-tree__node_type_brushregion")
            titles = page.locator(".lsf-tree__node_type_brushregion .lsf-outliner-item__title").all_inner_texts()
            assert sorted(titles) == sorted(labels)
            time.sleep(2)  # let the masks render on the canvas
            if os.environ.get("DAPSEG_UPDATE_SCREENSHOT", "") not in ("", "0"):
                _save_screenshot(page, REPO / "docs" / "labelstudio.png")
        finally:
            browser.close()


def _save_screenshot(page, path: Path) -> None:
    raw = path.with_suffix(".raw.png")
    page.screenshot(path=str(raw))
    Image.open(raw).convert("RGB").quantize(256).save(path, optimize=True)
    raw.unlink()
    assert path.stat().st_size < 500_000, f"{path} is {path.stat().st_size} bytes"
