"""ASGI guard-rail middleware: bearer-token auth and request-body size limit.

Pure ASGI (no BentoML import): the service installs it with
``Service.add_asgi_middleware(GuardMiddleware, token_env=..., max_bytes=...)``.

* Auth: when the environment variable named by ``token_env`` is set and non-empty,
  every request except health, readiness and API docs needs
  ``Authorization: Bearer <token>``; otherwise it gets ``401`` with a JSON body. The
  token is compared in constant time (:func:`hmac.compare_digest`) and never logged.
* Uploads: ``POST`` requests to ``upload_paths`` must be ``multipart/form-data``
  (``415`` otherwise). This also turns off BentoML's "fetch the file from a URL in a
  JSON body" convenience, so the server never downloads on a client's behalf.
* Multipart: a ``multipart/form-data`` body is checked with Starlette's own form parser
  before the app sees it (spooled to a temporary file, then replayed), so a malformed
  body or a missing boundary is a ``400`` instead of an error inside the framework.
* Size: a request whose ``Content-Length`` exceeds ``max_bytes`` is refused with
  ``413`` before its body is read; a body without ``Content-Length`` (chunked) is cut
  off with ``413`` as soon as it grows past the limit.
"""

from __future__ import annotations

import hmac
import json
import os
import tempfile
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

__all__ = ["OPEN_PATHS", "GuardMiddleware", "json_error"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Paths served without a token: liveness/readiness probes and the OpenAPI docs.
OPEN_PATHS = frozenset({"/", "/docs", "/docs.json", "/livez", "/readyz", "/healthz"})
_OPEN_PREFIXES = ("/static_content/",)


def json_error(
    status: int, code: str, message: str
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, headers and body of a JSON error response ``{"error", "message", "status"}``."""
    body = json.dumps({"error": code, "message": message, "status": status}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    return status, headers, body


def _body_too_large(message: str) -> Exception:
    """The exception raised from ``receive`` when a streamed body passes the limit.

    It is raised inside the framework's body parsing, so it must be an exception the
    framework maps to a 4xx itself: a ``BentoMLException`` with status 413 when BentoML
    is installed (it always is under ``bentoml serve``), else a plain ``_BodyTooLarge``
    that :class:`GuardMiddleware` turns into the 413 response.
    """
    from http import HTTPStatus

    try:
        from bentoml.exceptions import BentoMLException
    except ImportError:  # pragma: no cover - bentoml is a runtime dependency
        return _BodyTooLarge(message)

    class BodyTooLarge(_BodyTooLarge, BentoMLException):
        pass

    return BodyTooLarge(message, error_code=HTTPStatus.REQUEST_ENTITY_TOO_LARGE)


class _BodyTooLarge(Exception):
    """A streamed request body grew past ``max_bytes``."""


class GuardMiddleware:
    """Bearer-token auth and body-size limit for an ASGI app.

    Args:
        app: the wrapped ASGI application.
        token_env: name of the environment variable holding the API token; read on each
            request so a restart is not needed to rotate it in tests.
        max_bytes: largest accepted request body, bytes (0: no limit).
        upload_paths: paths whose requests must be ``multipart/form-data``.
    """

    def __init__(
        self,
        app: ASGIApp,
        token_env: str = "MITOSEG_API_TOKEN",
        max_bytes: int = 0,
        upload_paths: tuple[str, ...] = (),
    ):
        if max_bytes < 0:
            raise ValueError(f"GuardMiddleware: max_bytes must be >= 0, got {max_bytes}")
        self.app = app
        self.token_env = token_env
        self.max_bytes = max_bytes
        self.upload_paths = frozenset(upload_paths)

    @staticmethod
    def is_open(path: str) -> bool:
        """True for paths that never need a token."""
        return path in OPEN_PATHS or path.startswith(_OPEN_PREFIXES)

    def authorized(self, scope: Scope) -> bool:
        """Check the bearer token of an HTTP scope (True when auth is off)."""
        token = os.environ.get(self.token_env, "")
        if not token:
            return True
        header = _header(scope, b"authorization")
        scheme, _, supplied = header.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        return hmac.compare_digest(supplied.strip(), token.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Apply the checks to HTTP requests; pass everything else through."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if not self.is_open(path) and not self.authorized(scope):
            await _respond(
                send,
                *json_error(401, "unauthorized", "missing or invalid bearer token"),
                extra=[(b"www-authenticate", b'Bearer realm="mitoseg"')],
            )
            return
        if path in self.upload_paths and scope.get("method") == "POST":
            ctype = _header(scope, b"content-type").split(b";")[0].strip().lower()
            if ctype != b"multipart/form-data":
                await _respond(
                    send,
                    *json_error(
                        415,
                        "unsupported_media_type",
                        "send the image as a multipart/form-data file field named 'image' "
                        f"(got content-type {ctype.decode('latin-1') or 'none'!r})",
                    ),
                )
                return
        if self.max_bytes:
            length = _content_length(scope)
            if length is not None and length > self.max_bytes:
                await _respond(send, *self._too_large(length))
                return
            receive = self._limited(receive)
        if _header(scope, b"content-type").lower().startswith(b"multipart/"):
            try:
                replay = await _checked_multipart(scope, receive)
            except _BodyTooLarge:
                await _respond(send, *self._too_large(None))
                return
            except _BadMultipart as exc:
                await _respond(send, *json_error(400, "malformed_multipart", str(exc)))
                return
            if replay is None:  # the client went away
                return
            receive = replay
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await _respond(send, *self._too_large(None))

    def _too_large(self, length: int | None) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        if length is None:
            message = f"the request body is larger than the limit of {self.max_bytes} bytes"
        else:
            message = f"the request body is {length} bytes; the limit is {self.max_bytes} bytes"
        return json_error(413, "too_large", message)

    def _limited(self, receive: Receive) -> Receive:
        seen = 0
        limit = self.max_bytes

        async def wrapped() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _body_too_large(
                        f"the request body is larger than the limit of {limit} bytes"
                    )
            return message

        return wrapped


class _BadMultipart(Exception):
    """A ``multipart/form-data`` body the form parser rejects."""


_SPOOL_BYTES = 8 * 1024 * 1024
_CHUNK = 1024 * 1024


async def _checked_multipart(scope: Scope, receive: Receive) -> Receive | None:
    """Read the whole body into a spool, parse it with Starlette's multipart parser,
    and return a ``receive`` that replays it (``None`` if the client disconnected).

    Raises:
        _BadMultipart: no boundary, or the parser rejects the body.
    """
    from python_multipart.multipart import parse_options_header
    from starlette.datastructures import Headers
    from starlette.formparsers import MultiPartException, MultiPartParser

    _, params = parse_options_header(_header(scope, b"content-type"))
    if not params.get(b"boundary"):
        raise _BadMultipart("multipart/form-data content-type without a boundary parameter")
    spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES)  # noqa: SIM115
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            spool.close()
            return None
        spool.write(message.get("body", b""))
        if not message.get("more_body", False):
            break

    async def stream():  # type: ignore[no-untyped-def]
        spool.seek(0)
        while chunk := spool.read(_CHUNK):
            yield chunk
        yield b""

    try:
        form = await MultiPartParser(Headers(scope=scope), stream()).parse()
    except MultiPartException as exc:
        spool.close()
        raise _BadMultipart(f"malformed multipart body: {exc.message}") from None
    except Exception as exc:  # python-multipart raises its own errors on garbage
        spool.close()
        raise _BadMultipart(f"malformed multipart body: {type(exc).__name__}: {exc}") from None
    await form.close()
    spool.seek(0)

    async def replay() -> Message:
        if spool.closed:  # body fully replayed: later reads wait for the real disconnect
            return await receive()
        chunk = spool.read(_CHUNK)
        more = spool.tell() < size
        if not more:
            spool.close()
        return {"type": "http.request", "body": chunk, "more_body": more}

    size = spool.seek(0, os.SEEK_END)
    spool.seek(0)
    return replay


def _header(scope: Scope, wanted: bytes) -> bytes:
    for name, value in scope.get("headers") or []:
        if name.lower() == wanted:
            return bytes(value)
    return b""


def _content_length(scope: Scope) -> int | None:
    value = _header(scope, b"content-length")
    try:
        return int(value) if value else None
    except ValueError:
        return None


async def _respond(
    send: Send,
    status: int,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    await send(
        {"type": "http.response.start", "status": status, "headers": headers + (extra or [])}
    )
    await send({"type": "http.response.body", "body": body})
