"""The web app end to end: a real server, Debian's Chromium driven by Playwright, the sample study.

Needs the [web] extra and /usr/bin/chromium (CI installs both and sets
DIFFUSION_ANOMALY_REQUIRE_BROWSER=1, so that there these tests fail instead of skipping).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from DiffusionAnomalyLib import resources

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(os.environ.get("DIFFUSION_ANOMALY_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))


def _require(what: str, available: bool) -> None:
    if not available:
        if os.environ.get("DIFFUSION_ANOMALY_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{what} is missing but DIFFUSION_ANOMALY_REQUIRE_BROWSER=1")
        pytest.skip(f"{what} is missing (pip install -e '.[web,test]'; apt-get install chromium)")


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = condition()
            if last:
                return last
        except Exception as error:  # not up yet
            last = error
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    _require("trame-slicer", _installed("trame_slicer"))
    _require("playwright", _installed("playwright"))
    _require("Chromium", Path(CHROMIUM).exists())
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("web") / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "DiffusionAnomalyLib.cli", "web", "--port", str(port),
                                    "--max-sessions", "3", "--idle-seconds", "4"],
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: process.poll() is None and urllib.request.urlopen(f"{base}/healthz", timeout=2).status == 200, 60, "the web server")
        yield base
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
        print(log_path.read_text(errors="replace")[-3000:])


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def _open(browser, base: str):
    """A new browser context (its own cookies: another user) on the app."""
    from playwright.sync_api import expect

    page = browser.new_context(viewport={"width": 1500, "height": 950}).new_page()
    page.goto(base, timeout=180_000)
    expect(page.locator("#load-sample")).to_be_visible(timeout=60_000)
    return page


def _status(page, base: str) -> dict:
    """The scene state of this page's own session, read from its server process."""
    return page.request.get(f"{base}/api/status").json()


def _shown(page) -> dict:
    return json.loads(page.locator("#result-state").text_content())


def test_detect_on_the_sample_shows_overlay_and_segmentation(server, browser):
    from playwright.sync_api import expect

    page = _open(browser, server)
    page.click("#load-sample")
    _wait_for(lambda: len(_status(page, server)["volumes"]) == 4, 30, "the sample's four volumes")
    for index, name in enumerate(("t1", "t1ce", "t2", "flair")):
        expect(page.locator(f"#channel-{index}").locator("xpath=ancestor::div[contains(@class,'v-select')]")).to_contain_text(f"synth-sample_{name}")
    page.locator("#steps").fill("4")

    clicked = time.monotonic()
    page.click("#detect")
    expect(page.locator("#progress")).to_be_visible(timeout=10_000)
    expect(page.locator("#detect")).to_contain_text("Cancel")
    _wait_for(lambda: _shown(page)["overlay_shown"], 300, "the overlay in the page")
    seconds = time.monotonic() - clicked

    status = _status(page, server)
    assert status["overlay_shown"] and status["segmentation_shown"] and status["segments"] == 1, status
    assert status["overlay_opacity"] == pytest.approx(0.5)
    assert status["anomaly_voxels"] > 0 and not status["error"]
    assert status["background"], "the FLAIR is shown under the map"
    expect(page.locator("#status")).to_contain_text("Done: 106 slices")
    time.sleep(2)  # the views stream their last frames
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-detect.png"))
    print(f"\nclick to overlay: {seconds:.1f} s (sample, 4 steps, CPU)")

    before = status["anomaly_voxels"]
    slider = page.locator("#threshold").locator("xpath=ancestor::div[contains(@class,'v-slider')][1]").get_by_role("slider")
    slider.focus()
    slider.press("End")  # the threshold to its maximum: the segmentation is re-cut at once
    _wait_for(lambda: _status(page, server)["anomaly_voxels"] < before, 20, "the re-cut segmentation")
    expect(page.locator("#status")).to_contain_text("voxels above 1")

    page.click("#preview")
    expect(page.locator("#status")).to_contain_text("(preview)", timeout=60_000)
    assert _status(page, server)["overlay_shown"]

    page.click("#detect")
    expect(page.locator("#detect")).to_contain_text("Cancel")
    page.click("#detect")
    expect(page.locator("#status")).to_contain_text("Cancelled", timeout=30_000)
    assert _status(page, server)["overlay_shown"], "a cancelled run keeps the previous result"
    page.context.close()


def _write_study(folder: Path, prefix: str, shift_flair: bool) -> list:
    paths = []
    for source, suffix in zip(resources.sample_channels(), ("t1", "t1ce", "t2", "flair")):
        image = sitk.ReadImage(str(source))
        if suffix == "flair" and shift_flair:
            image.SetOrigin(tuple(np.array(image.GetOrigin()) + 400.0))
        path = folder / f"{prefix}_{suffix}.nii.gz"
        sitk.WriteImage(image, str(path))
        paths.append(str(path))
    return paths


def test_bad_uploads_show_an_error_and_sessions_are_separate(server, browser, tmp_path):
    from playwright.sync_api import expect

    first, second = _open(browser, server), _open(browser, server)
    first.click("#load-sample")
    _wait_for(lambda: len(_status(first, server)["volumes"]) == 4, 30, "the sample in the first session")

    not_an_image = tmp_path / "report.nii.gz"
    not_an_image.write_text("a radiology report, not an image")
    second.locator("#upload").set_input_files(str(not_an_image))
    expect(second.locator("#error")).to_contain_text("report.nii.gz (unreadable as an image volume)", timeout=30_000)
    assert _status(second, server)["volumes"] == []

    second.locator("#upload").set_input_files(_write_study(tmp_path, "case2", shift_flair=True))
    _wait_for(lambda: len(_status(second, server)["volumes"]) == 4, 60, "the uploaded study")
    second.click("#detect")
    expect(second.locator("#error")).to_contain_text("do not show the same region", timeout=30_000)
    status = _status(second, server)
    assert not status["running"] and not status["overlay_shown"]

    second.click("#load-sample")  # the session is still usable
    _wait_for(lambda: len(_status(second, server)["volumes"]) == 8, 30, "the sample after the error")

    assert sorted(_status(first, server)["volumes"]) == sorted(f"synth-sample_{s}" for s in ("t1", "t1ce", "t2", "flair"))
    assert not any(name.startswith("case2") for name in _status(first, server)["volumes"])
    for page in (first, second):
        page.context.close()
    health = lambda: json.loads(urllib.request.urlopen(f"{server}/healthz", timeout=5).read())  # noqa: E731
    _wait_for(lambda: health()["sessions"] == 0, 60, "closed pages' sessions to stop")
