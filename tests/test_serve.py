"""tools/serve.py: the JSON endpoint (one at a time and 20 at once) and the page in a real
headless Chromium (Debian's, driven by Selenium through the system chromedriver), for an
exported detector and segmenter beside each other."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gradio", reason="the demo extra (pip install '.[demo]') is not installed")

from detectors import load_student  # noqa: E402
from detectors import recipe as detection  # noqa: E402
from distill.config import load_config  # noqa: E402
from distill.text_encoder import MAX_NAMES  # noqa: E402
from segmentors import load_student as load_segmenter  # noqa: E402
from segmentors import recipe as segmentation  # noqa: E402
from tests.test_text_encoder import TINY  # noqa: E402
from tools import export  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NAMES = "circle, drop, triangle"  # 1 novel, 2 base names of the embedded world
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A detector and a segmenter exported with their text tower (and ONNX graphs), served
    on a free port. ``OVD_SERVE_EXPORTS=<detector export>,<segmenter export>`` serves those
    instead (trained ones, for the README's picture: see test_the_page_in_a_headless_browser)."""
    from ovdistill.serve import Served, val_examples

    root = tmp_path_factory.mktemp("serve")
    if os.environ.get("OVD_SERVE_EXPORTS"):
        det_export, seg_export = (Path(p) for p in os.environ["OVD_SERVE_EXPORTS"].split(","))
        images = val_examples([Served.load(det_export)])
    else:
        world = [f"world.root={root / 'world'}", *TINY]
        det = load_config(REPO / "configs/shapes/vild_text.yaml",
                          [*world, f"output_dir={root / 'det'}"])
        detection.train(det, progress=False)
        seg = load_config(REPO / "configs/shapes/seg_supervised.yaml",
                          [*world, f"output_dir={root / 'seg'}"])
        segmentation.train(seg, progress=False)
        for run in ("det", "seg"):
            assert export.main(["--run", str(root / run), "--output",
                                str(root / f"{run}_export"), "--text-encoder", "--onnx"]) == 0
        det_export, seg_export = root / "det_export", root / "seg_export"
        images = sorted((root / "world").glob("*/images/val/*.png"))
    port = free_port()
    log = open(root / "server.log", "w")  # noqa: SIM115 - open while the server runs
    proc = subprocess.Popen([sys.executable, "-m", "tools.serve", str(det_export),
                             str(seg_export), "--port", str(port), "--examples", "0"],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/exports", timeout=5)
            break
        except (urllib.error.URLError, ConnectionError):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError((root / "server.log").read_text()) from None
            time.sleep(0.5)
    yield {"url": url, "det": det_export, "seg": seg_export, "images": images, "root": root}
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def encoded(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def test_the_json_endpoint_answers_as_predict(server):
    status, exports = call(f"{server['url']}/api/exports")
    assert status == 200 and [e["task"] for e in exports] == ["detection", "segmentation"]
    student = load_student(server["det"])
    image = server["images"][0]
    status, got = call(f"{server['url']}/api/predict",
                       {"image": encoded(image), "names": NAMES, "threshold": 0.0})
    want = student.predict(image, names=NAMES, score_threshold=0.0)
    assert status == 200 and got["task"] == "detection"
    assert got["names"] == want["names"] and len(got["names"]) > 0
    np.testing.assert_allclose(got["scores"], want["scores"], atol=1e-4)
    np.testing.assert_allclose(got["boxes"], want["boxes"], atol=0.01)
    assert set(got["names"]) <= {"circle", "drop", "triangle"}
    seg = load_segmenter(server["seg"])
    status, got = call(f"{server['url']}/api/predict",
                       {"image": encoded(image), "names": ["sky", "bolt"], "export": 1,
                        "threshold": 0.0})
    want = seg.predict(image, names=["sky", "bolt"], threshold=0.0)
    assert status == 200 and got["names"] == ["sky", "bolt"] and got["novel"] == [False, True]
    np.testing.assert_array_equal(np.asarray(got["labels"]), want["labels"])


def test_twenty_requests_at_once_answer_as_one_at_a_time(server):
    requests = [{"image": encoded(server["images"][k % len(server["images"])]),
                 "names": [NAMES, "star|pentagram, drop", "circle"][k % 3],
                 "threshold": 0.0, "export": k % 2} for k in range(20)]
    alone = [call(f"{server['url']}/api/predict", r) for r in requests]
    with ThreadPoolExecutor(20) as pool:
        together = list(pool.map(lambda r: call(f"{server['url']}/api/predict", r), requests))
    assert all(status == 200 for status, _ in alone)
    assert together == alone


@pytest.mark.parametrize("body, error", [
    ({"image": base64.b64encode(b"not an image").decode()},
     "the upload is not an image (PNG, JPEG, ...)"),
    ({"image": "%%%"}, "'image' is not base64"),
    ({}, "the request has no 'image' (base64 of a PNG or JPEG)"),
    ({"names": " , "}, "the vocabulary: no class names"),
    ({"names": [f"name {k}" for k in range(MAX_NAMES + 1)]},
     f"{MAX_NAMES + 1} names: at most {MAX_NAMES} at once"),
    ({"export": 2}, "export 2: 2 served (0..1)"),
])
def test_bad_requests_get_one_line_and_the_server_goes_on(server, body, error):
    if "image" not in body and body:
        body = {"image": encoded(server["images"][0]), **body}
    assert call(f"{server['url']}/api/predict", body) == (400, {"error": error})
    status, _ = call(f"{server['url']}/api/predict", {"image": encoded(server["images"][0])})
    assert status == 200


def test_onnx_runtime_serves_what_it_predicts(server):
    """--onnx: model.onnx and text_encoder/text.onnx answer the endpoint."""
    from fastapi.testclient import TestClient

    from detectors.onnx import OnnxDetector
    from ovdistill.serve import Served, build_app

    if not (server["det"] / "model.onnx").is_file():
        pytest.skip("the served exports have no ONNX graphs")
    client = TestClient(build_app([Served.load(server["det"], onnx=True)]))
    image = server["images"][0]
    got = client.post("/api/predict", json={"image": encoded(image), "names": NAMES,
                                            "threshold": 0.0})
    want = OnnxDetector(server["det"]).predict(image, names=NAMES, score_threshold=0.0)
    assert got.status_code == 200 and got.json()["names"] == want["names"]
    np.testing.assert_allclose(got.json()["scores"], want["scores"], atol=1e-4)


def test_an_export_directory_that_is_not_one_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "tools.serve", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == (f"error: {tmp_path}: not an exported student directory "
                                   f"(no config.json)")


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # as root, on a closed network: no sandbox, no background connections
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1400,1300"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _rows(browser, k: int) -> list[list[str]]:
    from selenium.webdriver.common.by import By

    return [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
            for tr in browser.find_elements(By.CSS_SELECTOR, f"#found-{k} tr")[1:]]


def _ask(browser, image: Path, names: str, threshold: float) -> None:
    """Upload ``image``, type ``names`` and ``threshold``, press find, wait for the answer."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    clear = browser.find_elements(By.CSS_SELECTOR, "#image button[aria-label='Clear']")
    if clear:  # the last upload: gone before the next one
        clear[0].click()
    upload = WebDriverWait(browser, 30).until(
        lambda b: b.find_elements(By.CSS_SELECTOR, "#image input[type=file]"))
    upload[0].send_keys(str(Path(image).resolve()))
    box = browser.find_element(By.CSS_SELECTOR, "#names textarea")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(names)
    number = browser.find_element(By.CSS_SELECTOR, "#threshold input[type=number]")
    number.send_keys(Keys.CONTROL, "a")
    number.send_keys(f"{threshold:.3f}", Keys.TAB)
    WebDriverWait(browser, 30).until(
        lambda b: b.find_elements(By.CSS_SELECTOR, "#image .file-preview, #image table"))
    def answer(b) -> str | None:  # the number of the page's last answer (ovdistill/serve.py)
        found = b.find_elements(By.CSS_SELECTOR, "#error p[data-n]")
        return found[0].get_attribute("data-n") if found else None

    last = answer(browser)
    browser.find_element(By.CSS_SELECTOR, "#find").click()
    WebDriverWait(browser, 60).until(lambda b: answer(b) not in (None, last))


def _cut(scores) -> float:
    """A threshold on the slider's 0.001 steps keeping 1 to 4 boxes (or, where scores crowd,
    up to 8), none of whose scores lies within 0.0002 of it (runtimes differ by ~1e-6)."""
    s = np.asarray(scores, dtype=np.float64)
    for most in (4, 8):
        for t in np.round(np.arange(0.001, 1.0, 0.001), 3):  # the lowest: the most boxes
            if 1 <= (s >= t).sum() <= most and np.abs(s - t).min() > 0.0002:
                return float(t)
    raise AssertionError(f"no cut for scores {sorted(s)}")


@pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                    reason="Debian's chromium and chromium-driver are not installed "
                           "(.ci/run installs them)")
def test_the_page_in_a_headless_browser(server, tmp_path):
    from selenium.webdriver.common.by import By

    image = server["images"][0]
    student, seg = load_student(server["det"]), load_segmenter(server["seg"])
    cut = _cut(student.predict(image, names=NAMES, score_threshold=0.0)["scores"])
    want = student.predict(image, names=NAMES, score_threshold=cut)
    browser = _browser()
    try:
        browser.get(server["url"] + "/")
        _ask(browser, image, NAMES, cut)
        rows = _rows(browser, 0)
        assert [r[0].removesuffix(" *") for r in rows] == want["names"]
        np.testing.assert_allclose([float(r[1]) for r in rows], want["scores"], atol=0.0051)
        assert [r[0].endswith(" *") for r in rows] == want["novel"]
        # the segmenter beside it: the names it painted, by area, at the same cut
        painted = seg.predict(image, names=NAMES, threshold=cut)["present"]
        assert [r[0].removesuffix(" *") for r in _rows(browser, 1)] == painted
        assert browser.find_element(By.CSS_SELECTOR, "#error").text == ""
        shot = tmp_path / "serve.png"
        browser.save_screenshot(str(shot))
        if os.environ.get("OVD_SCREENSHOT"):  # the README's picture
            shutil.copyfile(shot, os.environ["OVD_SCREENSHOT"])
        # not an image: one line on the page; the next good request is answered
        text = tmp_path / "notes.png"
        text.write_text("not a picture")
        _ask(browser, text, NAMES, cut)
        assert browser.find_element(By.CSS_SELECTOR, "#error").text == \
            "error: the upload is not an image (PNG, JPEG, ...)"
        _ask(browser, image, "star", 0.0)
        assert browser.find_element(By.CSS_SELECTOR, "#error").text == ""
        assert {r[0] for r in _rows(browser, 0)} == {"star"}
    finally:
        browser.quit()
