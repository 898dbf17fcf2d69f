"""The web page on the endpoint, in a real headless Chromium against a real ``mitoseg serve``.

The server is the session's shared ``mitoseg_server`` (``tests/servers.py``: ``mitoseg
serve`` of a tiny UNet with its inference plan, an API token set), the API tests' one.
Chromium and chromedriver are the Debian packages (``apt-get install -y chromium
chromium-driver``); the tests that need them skip, saying so, when they are absent. The
napari widget's endpoint client runs against the same server.

``MITOSEG_DOCS_SCREENSHOT=docs/web_page.png`` with ``MITOSEG_WEB_MODEL`` = a trained
``.keras`` (its ``inference_plan.json`` beside it) writes the README screenshot.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import tifffile
from PIL import Image

from servers import TOKEN, VNC, Server

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "src" / "mitoseg" / "serving" / "web" / "sample.png"


def tiff_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, photometric="minisblack")
    return buf.getvalue()


@pytest.fixture()
def server(mitoseg_server: Server) -> Server:
    """The shared endpoint (``servers.mitoseg_server``), the API tests' server too."""
    return mitoseg_server


# ----------------------------------------------------------------- routes


def test_page_and_sample_are_served_without_a_token(server: Server) -> None:
    r = requests.get(server.url + "/ui", timeout=30)  # redirected to /ui/
    assert r.status_code == 200, r.text
    assert r.url.endswith("/ui/")
    assert r.headers["content-type"].startswith("text/html")
    assert 'id="opacity"' in r.text and 'id="file"' in r.text
    r = requests.get(server.url + "/ui/sample.png", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == SAMPLE.read_bytes()
    r = requests.post(server.url + "/stats", files={"image": ("a.png", SAMPLE.read_bytes())})
    assert r.status_code == 401  # the API itself still needs the token


def test_preview_is_the_normalised_first_page(server: Server) -> None:
    from mitoseg.inference.normalize import normalize_slice

    img = tifffile.imread(VNC)[3, :200, :300].astype(np.uint16) * 200  # 16-bit upload
    r = server.post("/preview", tiff_bytes(img))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    got = np.asarray(Image.open(io.BytesIO(r.content)))
    assert got.dtype == np.uint8 and got.shape == img.shape
    np.testing.assert_array_equal(got, np.rint(normalize_slice(img) * 255).astype(np.uint8))


@pytest.mark.parametrize(
    ("upload", "status", "code", "message"),
    [
        (b"", 400, "bad_request", "the uploaded file is empty (0 bytes)"),
        (b"GIF89a\x01\x00", 415, "unsupported_media_type", "the upload is not a TIFF or PNG"),
    ],
    ids=["empty", "gif"],
)
def test_preview_errors(
    server: Server, upload: bytes, status: int, code: str, message: str
) -> None:
    r = server.post("/preview", upload)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["status"] == status and message in body["message"]


def test_napari_widget_client_against_the_endpoint(server: Server) -> None:
    from mitoseg.inference.objects import instance_labels
    from mitoseg.napari._segment import mask_layers, segment_remote

    stack = tifffile.imread(VNC)[:2, :160, :224]
    classes, meta = segment_remote(stack, server.url + "/", token=TOKEN)
    np.testing.assert_array_equal(classes * 255, server.expected(stack))
    assert meta["class_names"] == ["background", "mitochondria"]
    (_, mkw, _), (inst, ikw, _) = mask_layers(
        classes, meta["class_names"], meta["plan"]["min_object_size"], (50, 4, 4), "em"
    )
    ref, n = instance_labels(classes == 1, server.plan.min_object_size)
    np.testing.assert_array_equal(inst, ref)
    assert inst.dtype == np.uint32 and ikw["metadata"]["n_objects"] == n
    assert (mkw["name"], ikw["name"], mkw["scale"]) == ("em mask", "em instances", (50, 4, 4))
    with pytest.raises(RuntimeError, match=r"/metadata: HTTP 401"):
        segment_remote(stack, server.url, token="wrong")


# ----------------------------------------------------------------- Chromium


def _chromium() -> tuple[str, str]:
    browser = next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p),
        None,
    )
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip(
            "Chromium or chromedriver not found: apt-get install -y chromium chromium-driver"
        )
    pytest.importorskip("selenium", reason="selenium is not installed (dev extra)")
    return browser, driver


@pytest.fixture()
def browser(tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as ChromeService

    binary, driver_path = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'chrome'}",
    ):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=ChromeService(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _wait_done(driver: Any, timeout: float = 240) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(
        lambda d: (
            d.find_element("tag name", "body").get_attribute("data-state") in ("done", "error")
        )
    )
    state = driver.find_element("tag name", "body").get_attribute("data-state")
    assert state == "done", driver.find_element("id", "status").text


def _magenta_fraction(png: bytes) -> tuple[float, np.ndarray]:
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    magenta = (rgb[..., 0] - rgb[..., 1] > 60) & (rgb[..., 2] - rgb[..., 1] > 60)
    return float(magenta.mean()), rgb


def _blob(driver: Any, element_id: str) -> bytes:
    script = """
        const done = arguments[arguments.length - 1];
        fetch(document.getElementById(arguments[0]).href).then(r => r.blob()).then(b => {
          const fr = new FileReader();
          fr.onload = () => done(fr.result.split(",")[1]);
          fr.readAsDataURL(b);
        });
    """
    return base64.b64decode(driver.execute_async_script(script, element_id))


def test_upload_a_real_em_slice_shows_overlay_count_and_table(
    server: Server, browser: Any, tmp_path: Path
) -> None:
    img = tifffile.imread(VNC)[4]  # (512, 768) uint8, a real EM slice
    upload = tmp_path / "vnc_slice.tif"
    tifffile.imwrite(upload, img)
    stats = server.post("/stats", upload.read_bytes()).json()
    assert stats["count"] > 0

    browser.set_script_timeout(60)
    browser.get(server.url + "/ui")
    browser.find_element("id", "token").send_keys(TOKEN)
    browser.find_element("id", "file").send_keys(str(upload))
    _wait_done(browser)

    assert browser.find_element("id", "count").text == str(stats["count"])
    rows = browser.find_elements("css selector", "#objects tbody tr")
    assert len(rows) == stats["count"]
    first = [c.text for c in rows[0].find_elements("tag name", "td")]
    assert first[0] == str(stats["objects"][0]["id"])
    assert str(stats["objects"][0]["area"]) in first
    size = browser.execute_script(
        "const c = document.getElementById('overlay'); return [c.height, c.width];"
    )
    assert size == list(img.shape)

    # The download is the service's mask for this upload.
    mask = np.asarray(Image.open(io.BytesIO(_blob(browser, "download"))))
    np.testing.assert_array_equal(mask, server.expected(img)[0])

    shot = browser.get_screenshot_as_png()
    (tmp_path / "web_page.png").write_bytes(shot)
    fraction, rgb = _magenta_fraction(shot)
    assert rgb.std() > 20, "the screenshot is blank"
    assert fraction > 0.01, f"the overlay covers only {fraction:.4f} of the screenshot"
    docs = os.environ.get("MITOSEG_DOCS_SCREENSHOT")
    if docs:
        (REPO / docs).write_bytes(shot)

    # The opacity slider fades the overlay out.
    browser.execute_script(
        "const s = document.getElementById('opacity'); s.value = 0;"
        "s.dispatchEvent(new Event('input'));"
    )
    assert browser.find_element("id", "overlay").value_of_css_property("opacity") == "0"
    faded, _ = _magenta_fraction(browser.get_screenshot_as_png())
    assert faded < fraction / 10


def test_the_sample_button(server: Server, browser: Any) -> None:
    stats = server.post("/stats", files={"image": ("sample.png", SAMPLE.read_bytes())}).json()
    browser.get(server.url + "/ui/")
    browser.find_element("id", "token").send_keys(TOKEN)
    browser.find_element("id", "sample").click()
    _wait_done(browser)
    assert browser.find_element("id", "count").text == str(stats["count"])
    assert "sample.png" in browser.find_element("id", "status").text


def test_errors_are_shown_on_the_page(server: Server, browser: Any, tmp_path: Path) -> None:
    bad = tmp_path / "notes.tif"
    bad.write_bytes(b"not an image at all")
    browser.get(server.url + "/ui/")
    browser.find_element("id", "token").send_keys(TOKEN)
    browser.find_element("id", "file").send_keys(str(bad))
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 60).until(
        lambda d: d.find_element("tag name", "body").get_attribute("data-state") == "error"
    )
    status = browser.find_element("id", "status")
    assert "the upload is not a TIFF or PNG image" in status.text
    assert status.get_attribute("class") == "error"
