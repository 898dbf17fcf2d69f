"""ASGI guard-rail middleware: auth, upload checks, body limit, uniform client errors.

Pure ASGI (no BentoML import): the service installs it with
``Service.add_asgi_middleware(GuardMiddleware, token_env=..., max_bytes=...)``.

* Auth: when the environment variable named by ``token_env`` is set and non-empty,
  every request except health, readiness and API docs needs
  ``Authorization: Bearer <token>``; otherwise it gets ``401`` with a JSON body. The
  token is compared in constant time (:func:`hmac.compare_digest`) and never logged.
* Uploads: ``POST`` requests to ``upload_paths`` must be ``multipart/form-data``
  (``415`` otherwise) with a *file* part named ``upload_field`` (``400`` when it is
  missing, repeated or a text value: BentoML would otherwise download a URL given as
  text, so the server never fetches on a client's behalf). The part's declared content
  type is not checked: the service recognises TIFF and PNG by their bytes.
* Multipart: a ``multipart/form-data`` body is checked with Starlette's own form parser
  before the app sees it (spooled to a temporary file, then replayed), so a malformed
  body or a missing boundary is a ``400`` instead of an error inside the framework.
* Size: a request whose ``Content-Length`` exceeds ``max_bytes`` is refused with
  ``413`` before its body is read; a body without ``Content-Length`` (chunked) is cut
  off with ``413`` as soon as it grows past the limit.
* Client errors: every 4xx response, the framework's own included (e.g. a pydantic
  validation error of a form field, a 404), leaves with the JSON body
  ``{"error": code, "message": ..., "status": ...}`` and is logged as one line at
  WARNING on ``mitoseg.serving`` (method, path, status, code, message; no traceback).
  :func:`install_client_error_filter` silences the framework's own ERROR log with
  traceback for those.
* Docs: ``GET /docs`` serves the OpenAPI page (BentoML's ``/``).
* Server errors: a 5xx leaves with the same JSON body (codes ``internal_error``,
  ``unavailable``, ``timeout``), also logged as one WARNING line.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable, MutableMapping
from http import HTTPStatus
from typing import Any

__all__ = [
    "OPEN_PATHS",
    "PROBE_PATHS",
    "GuardMiddleware",
    "install_client_error_filter",
    "json_error",
    "log_error_line",
    "normalize_client_error",
    "respond",
]

logger = logging.getLogger("mitoseg.serving")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Paths served without a token: liveness/readiness probes and the OpenAPI docs.
OPEN_PATHS = frozenset({"/", "/docs", "/docs.json", "/livez", "/readyz", "/healthz", "/ui"})
_OPEN_PREFIXES = ("/static_content/", "/ui/")
#: Paths answered with the OpenAPI page (BentoML serves it at ``/``).
_DOCS_ALIASES = frozenset({"/docs", "/docs/"})
#: Machine-readable code of a 4xx whose body did not carry one.
_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "timeout",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "busy",
    500: "internal_error",
    502: "bad_gateway",
    503: "unavailable",
    504: "timeout",
}
#: Health and readiness probes: a failure there is a 503, their deadline is short.
PROBE_PATHS = frozenset({"/livez", "/readyz", "/healthz"})
#: Framework logger whose tracebacks for client errors are silenced.
FRAMEWORK_ERROR_LOGGER = "bentoml._internal.server.http_app"


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


def normalize_client_error(status: int, body: bytes) -> tuple[str, str]:
    """The ``(code, message)`` of a 4xx response body in whatever shape it came.

    Our own ``{"error", "message", "status"}`` bodies keep their code and message; a
    pydantic validation body (``{"error": "1 validation error ...", "detail": [...]}``)
    becomes ``invalid_request`` with ``field: problem`` messages; BentoML's
    ``[{"error": ...}]`` and plain-text bodies keep their text with a code from the
    status (``bad_request``, ``not_found``, ...).
    """
    default_code = _STATUS_CODES.get(status, "client_error")
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "client error"
    try:
        data: Any = json.loads(body) if body else None
    except ValueError:
        text = body.decode("utf-8", errors="replace").strip()
        return default_code, (text[:500] or phrase)
    if isinstance(data, list) and len(data) == 1:
        data = data[0]
    if isinstance(data, dict):
        if isinstance(data.get("error"), str) and isinstance(data.get("message"), str):
            return data["error"], data["message"]
        detail = data.get("detail")
        if isinstance(detail, list) and detail and all(isinstance(d, dict) for d in detail):
            parts = []
            for d in detail:
                loc = ".".join(str(x) for x in d.get("loc") or [])
                msg = str(d.get("msg", "invalid value"))
                parts.append(f"{loc}: {msg}" if loc else msg)
            return "invalid_request", "; ".join(parts)
        for key in ("message", "error", "detail"):
            if isinstance(data.get(key), str) and data[key]:
                return default_code, data[key]
    if isinstance(data, str) and data:
        return default_code, data
    return default_code, phrase


class _ClientErrorFilter(logging.Filter):
    """Drops framework log records whose exception is a client error (a 4xx)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return exc is None or not _is_client_error(exc)


def _is_client_error(exc: BaseException) -> bool:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return True
    code = getattr(exc, "error_code", None)
    value = getattr(code, "value", code)
    return isinstance(value, int) and 400 <= value < 500


def install_client_error_filter(name: str = FRAMEWORK_ERROR_LOGGER) -> None:
    """Stop logger ``name`` from logging client errors at ERROR with a traceback.

    BentoML logs every exception of an API call, a pydantic validation error of the
    input included, with ``logger.error(..., exc_info=True)``; the
    :class:`GuardMiddleware` logs those responses as one WARNING line instead.
    Idempotent; call it in the serving process (the service's ``__init__``).
    """
    target = logging.getLogger(name)
    if not any(isinstance(f, _ClientErrorFilter) for f in target.filters):
        target.addFilter(_ClientErrorFilter())


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
        upload_paths: paths whose requests must be ``multipart/form-data`` with a file
            part named ``upload_field``.
        upload_field: name of the file part of an upload.
    """

    def __init__(
        self,
        app: ASGIApp,
        token_env: str = "MITOSEG_API_TOKEN",
        max_bytes: int = 0,
        upload_paths: tuple[str, ...] = (),
        upload_field: str = "image",
    ):
        if max_bytes < 0:
            raise ValueError(f"GuardMiddleware: max_bytes must be >= 0, got {max_bytes}")
        self.app = app
        self.token_env = token_env
        self.max_bytes = max_bytes
        self.upload_paths = frozenset(upload_paths)
        self.upload_field = upload_field

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
        send = _ClientErrorSend(send, scope)
        if path in _DOCS_ALIASES and scope.get("method") in ("GET", "HEAD"):
            scope = {**scope, "path": "/", "raw_path": b"/"}
            path = "/"
        if not self.is_open(path) and not self.authorized(scope):
            await respond(
                send,
                *json_error(401, "unauthorized", "missing or invalid bearer token"),
                extra=[(b"www-authenticate", b'Bearer realm="mitoseg"')],
            )
            return
        upload = path in self.upload_paths and scope.get("method") == "POST"
        if upload:
            ctype = _header(scope, b"content-type").split(b";")[0].strip().lower()
            if ctype != b"multipart/form-data":
                await respond(
                    send,
                    *json_error(
                        415,
                        "unsupported_media_type",
                        f"send the image as a multipart/form-data file field named "
                        f"{self.upload_field!r} "
                        f"(got content-type {ctype.decode('latin-1') or 'none'!r})",
                    ),
                )
                return
        if self.max_bytes:
            length = _content_length(scope)
            if length is not None and length > self.max_bytes:
                await respond(send, *self._too_large(length))
                return
            receive = self._limited(receive)
        if _header(scope, b"content-type").lower().startswith(b"multipart/"):
            try:
                checked = await _checked_multipart(
                    scope, receive, self.upload_field if upload else None
                )
            except _BodyTooLarge:
                await respond(send, *self._too_large(None))
                return
            except _BadMultipart as exc:
                await respond(send, *json_error(400, exc.code, str(exc)))
                return
            if checked is None:  # the client went away
                return
            receive = checked
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
                await respond(send, *self._too_large(None))

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
    """A ``multipart/form-data`` body the form parser rejects, or a bad upload field."""

    def __init__(self, message: str, code: str = "malformed_multipart") -> None:
        super().__init__(message)
        self.code = code


class _ClientErrorSend:
    """``send`` wrapper: every 4xx and 5xx response gets the JSON error body and one log
    line (none for a probe's 503: a load balancer polls it while the server starts)."""

    def __init__(self, send: Send, scope: Scope) -> None:
        self._send = send
        self._method = str(scope.get("method", ""))
        self._path = str(scope.get("path", ""))
        self._start: Message | None = None
        self._chunks: list[bytes] = []

    async def __call__(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start" and 400 <= int(message["status"]) < 600:
            self._start = message
            self._chunks = []
            return
        if kind == "http.response.body" and self._start is not None:
            self._chunks.append(bytes(message.get("body", b"")))
            if message.get("more_body", False):
                return
            await self._flush()
            return
        await self._send(message)

    async def _flush(self) -> None:
        assert self._start is not None
        start, self._start = self._start, None
        status = int(start["status"])
        code, message = normalize_client_error(status, b"".join(self._chunks))
        self._chunks = []
        _, headers, body = json_error(status, code, message)
        keep = [
            (k, v)
            for k, v in start.get("headers") or []
            if k.lower() not in (b"content-type", b"content-length")
        ]
        if not (status == 503 and self._path in PROBE_PATHS):
            log_error_line(self._method, self._path, status, code, message)
        await self._send(
            {"type": "http.response.start", "status": status, "headers": keep + headers}
        )
        await self._send({"type": "http.response.body", "body": body})


_SPOOL_BYTES = 8 * 1024 * 1024
_CHUNK = 1024 * 1024


async def _checked_multipart(
    scope: Scope, receive: Receive, file_field: str | None = None
) -> Receive | None:
    """Read the whole body into a spool, parse it with Starlette's multipart parser,
    and return a ``receive`` that replays it (``None`` if the client disconnected).

    Args:
        scope: the request scope.
        receive: the request's ``receive``.
        file_field: when set, the form must hold exactly one file part of this name.

    Raises:
        _BadMultipart: no boundary, the parser rejects the body, or ``file_field`` is
            missing, repeated or not a file.
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
    try:
        if file_field is not None:
            _check_file_field(form.getlist(file_field), file_field)
    except _BadMultipart:
        spool.close()
        raise
    finally:
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


def _check_file_field(values: list[Any], name: str) -> None:
    """Exactly one value, and a file (Starlette ``UploadFile``), not a text value."""
    if not values:
        raise _BadMultipart(
            f"the form has no file field named {name!r}; send the image as a "
            f"multipart/form-data file field named {name!r}",
            "missing_image",
        )
    if len(values) > 1:
        raise _BadMultipart(
            f"the form has {len(values)} fields named {name!r}; send exactly one image",
            "too_many_images",
        )
    if isinstance(values[0], str):
        raise _BadMultipart(
            f"the {name!r} field is a text value, not a file: upload the image bytes as a "
            "file part (the server does not fetch URLs)",
            "image_not_a_file",
        )


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


async def respond(
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


def log_error_line(method: str, path: str, status: int, code: str, message: str) -> None:
    logger.warning("%s %s -> %d %s: %s", method, path, status, code, " ".join(message.split()))
