""":class:`mitoseg.serving.deadline.DeadlineMiddleware`: every request gets a response.

Driven as plain ASGI (the middleware imports no framework): an app that raises or
returns before responding is a JSON 500 at once (503 on probes), not a connection held
until BentoML's ``traffic.timeout``; a deadline is a JSON 408 while the body is still
arriving and a 504 naming what the request waited for afterwards; a client that
disconnects gets its app task and its registered work cancelled.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import pytest

from mitoseg.serving.deadline import DeadlineMiddleware, current_request, waiting_for

SHORT = 0.3


def drive(
    app: Any,
    *,
    path: str = "/segment",
    method: str = "POST",
    body: list[bytes] | None = None,
    stall_body: bool = False,
    disconnect_after: float | None = None,
    timeout_s: float = SHORT,
) -> tuple[int | None, dict[str, Any] | None, float]:
    """One request through ``DeadlineMiddleware(app)``: (status, JSON body, seconds)."""
    chunks = list(body if body is not None else [b"x"])
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if chunks:
            chunk = chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(chunks) or stall_body}
        if stall_body:
            await asyncio.sleep(3600)
        if disconnect_after is not None:
            await asyncio.sleep(disconnect_after)
            return {"type": "http.disconnect"}
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": []}
    mw = DeadlineMiddleware(app, timeout_s=timeout_s, probe_timeout_s=timeout_s)
    t0 = time.monotonic()
    asyncio.run(asyncio.wait_for(mw(scope, receive, send), 30))
    took = time.monotonic() - t0
    start = next((m for m in sent if m["type"] == "http.response.start"), None)
    if start is None:
        return None, None, took
    data = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(data) if data.startswith(b"{") else None, took


async def _read_body(receive: Any) -> None:
    while (await receive()).get("more_body"):
        pass


def test_an_app_that_raises_before_responding_is_a_json_500_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await _read_body(receive)
        raise RuntimeError("the probe failed")

    with caplog.at_level(logging.INFO, logger="mitoseg.serving"):
        status, body, took = drive(app, timeout_s=20)
    assert took < 5  # not held until the deadline
    assert (status, body) == (
        500,
        {"error": "internal_error", "message": "internal error: RuntimeError: the probe failed",
         "status": 500},
    )  # fmt: skip
    assert any(r.exc_info and "the probe failed" in str(r.exc_info[1]) for r in caplog.records)


@pytest.mark.parametrize(
    ("path", "raises", "status", "message"),
    [
        ("/segment", False, 500, "internal error: the service returned without a response"),
        ("/readyz", True, 503, "not ready: TimeoutError"),
        ("/readyz", False, 503, "not ready: the service returned without a response"),
    ],
    ids=["no-response", "probe-raises", "probe-no-response"],
)
def test_an_app_that_ends_without_a_response_gets_one(
    path: str, raises: bool, status: int, message: str
) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if raises:
            raise TimeoutError

    got, body, _ = drive(app, path=path, method="GET", timeout_s=20)
    assert (got, body) == (status, {"error": body and body["error"], "message": message,
                                     "status": status})  # fmt: skip
    assert body["error"] == ("unavailable" if status == 503 else "internal_error")


def test_a_slow_service_is_a_504_naming_what_the_request_waited_for() -> None:
    cancelled = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await _read_body(receive)
        waiting_for("the model runner (r)")
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    status, body, took = drive(app)
    assert SHORT <= took < SHORT + 2
    assert (status, body) == (
        504,
        {"error": "timeout", "message": f"no response from the model runner (r) within "
         f"{SHORT:g} s (serve.request_timeout_s)", "status": 504},
    )  # fmt: skip
    assert cancelled.is_set()


def test_an_upload_that_does_not_arrive_in_time_is_a_408() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await _read_body(receive)
        raise AssertionError("the body never ends")

    status, body, _ = drive(app, body=[b"a", b"b"], stall_body=True)
    assert (status, body) == (
        408,
        {"error": "request_timeout", "message": "the request body did not arrive within "
         f"{SHORT:g} s (serve.request_timeout_s)", "status": 408},
    )  # fmt: skip


def test_a_client_that_disconnects_cancels_the_app_and_its_registered_work() -> None:
    seen: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await _read_body(receive)
        clock = current_request()
        assert clock is not None
        seen["clock"] = clock
        clock.on_cancel(lambda: seen.setdefault("work_cancelled", True))
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            seen["app_cancelled"] = True
            raise

    status, body, took = drive(app, disconnect_after=0.1, timeout_s=20)
    assert (status, body) == (None, None)  # nobody left to answer
    assert took < 5
    assert seen["app_cancelled"] and seen["work_cancelled"] and seen["clock"].disconnected
    late: list[bool] = []
    seen["clock"].on_cancel(lambda: late.append(True))  # registered after: run at once
    assert late == [True]


def test_a_response_in_time_passes_through_untouched() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await _read_body(receive)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.sleep(SHORT * 2)  # a body streaming past the deadline is the app's
        await send({"type": "http.response.body", "body": b'{"ok": 1}'})

    assert drive(app)[:2] == (200, {"ok": 1})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"timeout_s": 0}, "DeadlineMiddleware: timeout_s must be > 0, got 0"),
        (
            {"timeout_s": 1, "probe_timeout_s": -1},
            "DeadlineMiddleware: probe_timeout_s must be > 0, got -1",
        ),
    ],
    ids=["timeout", "probe-timeout"],
)
def test_bad_deadlines_are_refused(kwargs: dict[str, float], message: str) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError

    with pytest.raises(ValueError) as exc:
        DeadlineMiddleware(app, **kwargs)
    assert str(exc.value) == message


def test_a_client_gone_during_its_upload_gets_no_answer_and_no_error_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    messages = [
        {"type": "http.request", "body": b"a", "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass  # like the upload guard: the client went away, return without answering

    scope = {"type": "http", "method": "POST", "path": "/segment", "headers": []}
    with caplog.at_level(logging.INFO, logger="mitoseg.serving"):
        asyncio.run(DeadlineMiddleware(app, timeout_s=20)(scope, receive, send))
    assert sent == []
    assert not [r for r in caplog.records if r.name == "mitoseg.serving"]


def test_a_disconnect_after_the_response_does_not_cancel_the_apps_background_work() -> None:
    """uvicorn's receive() says http.disconnect once the response is complete; Starlette
    then still closes the upload's files in a background step, which must not be
    cancelled (it was: "Exception in ASGI application ... CancelledError" per request)."""
    finished: list[bool] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await _read_body(receive)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        for _ in range(20):  # background work after the response, as Starlette's
            await asyncio.sleep(0.005)
        finished.append(True)

    status, _, _ = drive(app, disconnect_after=0.0, timeout_s=5.0)
    assert status == 200
    assert finished == [True]
