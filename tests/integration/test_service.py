"""The real BentoML service on loopback: results, guard rails, auth, OpenAPI fuzzing.

One server (``bentoml serve``, both services) for the module, serving a tiny UNet built
in the test with small tiles so inference is quick on a shared CPU.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import tifffile
from PIL import Image

from mitoseg.config import ServeConfig

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
VNC = REPO / "src" / "mitoseg" / "sample_data" / "vnc" / "test" / "images.tif"
CDEEP3M = REPO.parent / "shared" / "data" / "cdeep3m" / "cdeep3m_test_raw.tif"
TOKEN = "test-token-7f3a"
SERVE_CMD = (sys.executable, "-m", "bentoml", "serve", "mitoseg.serving.service:MitoSeg")
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SERVE = ServeConfig(
    max_bytes=4 * 1024 * 1024,
    max_pixels=2048 * 2048,
    max_pages=4,
    max_side=2048,
    tile_size=64,
    overlap=0.25,
    max_batch_size=8,
    max_latency_ms=20,
)


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


class Server:
    def __init__(self, url: str, model, meta: dict, proc: subprocess.Popen, log: Path):
        self.url, self.model, self.meta, self.proc, self.log = url, model, meta, proc, log

    def post(self, route: str, upload: bytes | None = None, **kwargs) -> requests.Response:
        headers = {**AUTH, **kwargs.pop("headers", {})}
        files = {"image": ("upload.tif", upload)} if upload is not None else None
        files = kwargs.pop("files", files)
        return requests.post(self.url + route, files=files, headers=headers, timeout=120, **kwargs)

    def expected(self, stack: np.ndarray) -> np.ndarray:
        """In-process reference: the same segment_stack call the service makes."""
        from mitoseg.inference import mask_to_image, segment_stack

        mask = segment_stack(
            self.model,
            stack,
            tile_size=SERVE.tile_size,
            overlap=SERVE.overlap,
            batch_size=SERVE.max_batch_size,
            threshold=self.meta["threshold"],
            divisor=self.meta["divisor"],
        )
        return mask_to_image(mask, 2)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    import keras

    from mitoseg.config import ModelConfig
    from mitoseg.model.unet import build_unet

    tmp = tmp_path_factory.mktemp("serve")
    home = tmp / "bentoml"
    keras.utils.set_random_seed(7)
    model = build_unet(
        ModelConfig(depth=2, base_filters=4, batch_norm=False, dropout=0.0), n_classes=2
    )
    model.save(tmp / "tiny.keras")
    # An untrained net is nearly constant: threshold at the median foreground
    # probability of a real slice so the masks compared below are far from trivial.
    from mitoseg.inference import iter_stack_probabilities

    probs = next(
        iter_stack_probabilities(model, tifffile.imread(VNC)[0], tile_size=64, overlap=0.25)
    )
    threshold = round(float(np.median(probs)), 6)
    # Import in a child process so this process's BentoML configuration is untouched.
    code = (
        "import json, sys; from mitoseg.config import BaseConfig, ServeConfig; "
        "from mitoseg.serving.bento import import_model; "
        "tag, meta = import_model(sys.argv[1], base=BaseConfig(), threshold=float(sys.argv[3]), "
        "serve=ServeConfig.model_validate_json(sys.argv[2])); print(json.dumps([tag, meta]))"
    )
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(tmp / "tiny.keras"),
            SERVE.model_dump_json(),
            str(threshold),
        ],
        env={**os.environ, "BENTOML_HOME": str(home), "TF_CPP_MIN_LOG_LEVEL": "3"},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    tag, meta = json.loads(out.stdout.strip().splitlines()[-1])
    port = free_port()
    env = {
        **os.environ,
        "BENTOML_HOME": str(home),
        "MITOSEG_BENTO_MODEL": tag,
        "MITOSEG_API_TOKEN": TOKEN,
        "BENTOML_DO_NOT_TRACK": "True",
    }
    log = tmp / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*SERVE_CMD, "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if requests.get(url + "/readyz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready in 120 s:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield Server(url, model, meta, proc, log)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


def vnc_slice(i: int = 0) -> np.ndarray:
    return tifffile.imread(VNC)[i]


def test_segment_png_and_tiff_equal_in_process(server: Server) -> None:
    img = vnc_slice(0)  # (512, 768) uint8 real EM
    expected = server.expected(img)[0]
    r = server.post("/segment", tiff_bytes(img))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
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
    img16 = img.astype(np.uint16) * 257  # same scene in 16 bits: same normalised input
    buf = io.BytesIO()
    Image.fromarray(img16).save(buf, format="PNG")
    r = server.post("/segment", buf.getvalue())
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r.content))), expected)
    rgb = np.dstack([img] * 3)
    r = server.post("/segment", tiff_bytes(rgb, photometric="rgb"))
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r.content))), expected)


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
    ref = mask_stats((expected[0] == 255).astype(np.uint8), 1, server.meta["min_object_size"])
    assert stats["class"] == "mitochondria"
    assert stats["count"] == ref["count"] > 0
    assert stats["area_fraction"] == pytest.approx(ref["area_fraction"])
    assert stats["objects"][0] == ref["objects"][0]
    assert {"id", "area", "centroid", "bbox"} <= set(stats["objects"][0])


def test_metadata(server: Server) -> None:
    r = server.post("/metadata")
    assert r.status_code == 200, r.text
    meta = r.json()
    assert meta["bento_model"].startswith("mitoseg-unet:")
    assert meta["threshold"] == server.meta["threshold"]
    assert meta["n_classes"] == 2
    assert meta["class_names"] == ["background", "mitochondria"]
    assert meta["serve"]["tile_size"] == 64
    for key in ("name", "version", "alias", "run_id", "git_commit", "data_hash", "metrics"):
        assert key in meta


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


def test_malformed_inputs_get_json_4xx_and_server_stays_up(server: Server) -> None:
    statuses = []
    for route, data, status, message in _malformed_corpus():
        r = server.post(route, data)
        statuses.append(r.status_code)
        assert r.status_code == status, (route, message, r.status_code, r.text)
        body = r.json()
        assert message in body["message"], body
        assert body["status"] == status
    # framework-level input errors are JSON 4xx too
    r = server.post("/segment", None, data={"format": "png"})  # urlencoded, no file
    assert r.status_code == 415 and r.json()["error"] == "unsupported_media_type"
    r = server.post("/segment", None, files={"format": (None, "png")})  # no image field
    assert r.status_code == 400 and "validation error" in r.json()["error"]
    assert r.json()["detail"][0]["loc"] == ["image"]
    r = server.post("/segment", tiff_bytes(vnc_slice(0)[:32, :32]), data={"format": "jpeg"})
    assert r.status_code == 400 and r.json()["detail"][0]["loc"] == ["format"]
    r = requests.post(server.url + "/segment", json={"image": "http://x"}, headers=AUTH, timeout=30)
    assert r.status_code == 415 and r.json()["error"] == "unsupported_media_type"
    big = b"II*\x00" + b"\x00" * (SERVE.max_bytes + 2 * 1024 * 1024)
    r = server.post("/segment", big)
    assert r.status_code == 413 and r.json()["error"] == "too_large"
    r = server.post(
        "/segment",
        None,
        data=b"--b\r\nbroken",
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )
    assert 400 <= r.status_code < 500, r.text
    statuses.append(r.status_code)
    assert all(400 <= s < 500 for s in statuses)
    # still serving
    assert requests.get(server.url + "/readyz", timeout=5).status_code == 200
    r = server.post("/segment", tiff_bytes(vnc_slice(0)[:64, :64]))
    assert r.status_code == 200
    assert server.proc.poll() is None


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
    for path in ("/readyz", "/livez", "/docs.json"):
        assert requests.get(server.url + path, timeout=30).status_code == 200, path
    spec = requests.get(server.url + "/docs.json", timeout=30).json()
    assert {"/segment", "/segment_stack", "/stats", "/metadata"} <= set(spec["paths"])
    assert TOKEN.encode() not in server.log.read_bytes()


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
