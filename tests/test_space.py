"""The Gradio Space (space/app.py): a real browser, gradio_client, concurrency and limits.

The Space runs as a subprocess on 127.0.0.1 with a saved random model folder. The browser test
drives Debian's chromium (``/usr/bin/chromium``, installed by ``.ci/run``) through Playwright's
Python package (never ``playwright install``) and saves ``test-artifacts/space.png``.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, require_asset

gradio = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

CHROMIUM = os.environ.get("FEATDEID_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = REPO / "test-artifacts"
MAX_PIXELS = 4_000_000  # the test server's limits (set through the environment)
MAX_BYTES = 2 * 1024 * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def space_url(model_dir, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("space-log") / "space.log"
    env = {**os.environ, "FEATDEID_SPACE_MAX_PIXELS": str(MAX_PIXELS), "FEATDEID_SPACE_MAX_BYTES": str(MAX_BYTES),
           "GRADIO_TEMP_DIR": str(tmp_path_factory.mktemp("gradio-tmp"))}
    env.pop("FEATDEID_MODEL", None)
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, str(REPO / "space" / "app.py"), "--model", str(model_dir), "--port", str(port)],
                                stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the Space exited with {proc.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the Space did not start in 180 s:\n{log.read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def client(space_url):
    return gradio_client.Client(space_url, verbose=False)


def _expected(random_model, path: Path, seed: int | None = None, strength: float = 1.0) -> np.ndarray:
    """The same photo through the core in this process (the Space must not re-implement anything)."""
    import featdeid
    from featdeid import images

    out = featdeid.Deidentifier(random_model, detector="auto")(images.open_image(path), strength=strength, seed=seed)
    return np.asarray(images.bake_orientation(out).convert("RGB"))


def _assert_deidentified(out: np.ndarray, path: Path, report: dict | None = None) -> None:
    original = np.asarray(Image.open(path).convert("RGB"))
    assert out.shape == original.shape  # same size
    diff = np.abs(out.astype(int) - original.astype(int)).max(axis=2)
    assert diff[:5].max() == 0 and diff[-5:].max() == 0  # far from faces: untouched
    if report is not None:
        assert report["faces"] >= 2 and report["changed"] == report["faces"]
        for face in report["details"]:
            x0, y0, x1, y1 = (int(round(v)) for v in face["box"])
            assert diff[max(y0, 0):y1, max(x0, 0):x1].mean() > 1.0  # every face changed
            assert -1.0 <= face["cosine_dlib"] <= 1.0 and face["distance_dlib"] >= 0 and face["meaning"]


def test_space_front_matter():
    text = (REPO / "space" / "README.md").read_text()
    assert text.startswith("---\n")
    import yaml

    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py"
    assert meta["sdk_version"] == gradio.__version__
    assert str(meta["python_version"]).startswith("3.")
    assert isinstance(meta["models"], list) and meta["models"]
    reqs = (REPO / "space" / "requirements.txt").read_text()
    assert f"gradio=={gradio.__version__}" in reqs


def test_browser_group_photo(space_url, random_model):
    photo = require_asset("faces", "bbt40", "group_photos", "bbt4.jpg")
    if not Path(CHROMIUM).exists():
        msg = f"{CHROMIUM} missing: apt-get install -y --no-install-recommends chromium chromium-driver"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    sync_api = pytest.importorskip("playwright.sync_api")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1600})
            page.goto(space_url)
            page.wait_for_selector("#run", timeout=60_000)
            assert "Upload a photo of your own" in page.locator("#message").inner_text()  # empty state
            t0 = time.perf_counter()
            page.locator("#photo input[type=file]").set_input_files(str(photo))
            page.wait_for_selector("#photo img", timeout=60_000)
            page.click("#run")
            page.wait_for_selector("#result img", timeout=120_000)
            seconds = time.perf_counter() - t0
            print(f"\nSpace upload -> result for {photo.name}: {seconds:.2f} s")
            src = page.locator("#result img").get_attribute("src")
            message = page.locator("#message").inner_text()
            assert "6 faces found, 6 de-identified" in message
            assert page.locator("#scores").inner_text().count("changed") >= 6
            assert page.locator("#download").is_visible()
            page.screenshot(path=str(ARTIFACTS / "space.png"), full_page=True)
            with urllib.request.urlopen(src) as r:
                data = r.read()
            result = Image.open(io.BytesIO(data))
            assert result.format == "PNG"  # never a lossy re-encode
            out = np.asarray(result.convert("RGB"))
            _assert_deidentified(out, photo)
            # no seed given: derived from the pixels, so the core gives the same picture
            assert np.abs(out.astype(int) - _expected(random_model, photo).astype(int)).max() <= 2

            page.click("#new-identities")  # a random seed, new fake identities
            page.wait_for_function(
                "src => { const i = document.querySelector('#result img'); return i && i.src !== src; }", arg=src, timeout=120_000)
            assert page.locator("#seed textarea, #seed input").first.input_value().isdigit()
        finally:
            browser.close()


def test_client_api(client, random_model):
    photo = require_asset("faces", "bbt40", "group_photos", "bbt4.jpg")
    path, report = client.predict(gradio_client.handle_file(str(photo)), 1.0, 7, "auto", api_name="/deidentify")
    img = Image.open(path)
    assert img.format == "PNG" and img.size == Image.open(photo).size
    out = np.asarray(img.convert("RGB"))
    _assert_deidentified(out, photo, report)
    assert report["seed"] == 7 and report["strength"] == 1.0
    assert np.abs(out.astype(int) - _expected(random_model, photo, seed=7).astype(int)).max() <= 2


def test_client_concurrent_results_not_mixed(client):
    names = ["bbt2.jpg", "bbt3.jpg", "bbt4.jpg", "bbt5.jpg"]
    photos = [require_asset("faces", "bbt40", "group_photos", n) for n in names]
    args = [(gradio_client.handle_file(str(p)), 1.0, 100 + i, "auto") for i, p in enumerate(photos)]

    def load(path):
        return np.asarray(Image.open(path).convert("RGB"))

    sequential = [client.predict(*a, api_name="/deidentify") for a in args]
    jobs = [client.submit(*a, api_name="/deidentify") for a in args]  # all queued at once
    concurrent = [j.result(timeout=300) for j in jobs]
    for photo, (p1, r1), (p2, r2), i in zip(photos, sequential, concurrent, range(len(photos))):
        assert r2["seed"] == 100 + i and r1["faces"] == r2["faces"]
        assert [d["box"] for d in r1["details"]] == [d["box"] for d in r2["details"]]
        np.testing.assert_array_equal(load(p1), load(p2))
        assert load(p2).shape[:2] == Image.open(photo).size[::-1]


def test_client_no_face_and_limits(client, tmp_path):
    blank = tmp_path / "blank.png"
    Image.new("RGB", (320, 240), (120, 140, 160)).save(blank)
    path, report = client.predict(gradio_client.handle_file(str(blank)), 1.0, 0, "auto", api_name="/deidentify")
    assert report["faces"] == 0 and report["changed"] == 0
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(Image.open(blank)))

    huge = tmp_path / "huge.png"  # small file, too many pixels
    Image.new("L", (2100, 2000)).save(huge)
    with pytest.raises(Exception, match="megapixels"):
        client.predict(gradio_client.handle_file(str(huge)), 1.0, 0, "auto", api_name="/deidentify")

    heavy = tmp_path / "heavy.png"  # few pixels, too many bytes
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1000, 1000, 3), dtype=np.uint8)).save(heavy)
    assert heavy.stat().st_size > MAX_BYTES
    with pytest.raises(Exception):
        client.predict(gradio_client.handle_file(str(heavy)), 1.0, 0, "auto", api_name="/deidentify")


def test_space_refuses_to_start_without_model(tmp_path):
    env = {**os.environ}
    env.pop("FEATDEID_MODEL", None)
    r = subprocess.run([sys.executable, str(REPO / "space" / "app.py"), "--model", str(tmp_path / "nope"), "--port", "1"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "--model" in r.stderr


def _app_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("featdeid_space_app", REPO / "space" / "app.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_space_messages_and_seed():
    from featdeid.faces.detect import Face
    from featdeid.pipeline import FaceResult, Report

    app = _app_module()
    box = np.array([0.0, 0.0, 12.0, 12.0])
    faces = [FaceResult(Face(box * 8, np.zeros((5, 2))), "changed", 3), FaceResult(Face(box, np.zeros((5, 2))), "too_small")]
    text = app._summary(Report(faces, 0), [(0.5, 0.9), None], 1.0, None)
    assert "2 faces found, 1 de-identified" in text and "1 face was too small" in text and "not protected" in text
    assert "no longer matches **1 of 1**" in text
    assert app._meaning("too_small", None).startswith("NOT protected")
    assert app._meaning("changed", (0.9, 0.3)).startswith("still matched")
    assert app._meaning("changed", (0.5, 0.9)).startswith("not matched")
    assert "No faces found" in app._summary(Report([], 0), [], 1.0, None)
    assert app._parse_seed("") is None and app._parse_seed(None) is None and app._parse_seed(" 42 ") == 42
    assert app._parse_seed(7.0) == 7 and app._parse_seed("15631252117021116155") == 15631252117021116155
    for bad in ("abc", 1.5, -1):
        with pytest.raises(app.FeatdeidError):
            app._parse_seed(bad)
