"""Serving policy without a server: settings resolution, request cost, compute budget,
cross-request tile batching, and the ``mitoseg serve`` command line."""

from __future__ import annotations

import contextlib
import threading
import time

import numpy as np
import pytest

from mitoseg.config import ServeConfig
from mitoseg.inference.plan import InferencePlan
from mitoseg.serving.settings import (
    BatcherStopped,
    ComputeBudget,
    OverBudget,
    RequestCost,
    TileBatcher,
    request_cost,
    resolve_serve_config,
)

PLAN = InferencePlan.default_for(1, 16, flops_per_pixel=1e4)


# ----------------------------------------------------------------- settings


def test_serve_config_sources_defaults_stored_then_arguments() -> None:
    assert resolve_serve_config(None) == ServeConfig()
    stored = {"max_pages": 7, "tile_size": 256, "overlap": 0.5, "max_latency_ms": 60000}
    assert resolve_serve_config(stored) == ServeConfig(max_pages=7)  # retired keys ignored
    args = {"model_tag": "mitoseg-unet:abc", "max_pages": "9", "max_request_gflop": "12.5"}
    assert resolve_serve_config(stored, args) == ServeConfig(max_pages=9, max_request_gflop=12.5)


@pytest.mark.parametrize(
    ("stored", "args", "message"),
    [
        (
            {"max_pages": 0},
            {},
            "serve settings stored with the model: max_pages: Input should be greater than or "
            "equal to 1",
        ),
        (
            {},
            {"max_batch_size": "many"},
            "serve settings from Bento arguments: max_batch_size: Input should be a valid "
            "integer, unable to parse string as an integer",
        ),
        (
            {},
            {"max_request_gflop": "5000"},
            "serve settings from Bento arguments: max_request_gflop (5000) must not exceed "
            "max_inflight_gflop (4000)",
        ),
    ],
    ids=["stored", "argument", "request_above_inflight"],
)
def test_serve_config_errors_name_field_and_source(stored: dict, args: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        resolve_serve_config(stored, args)
    assert str(info.value) == message


# ----------------------------------------------------------------- cost and budget


@pytest.mark.parametrize(
    ("shape", "fields", "expected"),
    [
        ((512, 768), {}, RequestCost(3.93216, "GFLOP", "1 x 512 x 768 pixels x 10000 FLOP/pixel")),
        (
            (2, 100, 50),
            {"tta": True},
            RequestCost(0.8, "GFLOP", "2 x 100 x 50 pixels x 10000 FLOP/pixel x 8 (TTA)"),
        ),
        (
            (3, 1000, 1000),
            {"flops_per_pixel": None},
            RequestCost(3.0, "Mpixel", "3 x 1000 x 1000 pixels"),
        ),
        (
            (1, 500, 250),
            {"flops_per_pixel": None, "tta": True},
            RequestCost(1.0, "Mpixel", "1 x 500 x 250 pixels x 8 (TTA)"),
        ),
    ],
    ids=["gflop", "gflop_tta", "pixels", "pixels_tta"],
)
def test_request_cost(shape: tuple[int, ...], fields: dict, expected: RequestCost) -> None:
    cost = request_cost(shape, _plan(**fields))
    assert cost.unit == expected.unit and cost.detail == expected.detail
    assert cost.amount == pytest.approx(expected.amount)


def _plan(**fields: object) -> InferencePlan:
    data = PLAN.model_dump()
    data.update(fields)
    return InferencePlan.model_validate(data)


CFG = ServeConfig(
    max_request_gflop=10,
    max_inflight_gflop=15,
    max_request_mpixel=2,
    max_inflight_mpixel=3,
    retry_after_s=7,
)


@pytest.mark.parametrize(
    ("held", "cost", "status", "message"),
    [
        (
            None,
            RequestCost(12.5, "GFLOP", "2 x 512 x 768 pixels x 10000 FLOP/pixel"),
            413,
            "the request needs 12.5 GFLOP (2 x 512 x 768 pixels x 10000 FLOP/pixel); the limit "
            "per request is 10 GFLOP (serve.max_request_gflop): send fewer or smaller images",
        ),
        (
            None,
            RequestCost(2.5, "Mpixel", "1 x 2500 x 1000 pixels"),
            413,
            "the request needs 2.5 Mpixel (1 x 2500 x 1000 pixels); the limit per request is "
            "2 Mpixel (serve.max_request_mpixel): send fewer or smaller images",
        ),
        (
            RequestCost(9, "GFLOP", "held"),
            RequestCost(6.5, "GFLOP", "next"),
            429,
            "the server is busy: 9 GFLOP in flight, this request needs 6.5 GFLOP and the limit "
            "is 15 GFLOP (serve.max_inflight_gflop); retry after 7 s",
        ),
        (
            RequestCost(1.5, "Mpixel", "held"),
            RequestCost(1.75, "Mpixel", "next"),
            429,
            "the server is busy: 1.5 Mpixel in flight, this request needs 1.75 Mpixel and the "
            "limit is 3 Mpixel (serve.max_inflight_mpixel); retry after 7 s",
        ),
    ],
    ids=["too_costly_gflop", "too_costly_mpixel", "busy_gflop", "busy_mpixel"],
)
def test_budget_refusals(
    held: RequestCost | None, cost: RequestCost, status: int, message: str
) -> None:
    budget = ComputeBudget(CFG)
    holding = budget.admit(held) if held is not None else contextlib.nullcontext()
    with holding, pytest.raises(OverBudget) as info, budget.admit(cost):
        pass
    exc = info.value
    assert (exc.status, exc.code, exc.message) == (
        status,
        "too_costly" if status == 413 else "busy",
        message,
    )
    assert exc.to_json() == {"error": exc.code, "message": message, "status": status}
    assert exc.headers() == ({"Retry-After": "7"} if status == 429 else {})
    assert budget.in_flight("GFLOP") == budget.in_flight("Mpixel") == 0.0


def test_budget_is_released_on_errors_and_units_are_separate() -> None:
    budget = ComputeBudget(CFG)
    with (
        pytest.raises(RuntimeError, match="inference failed"),
        budget.admit(RequestCost(10, "GFLOP", "")),
    ):
        assert budget.in_flight("GFLOP") == 10
        raise RuntimeError("inference failed")
    assert budget.in_flight("GFLOP") == 0
    with (
        budget.admit(RequestCost(10, "GFLOP", "")),
        budget.admit(RequestCost(5, "GFLOP", "")),
        budget.admit(RequestCost(2, "Mpixel", "")),  # a different unit's budget
    ):
        assert (budget.in_flight("GFLOP"), budget.in_flight("Mpixel")) == (15, 2)
    assert budget.in_flight("GFLOP") == budget.in_flight("Mpixel") == 0


def test_budget_bounds_concurrency_across_threads() -> None:
    budget = ComputeBudget(CFG)
    inside = threading.Barrier(3)
    release = threading.Event()
    results: list[str] = []

    def request() -> None:
        try:
            with budget.admit(RequestCost(7, "GFLOP", "")):
                results.append("admitted")
                inside.wait(5)
                release.wait(5)
        except OverBudget as exc:
            results.append(exc.code)
            inside.wait(5)

    threads = [threading.Thread(target=request) for _ in range(2)]
    for t in threads:
        t.start()
    inside.wait(5)  # both threads have been admitted or refused
    assert sorted(results) == ["admitted", "admitted"]  # 7 + 7 <= 15
    with (
        pytest.raises(OverBudget, match=r"^the server is busy: 14 GFLOP in flight"),
        budget.admit(RequestCost(2, "GFLOP", "")),
    ):
        pass
    release.set()
    for t in threads:
        t.join(5)
    assert budget.in_flight("GFLOP") == 0


# ----------------------------------------------------------------- batching


class Engine:
    """A real batch predictor for tests: output = 2 * input + the batch's pass number,
    optionally held at the first call until released."""

    def __init__(self, hold_first: bool = False) -> None:
        self.batches: list[tuple[int, ...]] = []
        self.started = threading.Event()
        self.release = threading.Event()
        if not hold_first:
            self.release.set()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.batches.append(tuple(batch.shape))
        self.started.set()
        self.release.wait(10)
        return np.concatenate([batch * 2, batch * 0 + len(self.batches)], axis=-1)


def tiles(n: int, shape: tuple[int, int] = (4, 6), start: float = 0.0) -> list[np.ndarray]:
    return [np.full((*shape, 1), start + i, np.float32) for i in range(n)]


def test_lone_request_is_dispatched_at_once() -> None:
    engine = Engine()
    batcher = TileBatcher(engine, max_batch_size=16)
    try:
        batcher(tiles(1))  # warm the thread
        t = time.perf_counter()
        out = batcher(tiles(3))
        elapsed = time.perf_counter() - t
    finally:
        batcher.close()
    assert elapsed < 0.05, elapsed  # no batching window: nothing waits for company
    assert engine.batches == [(1, 4, 6, 1), (3, 4, 6, 1)]
    assert [o.shape for o in out] == [(4, 6, 2)] * 3
    np.testing.assert_array_equal([o[0, 0, 0] for o in out], [0.0, 2.0, 4.0])


def test_concurrent_requests_share_forward_passes_grouped_by_shape() -> None:
    engine = Engine(hold_first=True)
    batcher = TileBatcher(engine, max_batch_size=8)
    try:
        first = batcher.submit(tiles(2))
        assert engine.started.wait(5)  # the engine is busy with the first request
        a = batcher.submit(tiles(3, (4, 6), start=10))
        b = batcher.submit(tiles(2, (8, 4), start=20))  # another image's tile shape
        c = batcher.submit(tiles(5, (4, 6), start=30))  # only 3 of its tiles fit the pass
        engine.release.set()
        outs = [f.result(5) for f in (first, a, b, c)]
    finally:
        batcher.close()
    # pass 1: the first request; pass 2 (8 tiles): a(3) + c(3) of shape 4x6, b(2) of
    # shape 8x4 in a forward pass of its own; pass 3: the rest of c
    assert engine.batches == [(2, 4, 6, 1), (6, 4, 6, 1), (2, 8, 4, 1), (2, 4, 6, 1)]
    assert batcher.stats.max_requests_per_pass == 2
    assert batcher.stats.passes == 4 and batcher.stats.tiles == 12
    for out, start, n in zip(outs, (0, 10, 20, 30), (2, 3, 2, 5), strict=True):
        np.testing.assert_array_equal(
            [o[0, 0, 0] for o in out], [2 * (start + i) for i in range(n)]
        )
    assert [o.shape for o in outs[2]] == [(8, 4, 2)] * 2
    np.testing.assert_array_equal([o[0, 0, 1] for o in outs[3]], [2, 2, 2, 4, 4])


def test_engine_errors_reach_only_the_requests_in_that_pass() -> None:
    calls: list[int] = []

    def flaky(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("device lost")
        if len(calls) == 2:
            return batch[:1]  # wrong batch size
        return batch

    batcher = TileBatcher(flaky, max_batch_size=4)
    try:
        with pytest.raises(RuntimeError, match=r"^device lost$"):
            batcher(tiles(2))
        with pytest.raises(
            ValueError,
            match=r"^the engine returned shape \(1, 4, 6, 1\) for a batch of shape \(3, 4, 6, 1\)$",
        ):
            batcher(tiles(3))
        assert len(batcher(tiles(4))) == 4
        assert batcher([]) == []
        with pytest.raises(ValueError, match=r"^expected \(TH, TW, 1\) tiles, got a tile of shape"):
            batcher([np.zeros((4, 4), np.float32)])
    finally:
        assert batcher.alive  # what the runner's /readyz reports
        batcher.close()
    assert not batcher.alive
    with pytest.raises(RuntimeError, match=r"^the tile batcher is closed$"):
        batcher(tiles(1))
    with pytest.raises(ValueError, match=r"^max_batch_size must be >= 1, got 0$"):
        TileBatcher(flaky, max_batch_size=0)


def test_cancelled_requests_are_dropped_from_the_queue() -> None:
    engine = Engine(hold_first=True)
    slow = TileBatcher(engine, max_batch_size=2)
    try:
        first = slow.submit(tiles(2))
        assert engine.started.wait(10)  # the engine is busy with these
        gone = slow.submit(tiles(4))  # queued behind; its client went away
        assert gone.cancel()
        engine.release.set()
        assert len(first.result(10)) == 2
        assert len(slow(tiles(1))) == 1
    finally:
        slow.close()
    assert slow.stats.tiles == 3  # the cancelled request's 4 tiles never ran


def test_a_pixel_bound_caps_each_forward_pass_and_a_large_tile_runs_alone() -> None:
    engine = Engine(hold_first=True)
    # 4x6 tiles are 24 pixels: 2 fit 50; a 8x8 tile (64) exceeds the bound and runs alone
    batcher = TileBatcher(engine, max_batch_size=8, max_batch_pixels=50)
    try:
        first = batcher.submit(tiles(1))
        assert engine.started.wait(5)
        a = batcher.submit(tiles(3, (4, 6), start=10))
        big = batcher.submit(tiles(2, (8, 8), start=20))
        engine.release.set()
        outs = [f.result(5) for f in (first, a, big)]
    finally:
        batcher.close()
    assert engine.batches == [(1, 4, 6, 1), (2, 4, 6, 1), (1, 4, 6, 1), (1, 8, 8, 1), (1, 8, 8, 1)]
    np.testing.assert_array_equal([o[0, 0, 0] for o in outs[1]], [20.0, 22.0, 24.0])
    assert [o.shape for o in outs[2]] == [(8, 8, 2)] * 2
    with pytest.raises(ValueError, match=r"^max_batch_pixels must be >= 1, got 0$"):
        TileBatcher(engine, max_batch_size=2, max_batch_pixels=0)


def test_stop_fails_the_queued_requests_at_once_and_finishes_the_running_pass() -> None:
    engine = Engine(hold_first=True)
    batcher = TileBatcher(engine, max_batch_size=2)
    running = batcher.submit(tiles(3))  # 2 tiles in the running pass, 1 still queued
    assert engine.started.wait(5)
    queued = batcher.submit(tiles(2))
    t0 = time.perf_counter()
    batcher.stop("the server is shutting down")
    for future in (running, queued):
        with pytest.raises(BatcherStopped, match=r"^the server is shutting down$"):
            future.result(1)
    assert time.perf_counter() - t0 < 1.0  # nobody waited for the engine
    with pytest.raises(BatcherStopped, match=r"^the server is shutting down$"):
        batcher.submit(tiles(1))
    engine.release.set()
    batcher.close()
    assert not batcher.alive
    assert engine.batches == [(2, 4, 6, 1)]  # the running pass ended; nothing else ran


def _admit_in_thread(
    batcher: TileBatcher, pixels: int, log: list[str], name: str
) -> threading.Thread:
    """Enter ``batcher.admit(pixels)`` in a thread, log ``name`` (or the error's text)."""

    def run() -> None:
        try:
            with batcher.admit(pixels):
                log.append(name)
        except Exception as exc:
            log.append(f"{type(exc).__name__}: {exc}")

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_admit_holds_requests_back_before_their_tiles_exist() -> None:
    import concurrent.futures

    batcher = TileBatcher(Engine(), max_batch_size=4, max_inflight_pixels=100)
    log: list[str] = []
    try:
        with batcher.admit(60):
            waiter = _admit_in_thread(batcher, 50, log, "b in")
            time.sleep(0.3)
            assert log == []  # 60 + 50 > 100: b waits
            log.append("a out")
        waiter.join(5)
        assert log == ["a out", "b in"]
        with batcher.admit(500):  # larger than the bound: admitted alone
            gone = threading.Event()
            threading.Timer(0.3, gone.set).start()
            with (
                pytest.raises(concurrent.futures.CancelledError),
                batcher.admit(1, cancelled=gone.is_set),
            ):
                pass  # pragma: no cover (never admitted)
            stopped = _admit_in_thread(batcher, 1, log, "c in")
            time.sleep(0.3)
            batcher.stop("the server is shutting down")
            stopped.join(5)
        assert log[2:] == ["BatcherStopped: the server is shutting down"]
    finally:
        batcher.close()
    with pytest.raises(ValueError, match=r"^max_inflight_pixels must be >= 1, got 0$"):
        TileBatcher(Engine(), max_batch_size=2, max_inflight_pixels=0)


def test_on_pass_reports_tiles_and_requests() -> None:
    seen: list[tuple[int, int]] = []
    batcher = TileBatcher(Engine(), max_batch_size=4, on_pass=lambda t, r: seen.append((t, r)))
    try:
        batcher(tiles(6))
    finally:
        batcher.close()
    assert seen == [(4, 1), (2, 1)]


# ----------------------------------------------------------------- mitoseg serve


def test_serve_command_passes_bento_arguments() -> None:
    import sys

    from mitoseg.cli.serve import GRACEFUL_SHUTDOWN_S, SERVICE, serve_command

    cmd = serve_command("mitoseg-unet:abc", ServeConfig(max_pages=3), "0.0.0.0", 3001)
    assert cmd[:5] == [sys.executable, "-m", "bentoml", "serve", SERVICE]
    assert cmd[5:10] == ["--host", "0.0.0.0", "--port", "3001", "--timeout-graceful-shutdown"]
    assert cmd[10] == str(GRACEFUL_SHUTDOWN_S)
    args = dict(a.split("=", 1) for a in cmd[12::2])
    assert cmd[11::2] == ["--arg"] * len(args)
    assert args["model_tag"] == "mitoseg-unet:abc"
    assert resolve_serve_config({}, args) == ServeConfig(max_pages=3)


#: A stand-in for BentoML's arbiter: starts a "worker" in a session of its own that
#: ignores SIGTERM, writes its pid once the worker ignores SIGTERM (a slow start on a
#: loaded machine must not let a stop signal reach it first), then exits on SIGTERM (or
#: by itself after argv[2] s) with status 3, leaving the worker behind.
ARBITER = r"""
import signal, subprocess, sys, time
worker = subprocess.Popen(
    [sys.executable, "-c",
     "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
     "print('ready', flush=True); time.sleep(60)"],
    start_new_session=True, stdout=subprocess.PIPE, text=True,
)
assert worker.stdout.readline().strip() == "ready"
signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))
open(sys.argv[1], "w").write(str(worker.pid))
time.sleep(float(sys.argv[2]))
sys.exit(3)
"""


@pytest.mark.parametrize("stop", ["sigterm", "child_exits"])
def test_supervise_forwards_stop_signals_and_leaves_no_process(tmp_path, stop: str) -> None:
    import signal
    import subprocess
    import sys

    import psutil

    pidfile = tmp_path / "worker.pid"
    lifetime = "60" if stop == "sigterm" else "0.5"
    child = [sys.executable, "-c", ARBITER, str(pidfile), lifetime]
    code = (
        "import os, sys; from mitoseg.cli.serve import supervise; "
        f"sys.exit(supervise({child!r}, dict(os.environ), deadline_s=1.0))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (pidfile.exists() and pidfile.read_text()):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        worker = psutil.Process(int(pidfile.read_text()))
        start = time.monotonic()
        if stop == "sigterm":
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 3  # the child's status
        elapsed = time.monotonic() - start
        assert elapsed < 5, elapsed
        gone = not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE
        assert gone, "the worker the child left behind is still running"
        # the worker ignored SIGTERM: its kill is reported, naming it
        stderr = proc.stderr.read() if proc.stderr else ""
        why = "1 s after the stop signal" if stop == "sigterm" else "after bentoml serve exited"
        assert f"process(es) still running {why}, killed: " in stderr, stderr
        assert f"{worker.pid} (" in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
        if pidfile.exists() and psutil.pid_exists(int(pidfile.read_text())):
            psutil.Process(int(pidfile.read_text())).kill()


# ----------------------------------------------------------------- service module

SERVICE_PROBE = r"""
import json, sys
import bentoml
import mitoseg.serving.service as service
from mitoseg.inference.plan import PLAN_FILE, InferencePlan

out = {"heavy_at_import": sorted(m for m in ("keras", "tensorflow") if m in sys.modules)}
out["store_at_import"] = __import__("os").path.exists(sys.argv[1] + "/models")
out["default_tag"] = str(service.MODEL_REF.tag)
try:
    service.load_deployment(bentoml.models.BentoModel("mitoseg-unet:nothere"))
except Exception as exc:
    out["missing"] = f"{type(exc).__name__}: {exc}"
meta = {"serve": {"max_pages": 3, "tile_size": 256, "max_latency_ms": 1}, "name": "m"}
with bentoml.models.create("mitoseg-unet", metadata=meta) as bm:
    pass
try:
    service.load_deployment(bentoml.models.BentoModel(str(bm.tag)))
except Exception as exc:
    text = f"{type(exc).__name__}: {exc}"
    text = text.replace(bentoml.models.get(bm.tag).path, "<dir>")
    out["no_plan"] = text.replace(str(bm.tag), "<tag>")
plan = InferencePlan.default_for(1, 16, flops_per_pixel=5.0)
with bentoml.models.create("mitoseg-unet", metadata=meta) as bm:
    plan.write(bm.path + "/" + PLAN_FILE)
d = service.load_deployment(bentoml.models.BentoModel(str(bm.tag)))
out["loaded"] = [d.tag == str(bm.tag), d.plan == plan, d.metadata["name"], d.serve.max_pages]
print(json.dumps(out))
"""


def test_service_module_reads_no_store_at_import_and_loads_the_plan_at_start(tmp_path) -> None:
    import json
    import os
    import subprocess
    import sys

    home = tmp_path / "bentoml"
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
    env.pop("MITOSEG_BENTO_MODEL", None)
    res = subprocess.run(
        [sys.executable, "-c", SERVICE_PROBE, str(home)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["heavy_at_import"] == [] and out["store_at_import"] is False
    assert out["default_tag"] == "mitoseg-unet:latest"
    assert out["missing"] == (
        "NotFound: model mitoseg-unet:nothere is not in the BentoML model store; import one "
        "with `mitoseg bento build` or `mitoseg serve`"
    )
    assert out["no_plan"] == (
        "DataError: <dir>/inference_plan.json: inference plan not found; model <tag> was "
        "imported without a valid inference plan: import it again with `mitoseg serve` or "
        "`mitoseg bento build`"
    )
    assert out["loaded"] == [True, True, "m", 3]  # retired serve keys are ignored
