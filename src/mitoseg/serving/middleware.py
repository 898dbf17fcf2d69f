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

:class:`DeadlineMiddleware` (outermost of the service's own middlewares) gives every
HTTP request a response within its deadline: a JSON ``408`` when the upload did not
arrive in time, ``504`` when the service did not answer in time (naming what the
request waited for, :func:`waiting_for`), ``500`` (``503`` on probes) when the app
failed or returned before starting a response, and it cancels the work of a client
that disconnects. BentoML's own ``TimeoutMiddleware`` waits only for the first
``send`` or its timer, so an app that raises before responding would hold the
connection for the whole ``traffic.timeout`` and then answer nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import tempfile
import time
from collections.abc import Awaitable, Callable, MutableMapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

__all__ = [
    "OPEN_PATHS",
    "PROBE_PATHS",
    "DeadlineMiddleware",
    "GuardMiddleware",
    "RequestClock",
    "current_request",
    "install_client_error_filter",
    "json_error",
    "normalize_client_error",
    "waiting_for",
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
            await _respond(
                send,
                *json_error(401, "unauthorized", "missing or invalid bearer token"),
                extra=[(b"www-authenticate", b'Bearer realm="mitoseg"')],
            )
            return
        upload = path in self.upload_paths and scope.get("method") == "POST"
        if upload:
            ctype = _header(scope, b"content-type").split(b";")[0].strip().lower()
            if ctype != b"multipart/form-data":
                await _respond(
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
                await _respond(send, *self._too_large(length))
                return
            receive = self._limited(receive)
        if _header(scope, b"content-type").lower().startswith(b"multipart/"):
            try:
                checked = await _checked_multipart(
                    scope, receive, self.upload_field if upload else None
                )
            except _BodyTooLarge:
                await _respond(send, *self._too_large(None))
                return
            except _BadMultipart as exc:
                await _respond(send, *json_error(400, exc.code, str(exc)))
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
            _log_error_line(self._method, self._path, status, code, message)
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


def _log_error_line(method: str, path: str, status: int, code: str, message: str) -> None:
    logger.warning("%s %s -> %d %s: %s", method, path, status, code, " ".join(message.split()))


# ----------------------------------------------------------------- deadlines


@dataclass
class RequestClock:
    """Deadline and progress of one HTTP request (see :class:`DeadlineMiddleware`).

    Attributes:
        deadline: ``time.monotonic()`` by which the response must start.
        timeout_s: the deadline's length, seconds.
        setting: the setting it comes from, for messages.
        waiting: what the request is waiting for now, e.g. ``"the request body"``.
        disconnected: the client went away.
    """

    deadline: float
    timeout_s: float
    setting: str
    waiting: str = "the request body"
    disconnected: bool = False
    _cancel: list[Callable[[], Any]] = field(default_factory=list, repr=False)

    def remaining(self) -> float:
        """Seconds left until the deadline (0 when it has passed)."""
        return max(0.0, self.deadline - time.monotonic())

    def on_cancel(self, callback: Callable[[], Any]) -> None:
        """Call ``callback`` when the client disconnects (at once if it already has)."""
        if self.disconnected:
            callback()
        else:
            self._cancel.append(callback)

    def _disconnect(self) -> None:
        self.disconnected = True
        callbacks, self._cancel = self._cancel, []
        for callback in callbacks:
            with contextlib.suppress(Exception):
                callback()


_CURRENT: ContextVar[RequestClock | None] = ContextVar("mitoseg_request_clock", default=None)


def current_request() -> RequestClock | None:
    """The clock of the request being served in this context (also in the worker
    thread of a sync API method), or None outside :class:`DeadlineMiddleware`."""
    return _CURRENT.get()


def waiting_for(what: str) -> None:
    """Record what the current request waits for now (named in its 504)."""
    clock = _CURRENT.get()
    if clock is not None:
        clock.waiting = what


class DeadlineMiddleware:
    """Every HTTP request gets a response: in time, or a JSON error saying why not.

    The app runs as a task; the middleware waits for the response to start, for the
    app to end, or for the deadline, whichever comes first:

    * the app raised, or returned without a response: ``500 internal_error`` (``503
      unavailable`` on :data:`PROBE_PATHS`), the exception logged;
    * the deadline passed while the body was still arriving: ``408 request_timeout``;
      after that: ``504 timeout`` naming what the request waited for (set by the
      service with :func:`waiting_for`); the app task is cancelled;
    * the client disconnected after sending its body: the app task is cancelled and
      the callbacks registered with :meth:`RequestClock.on_cancel` run (the service
      cancels its call to the runner, which frees its compute budget).

    Once the response has started, the app runs to its end with no deadline
    (streaming bodies are the app's business).

    Args:
        app: the wrapped ASGI application.
        timeout_s: seconds from the request's arrival to the start of its response.
        probe_timeout_s: the same for :data:`PROBE_PATHS`.
        setting: the setting ``timeout_s`` comes from, named in messages.
    """

    def __init__(
        self,
        app: ASGIApp,
        timeout_s: float,
        probe_timeout_s: float = 10.0,
        setting: str = "serve.request_timeout_s",
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"DeadlineMiddleware: timeout_s must be > 0, got {timeout_s}")
        if not probe_timeout_s > 0:
            raise ValueError(
                f"DeadlineMiddleware: probe_timeout_s must be > 0, got {probe_timeout_s}"
            )
        self.app = app
        self.timeout_s = float(timeout_s)
        self.probe_timeout_s = float(probe_timeout_s)
        self.setting = setting

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one request under its deadline; other scopes pass through."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = str(scope.get("path", ""))
        probe = path in PROBE_PATHS
        timeout = min(self.timeout_s, self.probe_timeout_s) if probe else self.timeout_s
        setting = "the probe deadline" if probe else self.setting
        clock = RequestClock(time.monotonic() + timeout, timeout, setting)
        started = asyncio.Event()
        body_done = asyncio.Event()
        # no body to wait for: nothing to time out as 408, no disconnect to watch after it
        bodyless = scope.get("method") in ("GET", "HEAD", "OPTIONS") or probe
        if bodyless:
            clock.waiting = "the readiness checks" if probe else "the service"

        async def clocked_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                if clock.waiting == "the request body":
                    clock.waiting = "the service"
                body_done.set()
            elif message["type"] == "http.disconnect":
                clock.disconnected = True  # the app saw it: nothing left to answer
            return message

        async def tracking_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                started.set()
            await send(message)

        async def watch_disconnect() -> None:
            await body_done.wait()  # the app has the whole body: a read now is a disconnect
            while (await receive())["type"] != "http.disconnect":
                pass
            clock._disconnect()

        token = _CURRENT.set(clock)
        try:
            task = asyncio.ensure_future(self.app(scope, clocked_receive, tracking_send))
        finally:
            _CURRENT.reset(token)
        clock.on_cancel(task.cancel)
        start_waiter = asyncio.ensure_future(started.wait())
        watcher = asyncio.ensure_future(asyncio.Event().wait() if bodyless else watch_disconnect())
        try:
            await asyncio.wait(
                {task, start_waiter, watcher},
                timeout=clock.remaining(),
                return_when=asyncio.FIRST_COMPLETED,
            )
        except BaseException:  # this request was cancelled (server shutdown): so is its app
            task.cancel()
            raise
        finally:
            start_waiter.cancel()
            watcher.cancel()
        if started.is_set():
            await task
            return
        if clock.disconnected:  # the task was cancelled; nobody is left to answer
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(task, 5.0)
            return
        if task.done():
            await self._failed(scope, send, task, probe)
            return
        task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(task, 1.0)
        if started.is_set():
            return
        if not body_done.is_set() and not bodyless:
            status, code = 408, "request_timeout"
            what = "the request body did not arrive"
        else:
            status, code = (503, "unavailable") if probe else (504, "timeout")
            what = f"no response from {clock.waiting}"
        message = f"{what} within {timeout:g} s ({setting})"
        if not probe:
            _log_error_line(str(scope.get("method", "")), path, status, code, message)
        await _respond(send, *json_error(status, code, message))

    async def _failed(
        self, scope: Scope, send: Send, task: asyncio.Task[None], probe: bool
    ) -> None:
        """The app ended without starting a response: answer 500 (503 for probes)."""
        method, path = str(scope.get("method", "")), str(scope.get("path", ""))
        exc = None if task.cancelled() else task.exception()
        if task.cancelled():
            return  # the client disconnected; there is no one to answer
        if exc is None:
            detail = "the service returned without a response"
        else:
            detail = f"{type(exc).__name__}: {exc}".rstrip(": ")
            logger.error("%s %s failed before responding", method, path, exc_info=exc)
        status, code = (503, "unavailable") if probe else (500, "internal_error")
        message = f"{'not ready' if probe else 'internal error'}: {detail}"
        if not probe:
            _log_error_line(method, path, status, code, message)
        await _respond(send, *json_error(status, code, message))
