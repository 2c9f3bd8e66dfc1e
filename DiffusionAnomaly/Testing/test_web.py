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
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from DiffusionAnomalyLib import resources
from DiffusionAnomalyLib.bundle import load_bundle

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


PATIENT_NAME = "Jane-Doe-1961"


class WebServer(str):
    """The front server's address, with where its output and temporary files go."""

    log_path: Path
    temporary: Path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    _require("trame-slicer", _installed("trame_slicer"))
    _require("playwright", _installed("playwright"))
    _require("Chromium", Path(CHROMIUM).exists())
    port = _free_port()
    base = WebServer(f"http://127.0.0.1:{port}")
    base.log_path = tmp_path_factory.mktemp("web") / "server.log"
    base.temporary = tmp_path_factory.mktemp("web-tmp")
    environment = {**os.environ, "TMPDIR": str(base.temporary)}
    with open(base.log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "DiffusionAnomalyWeb.cli", "--port", str(port), "--max-sessions", "3",
                                    "--sessions-per-client", "2", "--idle-seconds", "4"],
                                   stdout=log, stderr=subprocess.STDOUT, env=environment)
    try:
        _wait_for(lambda: process.poll() is None and urllib.request.urlopen(f"{base}/healthz", timeout=2).status == 200, 60, "the web server")
        yield base
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        output = base.log_path.read_text(errors="replace")
        print(output[-3000:])
    # Nothing of the sessions outlives the server: no log, no upload, no name of a patient.
    assert PATIENT_NAME not in output
    leftovers = [p for p in base.temporary.rglob("*")]
    assert not leftovers, leftovers


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def _open(browser, base: str):
    """A new browser context (its own cookies: another user) with a session started from the front page."""
    from playwright.sync_api import expect

    page = browser.new_context(viewport={"width": 1500, "height": 950}).new_page()
    page.goto(base, timeout=60_000)
    page.click("#start-session")
    expect(page.locator("#load-sample")).to_be_visible(timeout=180_000)
    return page


def _health(base: str) -> dict:
    return json.loads(urllib.request.urlopen(f"{base}/healthz", timeout=5).read())


def _session_ports() -> list:
    """Loopback ports of the running session processes, from their command lines (Linux /proc)."""
    ports = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            arguments = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "DiffusionAnomalyWeb.app" in arguments and "--port" in arguments:
            ports.append(int(arguments[arguments.index("--port") + 1]))
    return ports


def _slider_text(page, name: str) -> str:
    return page.locator(f"#{name}-value").text_content()


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
    # Each slider says its value and unit without being dragged, starting at the model's defaults.
    defaults = load_bundle(resources.default_model()).card.defaults
    level = defaults.noise_level
    assert f"Noise level L = {level:.2f} ({round(level * 1000)} of 1000 steps)" in _slider_text(page, "noise-level")
    assert f"Guidance scale s = {defaults.guidance_scale:g}" in _slider_text(page, "guidance-scale")
    redraw = defaults.redraw_noise_level
    assert (f"Redraw lesions from L = {redraw:.2f}" if redraw > level else "Redraw lesions: off") in _slider_text(page, "redraw-noise-level")
    expect(page.locator("#threshold-meaning")).not_to_be_empty()  # what the threshold means is said
    expect(page.locator("#map-reference").locator("xpath=ancestor::div[contains(@class,'v-select')]")).to_contain_text(defaults.map_reference)
    expect(page.locator("#model-note")).to_contain_text("Automatic: brain-mri-synth-64 fits the loaded volumes")
    # Both buttons fit in the panel.
    drawer = page.locator("nav.v-navigation-drawer").bounding_box()
    for button in ("#detect", "#preview"):
        box = page.locator(button).bounding_box()
        assert box["x"] >= drawer["x"] and box["x"] + box["width"] <= drawer["x"] + drawer["width"], button
    # Settings typed in wrong are refused with the allowed range, not a Python message.
    for typed, message in (("", "steps is empty: enter a whole number from 4 to 1000"), ("abc", "steps must be a whole number from 4 to 1000, got 'abc'"),
                           ("2", "steps must be a whole number from 4 to 1000, got 2")):
        page.locator("#steps").fill(typed)
        page.click("#detect")
        expect(page.locator("#error")).to_contain_text(message, timeout=10_000)
        assert not _status(page, server)["running"]
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
    expect(page.locator("#legend")).to_be_visible()
    assert float(page.locator("#legend-max").text_content()) > 0, "the colour legend has numbers"
    assert status["volume_rendering_in_3d"], "the 3D view shows the head around the segmentation"
    expect(page.locator("#status")).to_contain_text("Done: 106 slices")
    full_slices = status["full_result_slices_with_map"]
    assert full_slices > 50
    time.sleep(2)  # the views stream their last frames
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-detect.png"))
    print(f"\nclick to overlay: {seconds:.1f} s (sample, 4 steps, CPU)")

    before = status["anomaly_voxels"]
    page.locator("#threshold-mode").locator("xpath=ancestor::div[contains(@class,'v-select')]").click()
    page.get_by_role("option", name="fixed").click()
    assert "map units" in _slider_text(page, "threshold")
    slider = page.locator("#threshold").locator("xpath=ancestor::div[contains(@class,'v-slider')][1]").get_by_role("slider")
    slider.focus()
    slider.press("End")  # the threshold to its maximum: the segmentation is re-cut at once
    _wait_for(lambda: _status(page, server)["anomaly_voxels"] < before, 20, "the re-cut segmentation")
    expect(page.locator("#status")).to_contain_text("voxels above 4")

    page.click("#preview")
    expect(page.locator("#status")).to_contain_text("(preview)", timeout=60_000)
    status = _status(page, server)
    assert status["overlay_shown"] and status["overlay_is_preview"]
    assert status["full_result_slices_with_map"] == full_slices, "a preview never overwrites the full result"

    page.click("#detect")
    expect(page.locator("#detect")).to_contain_text("Cancel")
    page.click("#detect")
    expect(page.locator("#status")).to_contain_text("Cancelled", timeout=30_000)
    assert _status(page, server)["overlay_shown"], "a cancelled run keeps the previous result"
    page.context.close()
    # The server counts a session until it stops; the next test opens as many as one client may.
    _wait_for(lambda: _health(server)["sessions"] == 0, 60, "the closed page's session to stop")


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

    not_an_image = tmp_path / f"{PATIENT_NAME}_report.nii.gz"
    not_an_image.write_text("a radiology report, not an image", encoding="utf-8")
    second.locator("#upload").set_input_files(str(not_an_image))
    expect(second.locator("#error")).to_contain_text(f"{PATIENT_NAME}_report (unreadable as an image volume)", timeout=30_000)
    assert _status(second, server)["volumes"] == []
    second.locator("#upload").set_input_files(files=[{"name": "..", "mimeType": "application/octet-stream", "buffer": b"x"}])
    expect(second.locator("#error")).to_contain_text("(not a NIfTI", timeout=30_000)

    second.locator("#upload").set_input_files(_write_study(tmp_path, f"{PATIENT_NAME}_case2", shift_flair=True))
    _wait_for(lambda: len(_status(second, server)["volumes"]) == 4, 60, "the uploaded study")
    second.click("#detect")
    expect(second.locator("#error")).to_contain_text("do not show the same region", timeout=30_000)
    status = _status(second, server)
    assert not status["running"] and not status["overlay_shown"]

    second.click("#load-sample")  # the session is still usable
    _wait_for(lambda: len(_status(second, server)["volumes"]) == 8, 30, "the sample after the error")

    assert sorted(_status(first, server)["volumes"]) == sorted(f"synth-sample_{s}" for s in ("t1", "t1ce", "t2", "flair"))
    assert not any(PATIENT_NAME in name for name in _status(first, server)["volumes"])
    for page in (first, second):
        page.context.close()
    _wait_for(lambda: _health(server)["sessions"] == 0, 60, "closed pages' sessions to stop")


def test_sessions_start_only_on_request_and_answer_only_the_front_server(server):
    import http.cookiejar

    before = _health(server)["sessions"]
    for _ in range(3):  # bare GETs (crawlers, stray requests) start nothing
        page = urllib.request.urlopen(server, timeout=10).read().decode()
        assert 'id="start-session"' in page
    assert _health(server)["sessions"] == before

    foreign = urllib.request.Request(f"{server}/session", data=b"", method="POST", headers={"Origin": "http://evil.example"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(foreign, timeout=10)
    assert refused.value.code == 403

    def start_session():
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        return opener, opener.open(urllib.request.Request(f"{server}/session", data=b"", method="POST"), timeout=240)

    # Pages a user keeps open: touched more often than the server's idle time, however slow the starts are.
    open_pages, closing = [], threading.Event()

    def keep_pages_open():
        while not closing.wait(1.0):
            for page in list(open_pages):
                try:
                    page.open(f"{server}/api/status", timeout=10).close()
                except OSError:
                    pass

    toucher = threading.Thread(target=keep_pages_open, daemon=True)
    first, landed = start_session()
    open_pages.append(first)
    toucher.start()
    try:
        assert landed.status == 200 and _health(server)["sessions"] == before + 1
        assert first.open(f"{server}/api/status", timeout=30).status == 200, "the front server forwards with the secret"
        second, _ = start_session()
        open_pages.append(second)
        with pytest.raises(urllib.error.HTTPError) as limited:
            start_session()
        assert limited.value.code == 429 and "already has 2 session(s)" in limited.value.read().decode()
        assert _health(server)["sessions"] == before + 2

        ports = _session_ports()
        assert len(ports) == before + 2
        for port in ports:  # what anyone with a shell on the server could try
            for headers in ({}, {"X-Diffusion-Anomaly-Session": "guess"}):
                with pytest.raises(urllib.error.HTTPError) as direct:
                    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/api/status", headers=headers), timeout=10)
                assert direct.value.code == 403
            with pytest.raises(urllib.error.HTTPError) as socket_refused:
                urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/ws", headers={
                    "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13"}), timeout=10)
            assert socket_refused.value.code == 403
    finally:
        closing.set()
        toucher.join()
    _wait_for(lambda: _health(server)["sessions"] == before, 60, "unused sessions to stop")
