"""Deadlines: every HTTP request gets a response, in time or as a JSON error saying why not.

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
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from mitoseg.serving.middleware import (
    PROBE_PATHS,
    ASGIApp,
    Message,
    Receive,
    Scope,
    Send,
    json_error,
    log_error_line,
    logger,
    respond,
)

__all__ = ["DeadlineMiddleware", "RequestClock", "current_request", "waiting_for"]


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
            # uvicorn also reports a disconnect once the response is complete: the app may
            # still run its background tasks then (closing the upload's spooled file)
            if not started.is_set():
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
            log_error_line(str(scope.get("method", "")), path, status, code, message)
        await respond(send, *json_error(status, code, message))

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
            log_error_line(method, path, status, code, message)
        await respond(send, *json_error(status, code, message))
