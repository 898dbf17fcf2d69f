"""The real BentoML service on loopback: results, guard rails, budget, auth, docs, the
examples of docs/SERVING.md, and volume jobs from the endpoint.

The server is the session's shared ``mitoseg_server`` (``tests/servers.py``): started the
way users start it (``mitoseg serve`` on a ``.keras`` file with its
``inference_plan.json`` beside it), serving a tiny UNet with a small-tile plan so
inference is quick on a shared CPU.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import tifffile
from PIL import Image

from encoded import png_bytes, tiff_bytes
from servers import AUTH, FLOPS_PER_PIXEL, SERVE, TOKEN, VNC, Server, vnc_slice

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CDEEP3M = REPO.parent / "shared" / "data" / "cdeep3m" / "cdeep3m_test_raw.tif"


@pytest.fixture()
def server(mitoseg_server: Server) -> Server:
    """The shared endpoint (``servers.mitoseg_server``)."""
    return mitoseg_server


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
    hyper = np.zeros((2, 2, 2, 32, 32), np.uint8)
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
        (  # an ImageJ hyperstack is not flattened into 8 slices
            "/segment_stack",
            tiff_bytes(hyper, imagej=True, metadata={"axes": "TZCYX"}),
            422,
            "axis T (time) has 2 entries; only a (Z, Y, X) stack is segmented",
        ),
        (
            "/segment_stack",
            tiff_bytes(hyper),
            422,
            "axes QQQYX (shape 2 x 2 x 2 x 32 x 32): more than one axis besides Y and X",
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


# ----------------------------------------------------- auth, docs, the serving page


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


def _serving_examples() -> dict[str, str]:
    """The bash and python blocks of the serving page's Examples (docs/SERVING.md)."""
    text = (REPO / "docs" / "SERVING.md").read_text()
    section = text.split("\n## Examples\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(bash|python)\n(.*?)```", section, re.DOTALL)
    found = {lang: code for lang, code in blocks}
    assert set(found) == {"bash", "python"}, "SERVING.md Examples: one bash, one python block"
    return found


@pytest.mark.parametrize("lang", ["bash", "python"])
def test_serving_page_examples_run(server: Server, lang: str, tmp_path: Path) -> None:
    img = vnc_slice(2)[:192, :256]
    tifffile.imwrite(tmp_path / "slice.tif", img)
    Image.fromarray(img).save(tmp_path / "slice.png")
    code = _serving_examples()[lang]
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


# ----------------------------------------------------------------- volume jobs


VOXEL = (50.0, 4.6, 4.6)


def _submit(server: Server, headers: dict | None = None, **body: Any) -> requests.Response:
    return requests.post(
        server.url + "/segment_volume/submit",
        json=body,
        headers=AUTH if headers is None else headers,
        timeout=120,
    )


def _task(server: Server, op: str, task_id: str) -> requests.Response:
    return requests.get(
        f"{server.url}/segment_volume/{op}", params={"task_id": task_id}, headers=AUTH, timeout=60
    )


def _wait(server: Server, task_id: str, timeout: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        r = _task(server, "status", task_id)
        assert r.status_code == 200, r.text
        if r.json()["status"] not in ("in_progress", "pending"):
            return r.json()
        assert time.monotonic() < deadline, f"task {task_id} still running after {timeout} s"
        time.sleep(0.5)


def _progress(server: Server, output_uri: str) -> dict[str, Any]:
    r = server.post("/volume_progress", json={"output_uri": output_uri})
    assert r.status_code == 200, r.text
    return r.json()


def test_volume_job_from_the_endpoint_equals_mitoseg_predict(
    server: Server, tmp_path: Path
) -> None:
    """A real EM crop as OME-Zarr with small odd chunks, segmented by a task on the
    server (whole slices, then YX tiles), equals ``mitoseg predict`` on the TIFF."""
    from typer.testing import CliRunner

    from mitoseg.cli import app
    from mitoseg.io import write_stack
    from mitoseg.volume.store import open_volume
    from volumes import write_ome_zarr

    crop = tifffile.imread(VNC)[:5, 100:260, 150:330]  # (5, 160, 180) uint8 real EM
    src = write_ome_zarr(server.volumes / "crop.ome.zarr", crop, VOXEL, chunks=(2, 37, 41))
    write_stack(tmp_path / "crop.tif", crop, VOXEL)
    ref = CliRunner().invoke(
        app, ["--no-progress", "predict", "--model", str(server.model_path),
              str(tmp_path / "crop.tif"), "--out", str(tmp_path / "ref"), "--instances"],
    )  # fmt: skip
    assert ref.exit_code == 0, ref.output
    mask = tifffile.imread(tmp_path / "ref" / "crop_mask.tif") != 0
    assert 0.05 < mask.mean() < 0.95
    instances = tifffile.imread(tmp_path / "ref" / "crop_instances.tif")
    for name, extra in (("whole", {}), ("tiles", {"block_yx": 64})):
        out = str(server.volumes / f"crop_{name}.ome.zarr")
        assert _progress(server, out)["status"] == "absent"
        r = _submit(server, input_uri=src, output_uri=out, block_z=2, **extra)
        assert r.status_code == 200, r.text
        task = r.json()
        assert task["status"] == "in_progress" and task["task_id"]
        status = _wait(server, task["task_id"])
        result = _task(server, "get", task["task_id"])
        assert status["status"] == "completed", result.text
        summary = result.json()
        blocks = 3 if name == "whole" else 3 * 3 * 3
        assert (summary["output_uri"], summary["blocks"]) == (out, blocks)
        assert _progress(server, out) == {
            "output_uri": out, "status": "complete", "blocks_done": blocks,
            "blocks_total": blocks, "fraction": 1.0,
        }  # fmt: skip
        got = open_volume(f"{out}/labels/mask")
        np.testing.assert_array_equal(got.read(0, 5) != 0, mask)
        np.testing.assert_array_equal(open_volume(f"{out}/labels/instances").read(0, 5), instances)
        assert open_volume(out).voxel_size_nm == pytest.approx(VOXEL)
    # a completed output is not overwritten without force
    r = _submit(server, input_uri=src, output_uri=out, block_z=2, block_yx=64)
    assert r.status_code == 409, r.text
    assert r.json()["message"] == (
        f"output_uri {out}: exists (a completed job); submit with force to replace it"
    )


def test_volume_jobs_need_the_token_and_keep_the_limits(server: Server) -> None:
    from mitoseg.volume import ngff
    from servers import VOLUME_MAX_VOXELS
    from volumes import write_ome_zarr

    src = str(server.volumes / "in.ome.zarr")
    out = str(server.volumes / "out.ome.zarr")
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        refused = [
            _submit(server, headers=headers, input_uri=src, output_uri=out),
            requests.get(f"{server.url}/segment_volume/status", params={"task_id": "x"},
                         headers=headers, timeout=30),
            requests.get(f"{server.url}/segment_volume/get", params={"task_id": "x"},
                         headers=headers, timeout=30),
            requests.post(f"{server.url}/volume_progress", json={"output_uri": out},
                          headers=headers, timeout=30),
        ]  # fmt: skip
        for r in refused:
            assert r.status_code == 401, r.text
            assert r.json()["error"] == "unauthorized"
    big = np.zeros((16, 256, 256), np.uint8)  # 1048576 voxels > 1000000
    write_ome_zarr(Path(src), big, VOXEL, chunks=(8, 128, 128))
    r = _submit(server, input_uri=src, output_uri=out)
    assert r.status_code == 413, r.text
    assert r.json() == {
        "error": "too_large",
        "message": f"input_uri {src}: 16 x 256 x 256 = 1048576 voxels; the limit is "
        f"{VOLUME_MAX_VOXELS} voxels (volume_max_voxels)",
        "status": 413,
    }
    assert ngff.output_status(out) is None  # refused before anything was written
    r = requests.post(
        server.url + "/segment_volume/submit",
        data=b'{"input_uri": "' + b"x" * (SERVE["max_bytes"] + 2 * 1024 * 1024) + b'"}',
        headers={**AUTH, "Content-Type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 413 and r.json()["error"] == "too_large", r.text


def _bad_uri_cases(volumes: Path) -> list[tuple[dict[str, Any], int, str, str]]:
    ok = str(volumes / "crop.ome.zarr")  # written by the job test; re-created below if absent
    out = str(volumes / "bad_out.ome.zarr")
    return [
        ({"input_uri": "crop.ome.zarr", "output_uri": out}, 400, "bad_uri",
         "input_uri crop.ome.zarr: a local path must be absolute (the server's path)"),
        ({"input_uri": "http://example.org/v.zarr", "output_uri": out}, 400, "bad_uri",
         "input_uri http://example.org/v.zarr: only s3:// URIs and absolute paths on the "
         "server are accepted"),
        ({"input_uri": "s3://", "output_uri": out}, 400, "bad_uri",
         "input_uri s3://: expected s3://bucket/key"),
        ({"input_uri": "/etc/v.ome.zarr", "output_uri": out}, 403, "uri_not_allowed",
         f"input_uri /etc/v.ome.zarr: not under an allowed prefix ({volumes}; volume_allow / "
         "MITOSEG_VOLUME_ALLOW)"),
        ({"input_uri": f"{volumes}/../x.ome.zarr", "output_uri": out}, 403, "uri_not_allowed",
         f"input_uri {volumes}/../x.ome.zarr: not under an allowed prefix"),
        ({"input_uri": str(volumes / "absent.ome.zarr"), "output_uri": out}, 400, "bad_input",
         f"input_uri {volumes / 'absent.ome.zarr'}: not found"),
        ({"input_uri": ok, "output_uri": str(volumes / "out.tif")}, 400, "bad_output",
         f"output_uri {volumes / 'out.tif'}: must name a Zarr store ending in .zarr"),
        ({"input_uri": ok, "output_uri": ok}, 400, "bad_output",
         f"output_uri {ok}: must differ from the input"),
        ({"input_uri": ok, "output_uri": out, "block_z": 0}, 400, "invalid_request",
         "block_z: Input should be greater than or equal to 1"),
        ({"input_uri": ok}, 400, "invalid_request", "output_uri: Field required"),
    ]  # fmt: skip


BAD_URI_CASES = ["relative", "http", "s3-no-bucket", "outside-allow-list", "dot-dot",
                 "absent-input", "output-not-zarr", "output-is-input", "block_z-0",
                 "no-output"]  # fmt: skip


@pytest.mark.parametrize("case", BAD_URI_CASES)
def test_volume_job_bad_uris_are_refused_naming_them(server: Server, case: str) -> None:
    from volumes import write_ome_zarr

    crop = server.volumes / "crop.ome.zarr"
    if not crop.exists():
        write_ome_zarr(crop, tifffile.imread(VNC)[:2, :64, :64], VOXEL)
    body, status, code, message = _bad_uri_cases(server.volumes)[BAD_URI_CASES.index(case)]
    r = _submit(server, **body)
    assert r.status_code == status, r.text
    assert r.json()["error"] == code
    assert message in r.json()["message"]
    if "output_uri" in body and code in ("bad_uri", "uri_not_allowed"):
        # the progress endpoint checks its URI the same way
        r = server.post("/volume_progress", json={"output_uri": body["input_uri"]})
        assert (
            r.status_code == status
            and message.replace("input_uri", "output_uri") in (r.json()["message"])
        ), r.text
