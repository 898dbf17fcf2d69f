"""The real BentoML service on loopback: results, guard rails, budget, auth, docs, README.

One server for the module, started the way users start it (``mitoseg serve`` on a
``.keras`` file with its ``inference_plan.json`` beside it), serving a tiny UNet built in
the test with a small-tile plan so inference is quick on a shared CPU.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import tifffile
import yaml
from PIL import Image

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
VNC = REPO / "src" / "mitoseg" / "sample_data" / "vnc" / "test" / "images.tif"
CDEEP3M = REPO.parent / "shared" / "data" / "cdeep3m" / "cdeep3m_test_raw.tif"
MITOSEG = str(Path(sys.executable).with_name("mitoseg"))
TOKEN = "test-token-7f3a"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: Plan field of the test model: FLOP per pixel, for the compute budget.
FLOPS_PER_PIXEL = 1e4
SERVE = {
    "max_bytes": 4 * 1024 * 1024,
    "max_pixels": 2048 * 2048,
    "max_pages": 4,
    "max_side": 2048,
    "max_batch_size": 8,
    "max_request_gflop": 40,
    "max_inflight_gflop": 50,
    "retry_after_s": 3,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tiff_bytes(arr: np.ndarray, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tifffile.imwrite(buf, arr, **kwargs)
    return buf.getvalue()


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def vnc_slice(i: int = 0) -> np.ndarray:
    return tifffile.imread(VNC)[i]


class Server:
    def __init__(self, url: str, model: Any, plan: Any, proc: subprocess.Popen, log: Path):
        self.url, self.model, self.plan, self.proc, self.log = url, model, plan, proc, log

    def post(self, route: str, upload: bytes | None = None, **kwargs: Any) -> requests.Response:
        headers = {**AUTH, **kwargs.pop("headers", {})}
        files = {"image": ("upload.tif", upload)} if upload is not None else None
        files = kwargs.pop("files", files)
        return requests.post(self.url + route, files=files, headers=headers, timeout=120, **kwargs)

    def expected(self, stack: np.ndarray) -> np.ndarray:
        """In-process reference: the same segment_stack call, same plan."""
        from mitoseg.inference import mask_to_image, segment_stack

        return mask_to_image(segment_stack(self.model, stack, self.plan), 2)

    def log_text(self, start: int = 0) -> str:
        return self.log.read_bytes()[start:].decode("utf-8", errors="replace")


def _write_model(tmp: Path) -> tuple[Any, Any]:
    """A tiny untrained UNet and its plan (64-pixel tiles) beside it as
    ``inference_plan.json``; threshold at the median foreground probability of a real
    slice so the masks compared below are far from trivial."""
    import keras

    from mitoseg.config import ModelConfig
    from mitoseg.inference import iter_stack_probabilities
    from mitoseg.model.unet import build_unet
    from mitoseg.plan import PLAN_FILE, InferencePlan

    keras.utils.set_random_seed(7)
    model = build_unet(
        ModelConfig(depth=2, base_filters=4, batch_norm=False, dropout=0.0), n_classes=2
    )
    model.save(tmp / "tiny.keras")
    plan = InferencePlan.default_for(
        1, 4, tile_size=64, halo=8, batch_size=4, min_object_size=5,
        flops_per_pixel=FLOPS_PER_PIXEL,
    )  # fmt: skip
    probs = next(iter_stack_probabilities(model, vnc_slice(0), plan))
    plan = plan.with_overrides(threshold=round(float(np.median(probs)), 6))
    plan.write(tmp / PLAN_FILE)
    return model, plan


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if requests.get(url + "/readyz", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"server not ready in {timeout} s:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("serve")
    model, plan = _write_model(tmp)
    (tmp / "params.yaml").write_text(yaml.safe_dump({"serve": SERVE}))
    port = free_port()
    env = {
        **os.environ,
        "BENTOML_HOME": str(tmp / "bentoml"),
        "MITOSEG_API_TOKEN": TOKEN,
        "BENTOML_DO_NOT_TRACK": "True",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    log = tmp / "server.log"
    cmd = [MITOSEG, "serve", "--model", str(tmp / "tiny.keras"), "--port", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*cmd, "--params", str(tmp / "params.yaml")],
            cwd=tmp,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, log)
        yield Server(url, model, plan, proc, log)
    finally:
        proc.send_signal(signal.SIGTERM)  # mitoseg serve stops everything it started
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------- results


DECLARED_TYPES = ["application/octet-stream", "image/tif", "image/tiff", "image/png", None]


@pytest.mark.parametrize("kind", ["tiff", "png"])
def test_tiff_and_png_are_accepted_whatever_type_is_declared(server: Server, kind: str) -> None:
    img = vnc_slice(0)[:160, :224]
    expected = server.expected(img)[0]
    data = tiff_bytes(img) if kind == "tiff" else png_bytes(img)
    for declared in DECLARED_TYPES:
        part = ("slice." + kind, data) if declared is None else ("slice", data, declared)
        r = server.post("/segment", files={"image": part})
        assert r.status_code == 200, (declared, r.text)
        assert r.headers["content-type"] == "image/png"
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r.content))), expected)


def test_segment_png_and_tiff_equal_in_process(server: Server) -> None:
    img = vnc_slice(0)  # (512, 768) uint8 real EM
    expected = server.expected(img)[0]
    r = server.post("/segment", tiff_bytes(img))
    assert r.status_code == 200, r.text
    got = np.asarray(Image.open(io.BytesIO(r.content)))
    assert got.dtype == np.uint8 and got.shape == img.shape
    np.testing.assert_array_equal(got, expected)
    assert 0 < (got == 255).mean() < 1  # a real, non-trivial mask
    r = server.post("/segment", tiff_bytes(img), data={"format": "tiff"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/tiff"
    np.testing.assert_array_equal(tifffile.imread(io.BytesIO(r.content)), expected)


def test_segment_16bit_png_and_rgb_give_same_normalised_result(server: Server) -> None:
    img = vnc_slice(1)[:200, :300]
    expected = server.expected(img)[0]
    r = server.post("/segment", png_bytes(img.astype(np.uint16) * 257))
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r.content))), expected)
    r = server.post("/segment", tiff_bytes(np.dstack([img] * 3), photometric="rgb"))
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r.content))), expected)


def test_blank_upload_gives_an_empty_mask(server: Server) -> None:
    blank = np.zeros((300, 200), np.uint8)
    r = server.post("/segment", tiff_bytes(blank, compression="zlib"))
    assert r.status_code == 200, r.text
    mask = np.asarray(Image.open(io.BytesIO(r.content)))
    assert mask.shape == blank.shape and not mask.any()
    r = server.post("/stats", png_bytes(np.full((64, 64), 77, np.uint8)))
    assert r.status_code == 200, r.text
    assert (r.json()["count"], r.json()["area_fraction"]) == (0, 0.0)


def test_cdeep3m_slice(server: Server) -> None:
    if not CDEEP3M.is_file():
        pytest.skip(f"real CDeep3M data not present at {CDEEP3M} (a fresh clone has no ../shared)")
    img = tifffile.imread(CDEEP3M, key=0)[:512, :512]
    r = server.post("/segment", tiff_bytes(img))
    assert r.status_code == 200, r.text
    got = np.asarray(Image.open(io.BytesIO(r.content)))
    np.testing.assert_array_equal(got, server.expected(img)[0])


def test_segment_stack_and_stats(server: Server) -> None:
    from mitoseg.serving.analysis import mask_stats

    stack = tifffile.imread(VNC)[:2, :256, :320]
    expected = server.expected(stack)
    r = server.post("/segment_stack", tiff_bytes(stack, photometric="minisblack"))
    assert r.status_code == 200, r.text
    got = tifffile.imread(io.BytesIO(r.content))
    assert got.shape == stack.shape
    np.testing.assert_array_equal(got, expected)

    r = server.post("/stats", tiff_bytes(stack[0]))
    assert r.status_code == 200, r.text
    stats = r.json()
    vs = server.plan.voxel_size_nm
    ref = mask_stats(
        (expected[0] == 255).astype(np.uint8),
        1,
        server.plan.min_object_size,
        image=stack[0],
        pixel_size_nm=None if vs is None else (vs[1], vs[2]),
    )
    assert stats["class"] == "mitochondria"
    assert stats["min_object_size"] == server.plan.min_object_size
    assert stats["count"] == ref["count"] > 0
    assert stats["area_fraction"] == pytest.approx(ref["area_fraction"])
    assert stats["objects"][0] == ref["objects"][0]
    assert stats["objects"][0]["mean_intensity"] > 0

    r = server.post("/stats", tiff_bytes(stack[0]), data={"pixel_size_nm": "4.6"})
    assert r.status_code == 200, r.text
    first = r.json()["objects"][0]
    assert r.json()["pixel_size_nm"] == [4.6, 4.6]
    assert first["area_nm2"] == pytest.approx(first["area"] * 4.6 * 4.6)
    r = server.post("/stats", tiff_bytes(stack[0]), data={"pixel_size_nm": "-1"})
    assert r.status_code == 400 and r.json()["error"] == "bad_pixel_size", r.text


def test_metadata_reports_lineage_plan_and_limits(server: Server) -> None:
    from mitoseg.config import ServeConfig

    r = server.post("/metadata")
    assert r.status_code == 200, r.text
    meta = r.json()
    assert meta["bento_model"].startswith("mitoseg-unet:")
    assert meta["threshold"] == server.plan.threshold
    assert (meta["n_classes"], meta["class_names"]) == (2, ["background", "mitochondria"])
    assert meta["plan"] == server.plan.model_dump(mode="json")
    assert meta["serve"] == ServeConfig(**SERVE).model_dump()  # from params.yaml serve:
    assert meta["source_uri"].endswith("tiny.keras")
    for key in ("name", "version", "alias", "run_id", "git_commit", "data_hash", "metrics"):
        assert key in meta


def test_concurrent_requests_share_forward_passes(server: Server) -> None:
    images = [vnc_slice(i)[:256, :384] for i in range(4)]
    expected = [server.expected(img)[0] for img in images]
    uploads = [tiff_bytes(img) for img in images]
    with concurrent.futures.ThreadPoolExecutor(len(uploads)) as pool:
        responses = list(pool.map(lambda data: server.post("/segment", data), uploads))
    for r, exp in zip(responses, expected, strict=True):
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r.content))), exp)
    metrics = requests.get(server.url + "/metrics", headers=AUTH, timeout=30).text

    def sample(name: str) -> float:
        match = re.search(rf"^{re.escape(name)} (\S+)$", metrics, re.MULTILINE)
        assert match, f"{name} not in /metrics"
        return float(match.group(1))

    passes = sample("mitoseg_batch_requests_count")
    alone = sample('mitoseg_batch_requests_bucket{le="1.0"}')
    assert passes > alone, "no forward pass held tiles of more than one request"
    assert sample('mitoseg_batch_tiles_bucket{le="8.0"}') == sample("mitoseg_batch_tiles_count")


# ----------------------------------------------------------------- compute budget


def _too_costly(shape: tuple[int, int, int]) -> str:
    z, h, w = shape
    gflop = z * h * w * FLOPS_PER_PIXEL / 1e9
    return (
        f"the request needs {gflop:.4g} GFLOP ({z} x {h} x {w} pixels x 10000 FLOP/pixel); "
        "the limit per request is 40 GFLOP (serve.max_request_gflop): send fewer or smaller "
        "images"
    )


@pytest.mark.parametrize(
    ("route", "shape"),
    [
        ("/segment", (1, 2048, 2048)),
        ("/stats", (1, 2048, 2000)),
        ("/segment_stack", (3, 1500, 900)),
    ],
    ids=["segment", "stats", "segment_stack"],
)
def test_a_request_over_the_compute_limit_gets_413(
    server: Server, route: str, shape: tuple[int, int, int]
) -> None:
    # A few KB of zlib zeros that would cost minutes: refused before decoding.
    data = tiff_bytes(np.zeros(shape if shape[0] > 1 else shape[1:], np.uint8), compression="zlib")
    assert len(data) < 100_000
    r = server.post(route, data)
    assert r.status_code == 413, r.text
    assert r.json() == {"error": "too_costly", "message": _too_costly(shape), "status": 413}


def test_requests_over_the_in_flight_budget_get_429_with_retry_after(server: Server) -> None:
    rng = np.random.default_rng(0)
    heavy = rng.integers(0, 256, (3, 1024, 1024), dtype=np.uint8)  # 31.46 GFLOP, seconds
    light = tiff_bytes(np.zeros((2048, 1024), np.uint8), compression="zlib")  # 20.97, blank
    outcome: dict[str, requests.Response] = {}
    thread = threading.Thread(
        target=lambda: outcome.setdefault(
            "heavy", server.post("/segment_stack", tiff_bytes(heavy, photometric="minisblack"))
        )
    )
    thread.start()
    time.sleep(0.5)  # the heavy request is admitted (its upload takes milliseconds)
    refused = None
    while thread.is_alive() and refused is None:
        r = server.post("/segment", light)
        if r.status_code == 429:
            refused = r
        else:
            assert r.status_code == 200, r.text
            time.sleep(0.05)
    thread.join(120)
    assert outcome["heavy"].status_code == 200, outcome["heavy"].text
    assert refused is not None, "the heavy request finished before a second one was refused"
    assert refused.headers["retry-after"] == "3"
    assert refused.json() == {
        "error": "busy",
        "message": "the server is busy: 31.46 GFLOP in flight, this request needs 20.97 GFLOP "
        "and the limit is 50 GFLOP (serve.max_inflight_gflop); retry after 3 s",
        "status": 429,
    }
    r = server.post("/segment", light)  # the budget is free again
    assert r.status_code == 200 and not np.asarray(Image.open(io.BytesIO(r.content))).any()


# ----------------------------------------------------------------- bad input


def _malformed_corpus() -> list[tuple[str, bytes, int, str]]:
    img = vnc_slice(0)[:64, :64]
    plain = tiff_bytes(img)
    nan = np.ones((16, 16), np.float32)
    nan[2, 2] = np.nan
    buf = io.BytesIO(tiff_bytes(np.zeros((16, 16), np.uint8)))
    with tifffile.TiffFile(buf, mode="r+") as tif:
        tif.pages[0].tags["ImageWidth"].overwrite(100_000)
        tif.pages[0].tags["ImageLength"].overwrite(100_000)
    return [
        ("/segment", b"", 400, "the uploaded file is empty (0 bytes)"),
        ("/segment", b"not an image at all", 415, "the upload is not a TIFF or PNG image"),
        ("/segment", b"GIF89a\x01\x00\x01\x00", 415, "the upload is not a TIFF or PNG image"),
        ("/segment", plain[: len(plain) // 2], 400, "page 0: cannot decode the pixel data"),
        ("/segment", b"II*\x00garbage", 400, "the TIFF contains no pages"),
        ("/segment", tiff_bytes(np.zeros((0, 4), np.uint8)), 400, "the image has zero size"),
        ("/segment", tiff_bytes(np.zeros((8, 8))), 422, "pixel type float64 is not supported"),
        ("/segment", tiff_bytes(np.zeros((8, 8), np.complex64)), 422, "pixel type complex64"),
        ("/segment", tiff_bytes(np.zeros((8, 8), np.int32)), 422, "pixel type int32"),
        ("/segment", tiff_bytes(nan), 422, "the image contains NaN or infinite values"),
        ("/stats", buf.getvalue(), 413, "100000x100000 pixels exceeds the side limit of 2048"),
        (
            "/segment",
            tiff_bytes(np.stack([img, img]), photometric="minisblack"),
            422,
            "use /segment_stack for stacks",
        ),
        (
            "/segment_stack",
            tiff_bytes(np.stack([img] * 5), photometric="minisblack"),
            413,
            "the TIFF has 5 pages; at most 4 accepted here",
        ),
    ]


def _framework_errors(server: Server) -> list[tuple[requests.Response, int, str, str]]:
    """Requests the framework or the middleware refuses: (response, status, code, message)."""
    small = tiff_bytes(vnc_slice(0)[:32, :32])
    post = server.post
    return [
        (
            post("/segment", None, data={"format": "png"}),  # urlencoded, no file
            415,
            "unsupported_media_type",
            "send the image as a multipart/form-data file field named 'image' "
            "(got content-type 'application/x-www-form-urlencoded')",
        ),
        (
            post("/segment", None, files={"format": (None, "png")}),
            400,
            "missing_image",
            "the form has no file field named 'image'; send the image as a multipart/form-data "
            "file field named 'image'",
        ),
        (
            post("/segment", None, files={"image": (None, "http://169.254.169.254/x.tif")}),
            400,
            "image_not_a_file",
            "the 'image' field is a text value, not a file: upload the image bytes as a file "
            "part (the server does not fetch URLs)",
        ),
        (
            post("/segment", small, data={"format": "jpeg"}),
            400,
            "invalid_request",
            "format: Input should be 'png' or 'tiff'",
        ),
        (
            requests.post(server.url + "/segment", json={"image": "x"}, headers=AUTH, timeout=30),
            415,
            "unsupported_media_type",
            "send the image as a multipart/form-data file field named 'image' "
            "(got content-type 'application/json')",
        ),
        (
            post("/segment", b"II*\x00" + b"\x00" * (SERVE["max_bytes"] + 2 * 1024 * 1024)),
            413,
            "too_large",
            None,
        ),
        (
            requests.get(server.url + "/nowhere", headers=AUTH, timeout=30),
            404,
            "not_found",
            "Not Found",
        ),
    ]


def test_malformed_inputs_get_json_4xx_and_server_stays_up(server: Server) -> None:
    for route, data, status, message in _malformed_corpus():
        r = server.post(route, data)
        assert r.status_code == status, (route, message, r.status_code, r.text)
        body = r.json()
        assert set(body) == {"error", "message", "status"}
        assert message in body["message"], body
        assert body["status"] == status
    for r, status, code, message in _framework_errors(server):
        assert r.status_code == status, r.text
        body = r.json()
        assert (body["error"], body["status"]) == (code, status), body
        if message is not None:
            assert body["message"] == message
    r = server.post(
        "/segment",
        None,
        data=b"--b\r\nbroken",
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )
    # python-multipart reads this truncated body as an empty form
    assert r.status_code == 400 and r.json()["error"] == "missing_image", r.text
    # still serving
    assert requests.get(server.url + "/readyz", timeout=5).status_code == 200
    assert server.post("/segment", tiff_bytes(vnc_slice(0)[:64, :64])).status_code == 200
    assert server.proc.poll() is None


def test_client_errors_are_logged_as_one_warning_line(server: Server) -> None:
    start = len(server.log.read_bytes())
    markers = [f"Zq{i}mark".encode() for i in range(3)]  # 8 bytes: quoted in the message
    for marker in markers:
        assert server.post("/segment", marker + b" not an image").status_code == 415
    refused = [r for r, *_ in _framework_errors(server)]
    assert all(400 <= r.status_code < 500 for r in refused)
    time.sleep(0.5)  # let the worker flush its log
    log = server.log_text(start)
    for marker in markers:
        lines = [line for line in log.splitlines() if marker.decode() in line]
        assert len(lines) == 1, lines
        assert "[WARNING]" in lines[0] and "POST /segment -> 415 unsupported_format" in lines[0]
    for text in ("-> 400 invalid_request: format: Input should be", "-> 400 missing_image"):
        assert sum(text in line for line in log.splitlines()) == 1, text
    assert "Traceback" not in log
    assert "[ERROR]" not in log


# ----------------------------------------------------------------- auth, docs, README


def test_auth(server: Server) -> None:
    data = tiff_bytes(vnc_slice(0)[:32, :32])
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        r = requests.post(
            server.url + "/segment", files={"image": ("a.tif", data)}, headers=headers, timeout=30
        )
        assert r.status_code == 401
        assert r.json() == {
            "error": "unauthorized",
            "message": "missing or invalid bearer token",
            "status": 401,
        }
    assert requests.post(server.url + "/metadata", timeout=30).status_code == 401
    for path in ("/readyz", "/livez", "/docs.json", "/docs", "/"):
        assert requests.get(server.url + path, timeout=30).status_code == 200, path
    spec = requests.get(server.url + "/docs.json", timeout=30).json()
    assert {"/segment", "/segment_stack", "/stats", "/metadata"} <= set(spec["paths"])
    assert TOKEN.encode() not in server.log.read_bytes()


def test_docs_serves_the_openapi_page(server: Server) -> None:
    r = requests.get(server.url + "/docs", timeout=30)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "swagger-ui" in r.text
    assert r.text == requests.get(server.url + "/", timeout=30).text
    for asset in re.findall(r'(?:src|href)="\./(static_content/[^"]+)"', r.text):
        # relative links resolve from /docs to /static_content/...
        assert requests.get(f"{server.url}/{asset}", timeout=30).status_code == 200, asset


def _readme_snippets() -> dict[str, str]:
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Serving\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(bash|python)\n(.*?)```", section, re.DOTALL)
    found = {lang: code for lang, code in blocks}
    assert set(found) == {"bash", "python"}, "README Serving needs one bash and one python block"
    return found


@pytest.mark.parametrize("lang", ["bash", "python"])
def test_readme_examples_run(server: Server, lang: str, tmp_path: Path) -> None:
    img = vnc_slice(2)[:192, :256]
    tifffile.imwrite(tmp_path / "slice.tif", img)
    Image.fromarray(img).save(tmp_path / "slice.png")
    code = _readme_snippets()[lang]
    assert "http://127.0.0.1:3000" in code
    code = code.replace("http://127.0.0.1:3000", server.url)
    cmd = (
        ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
    )
    if lang == "bash" and shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    env = {**os.environ, "MITOSEG_API_TOKEN": TOKEN}
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    expected = server.expected(img)[0]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "mask.png")), expected)
    if lang == "bash":
        np.testing.assert_array_equal(tifffile.imread(tmp_path / "mask.tif"), expected)
    last = res.stdout.strip().splitlines()[-1]
    if lang == "bash":  # curl prints the /stats JSON
        count, fraction = json.loads(last)["count"], json.loads(last)["area_fraction"]
    else:  # print(stats["count"], stats["area_fraction"])
        count, fraction = int(last.split()[0]), float(last.split()[1])
    ref = server.post("/stats", tiff_bytes(img)).json()
    assert (count, fraction) == (ref["count"], pytest.approx(ref["area_fraction"]))


def test_schemathesis_no_server_errors(server: Server) -> None:
    st = Path(sys.executable).with_name("st")
    if not st.exists():
        pytest.skip(f"schemathesis CLI not installed next to {sys.executable}")
    cmd = [str(st), "run", server.url + "/docs.json", "--checks", "not_a_server_error"]
    cmd += ["--max-examples", "8", "-H", f"Authorization: Bearer {TOKEN}", "--no-color"]
    cmd += ["--request-timeout", "60", "--phases", "examples,coverage,fuzzing"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-12000:] + res.stderr[-2000:]
    assert requests.get(server.url + "/readyz", timeout=5).status_code == 200
