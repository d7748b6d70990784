"""The web demo in a real browser: `dapseg demo` served on localhost, driven by headless Chromium.

Needs Debian's chromium at /usr/bin/chromium (or $DAPSEG_CHROMIUM; installed by
.ci/install-browser.sh); Playwright launches it by path, no browser download. Without it the test is
skipped with the reason (the README's `pip install` cannot install a system browser), unless
DAPSEG_REQUIRE_BROWSER=1 (set by .ci/run): then a missing browser fails the test. With
DAPSEG_UPDATE_SCREENSHOT=1 the run also writes docs/demo.png (the README's screenshot).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from servers import free_port, wait_until_up

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path(os.environ.get("DAPSEG_CHROMIUM", "/usr/bin/chromium"))
SERVER_START_S = 120.0  # a cold start imports torch, open_clip and gradio
REQUEST_MS = 60_000


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory, cli_env):
    port = free_port()
    log = tmp_path_factory.mktemp("demo") / "server.log"
    env = {**cli_env, "GRADIO_ANALYTICS_ENABLED": "False", "DAPSEG_CACHE": str(tmp_path_factory.mktemp("cache")),
           "NO_PROXY": "127.0.0.1,localhost"}
    cmd = [sys.executable, "-m", "dapseg", "demo", "--random-weights", "--tiny",
           "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_up(url, proc, log, "dapseg demo", SERVER_START_S, poll_s=0.3)
        yield url, proc, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def browser_required() -> bool:
    return os.environ.get("DAPSEG_REQUIRE_BROWSER", "") not in ("", "0")


@pytest.fixture(scope="module")
def chromium_present() -> None:
    """Skip (or, where DAPSEG_REQUIRE_BROWSER=1, fail) before the demo server is started."""
    if CHROMIUM.is_file():
        return
    msg = (f"Chromium not found at {CHROMIUM}: install Debian's chromium (`apt-get install -y chromium`, "
           "see .ci/install-browser.sh) or point DAPSEG_CHROMIUM at a Chromium binary")
    if browser_required():
        pytest.fail(f"{msg}; DAPSEG_REQUIRE_BROWSER=1 makes the browser test mandatory")
    pytest.skip(f"{msg}; set DAPSEG_REQUIRE_BROWSER=1 to make this a failure")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            yield b
        finally:
            b.close()


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a listening TCP socket on ``port``, from Linux's /proc/net/tcp{,6}."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                addr, hex_port = local.rsplit(":", 1)
                if state == "0A" and int(hex_port, 16) == port:
                    found.add(addr)
    return found


def _photo(tmp_path: Path) -> Path:
    path = tmp_path / "astronaut.png"
    img = skimage.data.astronaut()[::2, ::2]  # 256x256: enough for the page, fast on CPU
    Image.fromarray(np.ascontiguousarray(img)).save(path)
    return path


def _segment(page, classes: str) -> None:
    page.fill("#classes textarea", classes)
    page.click("#run")


def _wait_for_run_done(page, previous_status: str) -> None:
    """The run is over when a new status line ("... segmented in ...") or the error box shows."""
    page.wait_for_function(
        """(prev) => {
            const s = document.querySelector('#status');
            const text = s ? s.innerText.trim() : '';
            const done = text.includes('segmented in') && text !== prev;
            return done || document.querySelector('#error-box .dapseg-error') !== null;
        }""",
        arg=previous_status, timeout=REQUEST_MS,
    )


def _wait_for_loaded_image(page, selector: str) -> None:
    """An <img> may be in the page before its picture has arrived: wait until it has decoded."""
    page.wait_for_function(
        """(sel) => { const img = document.querySelector(sel);
                      return img !== null && img.complete && img.naturalWidth > 0; }""",
        arg=selector, timeout=REQUEST_MS,
    )


def _save_screenshot(page, path: Path) -> None:
    """The README's screenshot, as a 256-colour PNG to stay well under 500 KB."""
    path.parent.mkdir(exist_ok=True)
    raw = path.with_suffix(".raw.png")
    page.screenshot(path=str(raw), full_page=True)
    Image.open(raw).convert("RGB").quantize(256).save(path, optimize=True)
    raw.unlink()
    assert path.stat().st_size < 500_000, f"{path} is {path.stat().st_size} bytes"


def _shares(page) -> dict[str, float]:
    names = page.locator("#legend .legend-class").all_inner_texts()
    values = [float(v) for v in page.locator("#legend .legend-share").all_inner_texts()]
    return dict(zip(names, values, strict=True))


@pytest.mark.usefixtures("chromium_present")  # first: skip before the server and browser start
def test_demo_segments_reports_errors_and_keeps_serving(browser, demo_server, tmp_path):
    url, proc, log = demo_server
    if sys.platform == "linux":  # the demo listens on the loopback address only (127.0.0.1 = 0100007F)
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        assert _listening_addresses(port) == {"0100007F"}
    photo = _photo(tmp_path)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(REQUEST_MS)
    page.goto(url)
    page.wait_for_selector("#input-image input[type=file]", state="attached")
    # The page lists the presets and the default one is selected.
    assert page.locator("#preset input").input_value() in ("dap", "naclip")

    # 1. A real request: overlay, legend with every class, shares summing to 100 %.
    page.set_input_files("#input-image input[type=file]", str(photo))
    page.wait_for_selector("#input-image img")
    _segment(page, "person, sky; background, rocket, flag")
    _wait_for_run_done(page, "")
    assert page.locator("#error-box .dapseg-error").count() == 0, page.inner_text("#error-box")
    for picture in ("#overlay img", "#label-map img"):
        _wait_for_loaded_image(page, picture)
    shares = _shares(page)
    assert list(shares) == ["person", "sky; background", "rocket", "flag"]
    assert all(0.0 <= v <= 100.0 for v in shares.values())
    assert sum(shares.values()) == pytest.approx(100.0, abs=1e-6)
    assert float(page.inner_text("#legend .legend-total")) == pytest.approx(100.0)
    _wait_for_loaded_image(page, "#heatmap img")
    # Picking another class in the dropdown renders that class's heatmap.
    first_heatmap = page.locator("#heatmap img").get_attribute("src")
    page.locator("#heatmap-class input").click()
    page.locator('#heatmap-class li[role=option][aria-label="rocket"]').click()
    page.wait_for_function(
        """(prev) => { const img = document.querySelector('#heatmap img');
                       return img !== null && img.getAttribute('src') !== prev && img.complete
                              && img.naturalWidth > 0; }""",
        arg=first_heatmap, timeout=REQUEST_MS,
    )
    # Both downloads (label PNG and JSON) are offered.
    downloads = page.inner_text("#downloads").replace("\n", "")
    assert "astronaut_labels.png" in downloads and "astronaut.json" in downloads
    if os.environ.get("DAPSEG_UPDATE_SCREENSHOT") == "1":
        _save_screenshot(page, REPO / "docs" / "demo.png")
    first_status = page.inner_text("#status")

    # 2. An empty class list: a message in the page, the old results are cleared.
    _segment(page, "   ")
    page.wait_for_selector("#error-box .dapseg-error")
    assert "class list is empty" in page.inner_text("#error-box")
    assert page.locator("#legend .legend-row").count() == 0
    assert proc.poll() is None, log.read_text()[-4000:]

    # 3. The server still answers: a third request succeeds and the error is gone.
    _segment(page, "person, sky")
    page.wait_for_selector("#error-box .dapseg-error", state="detached")
    _wait_for_run_done(page, "")
    shares = _shares(page)
    assert list(shares) == ["person", "sky"]
    assert sum(shares.values()) == pytest.approx(100.0, abs=1e-6)
    assert re.search(r"2 classes", page.inner_text("#status")), page.inner_text("#status")
    assert page.inner_text("#status") != first_status
    page.close()


@pytest.mark.parametrize(("required", "outcome"), [("", "1 skipped"), ("1", "1 error")])
def test_missing_browser_skips_unless_required(required, outcome, cli_env, tmp_path):
    """Runs this module's browser test with no Chromium: skipped with the reason, or an error in CI."""
    env = {**cli_env, "DAPSEG_CHROMIUM": str(tmp_path / "no-chromium"), "DAPSEG_REQUIRE_BROWSER": required}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
         f"{Path(__file__).name}::test_demo_segments_reports_errors_and_keeps_serving"],
        cwd=REPO / "tests", env=env, capture_output=True, text=True, timeout=300,
    )
    assert outcome in proc.stdout, proc.stdout[-3000:]
    assert "Chromium not found" in proc.stdout
    assert ("make this a failure" in proc.stdout) == (required == "")
    assert proc.returncode == (0 if required == "" else 1)
