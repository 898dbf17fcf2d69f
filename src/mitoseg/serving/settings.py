"""Serving policy shared by the service, the benchmark and the tests (pure Python + numpy).

* :func:`resolve_serve_config`: the ``serve:`` settings a service runs with (defaults,
  then what the model was imported with, then Bento arguments).
* :func:`request_cost` and :class:`ComputeBudget`: what one request may cost and how
  much may be in flight at once (413 / 429 with ``Retry-After``).
* :class:`TileBatcher`: greedy batching of the tile lists of concurrent requests into
  forward passes, grouped by tile shape.

Nothing here imports BentoML or TensorFlow.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np
from pydantic import BaseModel, ValidationError

from mitoseg.config import ServeConfig
from mitoseg.inference.plan import InferencePlan
from mitoseg.serving.codec import UploadError

__all__ = [
    "BatchStats",
    "BatcherStopped",
    "ComputeBudget",
    "OverBudget",
    "RequestCost",
    "TileBatcher",
    "request_cost",
    "resolve_serve_config",
    "settings_from",
]


M = TypeVar("M", bound=BaseModel)


def settings_from(
    model: type[M],
    arguments: Mapping[str, Any] | None,
    environ: Mapping[str, str] | None,
    arg_prefix: str,
    env_prefix: str,
    convert: Callable[[str, Any], Any] | None = None,
) -> tuple[M, dict[str, str]]:
    """Service settings from Bento arguments ``<arg_prefix><field>`` over environment
    variables ``<env_prefix><FIELD>`` (empty strings count as unset).

    Args:
        model: the pydantic settings model.
        arguments: the Bento arguments (None: none).
        environ: the environment (None: ``os.environ``).
        arg_prefix: e.g. ``"volume_"``.
        env_prefix: e.g. ``"MITOSEG_VOLUME_"``.
        convert: ``convert(field, value)`` applied to each given value, e.g. to split a
            comma-separated list.

    Returns:
        ``(settings, source)``: ``source`` names the argument or variable each given
        field came from, for messages.

    Raises:
        ValueError: an invalid value; the message names its argument or variable.
    """
    import os

    env = os.environ if environ is None else environ
    args = arguments or {}
    data: dict[str, Any] = {}
    source: dict[str, str] = {}
    for name in model.model_fields:
        var, arg = f"{env_prefix}{name.upper()}", f"{arg_prefix}{name}"
        for key, value in ((var, env.get(var)), (arg, args.get(arg))):
            if value is not None and value != "":
                data[name] = convert(name, value) if convert else value
                source[name] = key
    try:
        return model.model_validate(data), source
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else ""
        raise ValueError(f"{source.get(field, field)}: {err['msg']}") from None


logger = logging.getLogger("mitoseg.serving")

#: Compute multiplier of 8-fold test-time augmentation.
TTA_FACTOR = 8


# ----------------------------------------------------------------- configuration


def resolve_serve_config(
    stored: Mapping[str, Any] | None, arguments: Mapping[str, Any] | None = None
) -> ServeConfig:
    """The ``serve:`` settings of a running service.

    Later sources win, field by field: :class:`~mitoseg.config.ServeConfig` defaults, the
    ``serve`` settings stored with the imported model (``stored``; fields this version
    does not know, such as the retired ``tile_size``, are ignored), then Bento arguments
    named like the fields (``bentoml serve ... --arg max_request_gflop=500``; strings
    are converted). Other arguments (``model_tag``) are ignored.

    Raises:
        ValueError: an invalid value (the message names the field and its source).
    """
    known = set(ServeConfig.model_fields)
    data: dict[str, Any] = {k: v for k, v in (stored or {}).items() if k in known}
    overrides = {k: v for k, v in (arguments or {}).items() if k in known}
    try:
        ServeConfig.model_validate(data)
    except ValidationError as exc:
        raise ValueError(f"serve settings stored with the model: {_errors(exc)}") from None
    try:
        return ServeConfig.model_validate({**data, **overrides})
    except ValidationError as exc:
        raise ValueError(f"serve settings from Bento arguments: {_errors(exc)}") from None


def _errors(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        msg = str(err["msg"]).removeprefix("Value error, ")
        loc = ".".join(str(x) for x in err["loc"])
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


# ----------------------------------------------------------------- compute budget


class OverBudget(UploadError):
    """A request refused by the compute budget: 413 (too costly) or 429 (busy).

    Attributes:
        retry_after: seconds for the ``Retry-After`` header of a 429, else None.
    """

    def __init__(self, status: int, code: str, message: str, retry_after: int | None = None):
        super().__init__(status, code, message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        """Extra response headers (``Retry-After`` for a 429)."""
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}


@dataclass(frozen=True)
class RequestCost:
    """The compute one request needs.

    Attributes:
        amount: cost in ``unit``.
        unit: ``GFLOP`` (the plan knows ``flops_per_pixel``) or ``Mpixel``.
        detail: how it was computed, for messages, e.g. ``"2 x 512 x 768 pixels x 1e+04
            FLOP/pixel"``.
    """

    amount: float
    unit: Literal["GFLOP", "Mpixel"]
    detail: str


def request_cost(shape: tuple[int, ...], plan: InferencePlan) -> RequestCost:
    """Cost of segmenting a ``(Z, H, W)`` (or ``(H, W)``) upload with ``plan``.

    ``Z * H * W * plan.flops_per_pixel`` FLOP (x8 with ``plan.tta``) in GFLOP; with no
    ``flops_per_pixel`` in the plan, ``Z * H * W`` pixels (x8 with TTA) in Mpixel.
    """
    dims = [int(s) for s in shape]
    if len(dims) == 2:
        dims = [1, *dims]
    pixels = int(np.prod(dims))
    factor = TTA_FACTOR if plan.tta else 1
    where = " x ".join(str(d) for d in dims) + " pixels"
    tta = f" x {TTA_FACTOR} (TTA)" if plan.tta else ""
    if plan.flops_per_pixel is None:
        return RequestCost(pixels * factor / 1e6, "Mpixel", where + tta)
    flops = pixels * float(plan.flops_per_pixel) * factor
    return RequestCost(flops / 1e9, "GFLOP", f"{where} x {plan.flops_per_pixel:g} FLOP/pixel{tta}")


def _num(x: float) -> str:
    return f"{x:.4g}"


class ComputeBudget:
    """Admission control: the cost of one request, and of all requests in flight.

    Thread-safe; one per service worker process.

    Args:
        cfg: ``serve:`` settings (``max_request_*``, ``max_inflight_*``, ``retry_after_s``).
    """

    def __init__(self, cfg: ServeConfig) -> None:
        self._limits = {
            "GFLOP": (cfg.max_request_gflop, cfg.max_inflight_gflop, "gflop"),
            "Mpixel": (cfg.max_request_mpixel, cfg.max_inflight_mpixel, "mpixel"),
        }
        self._retry_after = cfg.retry_after_s
        self._lock = threading.Lock()
        self._inflight = {"GFLOP": 0.0, "Mpixel": 0.0}

    def in_flight(self, unit: str) -> float:
        """Cost currently admitted and not yet released, in ``unit``."""
        with self._lock:
            return self._inflight[unit]

    @contextlib.contextmanager
    def admit(self, cost: RequestCost) -> Iterator[None]:
        """Hold ``cost`` of the budget for the duration of the ``with`` block.

        Raises:
            OverBudget: 413 ``too_costly`` when ``cost`` exceeds the per-request limit;
                429 ``busy`` (with ``retry_after``) when the requests in flight plus this
                one would exceed the in-flight limit.
        """
        request_limit, inflight_limit, key = self._limits[cost.unit]
        unit = cost.unit
        if cost.amount > request_limit:
            raise OverBudget(
                413,
                "too_costly",
                f"the request needs {_num(cost.amount)} {unit} ({cost.detail}); the limit "
                f"per request is {_num(request_limit)} {unit} (serve.max_request_{key}): "
                "send fewer or smaller images",
            )
        with self._lock:
            busy = self._inflight[unit]
            if busy + cost.amount > inflight_limit:
                raise OverBudget(
                    429,
                    "busy",
                    f"the server is busy: {_num(busy)} {unit} in flight, this request needs "
                    f"{_num(cost.amount)} {unit} and the limit is {_num(inflight_limit)} "
                    f"{unit} (serve.max_inflight_{key}); retry after {self._retry_after} s",
                    retry_after=self._retry_after,
                )
            self._inflight[cost.unit] = busy + cost.amount
        try:
            yield
        finally:
            with self._lock:
                left = self._inflight[cost.unit] - cost.amount
                self._inflight[cost.unit] = left if left > 1e-9 else 0.0


# ----------------------------------------------------------------- batching


class BatcherStopped(RuntimeError):
    """The tile batcher takes no more work (closed, or stopped at shutdown)."""


@dataclass
class _Job:
    tiles: list[np.ndarray]
    future: Future[list[np.ndarray]]
    results: list[np.ndarray | None]
    taken: int = 0
    done: int = 0


@dataclass
class BatchStats:
    """What the batcher has done so far.

    Attributes:
        passes: forward passes run.
        tiles: tiles predicted.
        max_requests_per_pass: most caller requests whose tiles shared one pass.
        max_tiles_per_pass: largest forward pass, tiles.
    """

    passes: int = 0
    tiles: int = 0
    max_requests_per_pass: int = 0
    max_tiles_per_pass: int = 0


class TileBatcher:
    """Greedy cross-request batching of tiles for one model engine.

    Callers (one per request thread) submit a list of ``(TH, TW, 1)`` tiles and block
    until their outputs are ready. One engine thread takes the queued tiles in arrival
    order, up to ``max_batch_size`` of them and up to ``max_batch_pixels`` tile pixels
    (a larger tile runs alone), groups them by shape (tiles of different images may
    differ) and runs one forward pass per shape. It never waits for a batch to fill:
    when the engine is idle a request is dispatched at once; while it is busy, the tiles
    of concurrent requests queue up and form the next, larger batch. The pixel bound
    caps the engine's working memory, which grows with the batch (OpenVINO keeps the
    buffers of the largest pass it has run: about 240 bytes per tile pixel for the
    default UNet in bf16) while a CPU gains no throughput from large tiles batched.

    Args:
        predict: ``(B, TH, TW, 1) float32 -> (B, TH, TW, C) float32``, e.g.
            :func:`mitoseg.inference.runtime.predictor_for_plan`; called from the engine thread
            only, one call at a time.
        max_batch_size: most tiles per forward pass.
        max_batch_pixels: most tile pixels (``TH * TW`` summed) per forward pass; a
            single larger tile runs alone. None: no bound.
        max_inflight_pixels: most image pixels of the requests admitted by
            :meth:`admit` at once (a larger request is admitted alone); None: no bound.
        on_pass: called after each forward pass with ``(tiles, requests)``, e.g. for
            metrics; exceptions from it are logged and ignored.
        name: engine thread name.
    """

    def __init__(
        self,
        predict: Callable[[np.ndarray], np.ndarray],
        max_batch_size: int,
        *,
        max_batch_pixels: int | None = None,
        max_inflight_pixels: int | None = None,
        on_pass: Callable[[int, int], None] | None = None,
        name: str = "mitoseg-engine",
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_batch_pixels is not None and max_batch_pixels < 1:
            raise ValueError(f"max_batch_pixels must be >= 1, got {max_batch_pixels}")
        self._predict = predict
        self.max_batch_size = int(max_batch_size)
        self.max_batch_pixels = None if max_batch_pixels is None else int(max_batch_pixels)
        if max_inflight_pixels is not None and max_inflight_pixels < 1:
            raise ValueError(f"max_inflight_pixels must be >= 1, got {max_inflight_pixels}")
        self.max_inflight_pixels = max_inflight_pixels
        self._admitted = 0
        self._on_pass = on_pass
        self._queue: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._reason = "the tile batcher is closed"
        self.stats = BatchStats()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def __call__(self, tiles: list[np.ndarray]) -> list[np.ndarray]:
        """Predict ``tiles``; blocks until done.

        Args:
            tiles: ``(TH, TW, 1)`` float32 arrays (shapes may differ).

        Returns:
            One ``(TH, TW, C)`` float32 array per tile, in order.

        Raises:
            ValueError: a tile is not 3D.
            BatcherStopped: the batcher is closed or stopped (a ``RuntimeError``).
            Exception: whatever the engine raised for a batch holding these tiles.
        """
        return self.submit(tiles).result()

    def submit(self, tiles: list[np.ndarray]) -> Future[list[np.ndarray]]:
        """Queue ``tiles``; returns a future of their outputs (see :meth:`__call__`)."""
        arrays = [np.asarray(t, dtype=np.float32) for t in tiles]
        for t in arrays:
            if t.ndim != 3:
                raise ValueError(f"expected (TH, TW, 1) tiles, got a tile of shape {t.shape}")
        future: Future[list[np.ndarray]] = Future()
        if not arrays:
            future.set_result([])
            return future
        with self._cond:
            if self._closed:
                raise BatcherStopped(self._reason)
            self._queue.append(_Job(arrays, future, [None] * len(arrays)))
            self._cond.notify()
        return future

    @contextlib.contextmanager
    def admit(self, pixels: int, cancelled: Callable[[], bool] | None = None) -> Iterator[None]:
        """Backpressure before a request makes its float tiles: hold ``pixels`` (the
        request's image pixels) of ``max_inflight_pixels`` for the ``with`` block,
        waiting while the requests admitted already hold too many (a request is always
        admitted when none is). Waiting requests keep only their raw slices, so the
        normalised copies, padded images and tiles of at most about
        ``max_inflight_pixels`` exist at once however many clients there are.

        Args:
            pixels: the request's pixels (``Z * H * W``).
            cancelled: polled while waiting; True ends the wait (the client went away).

        Raises:
            concurrent.futures.CancelledError: ``cancelled()`` became True while waiting.
            BatcherStopped: the batcher was closed or stopped.
        """
        from concurrent.futures import CancelledError

        limit = self.max_inflight_pixels
        with self._cond:
            while limit is not None and self._admitted and self._admitted + pixels > limit:
                if self._closed:
                    raise BatcherStopped(self._reason)
                if cancelled is not None and cancelled():
                    raise CancelledError()
                self._cond.wait(0.2)
            if self._closed:
                raise BatcherStopped(self._reason)
            self._admitted += pixels
        try:
            yield
        finally:
            with self._cond:
                self._admitted -= pixels
                self._cond.notify_all()

    @property
    def alive(self) -> bool:
        """True while the engine thread runs and the batcher takes work."""
        return self._thread.is_alive() and not self._closed

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop the engine thread after the queued work; later submits fail."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def stop(self, reason: str) -> None:
        """Stop at once: every queued request fails with ``BatcherStopped(reason)``, the
        engine thread ends after the forward pass it is running, later submits fail.
        Used at shutdown, so that no request waits for a queue to drain."""
        with self._cond:
            self._closed = True
            self._reason = reason
            queued = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in queued:
            if not job.future.done():
                job.future.set_exception(BatcherStopped(reason))

    def _take(self) -> list[tuple[_Job, int]]:
        """Pop up to ``max_batch_size`` queued tiles (and ``max_batch_pixels``; at least
        one tile) as ``(job, index)`` (lock held)."""
        taken: list[tuple[_Job, int]] = []
        pixels = 0
        limit = self.max_batch_pixels
        while self._queue and len(taken) < self.max_batch_size:
            job = self._queue[0]
            tile = job.tiles[job.taken]
            size = int(tile.shape[0]) * int(tile.shape[1])
            if taken and limit is not None and pixels + size > limit:
                break
            taken.append((job, job.taken))
            pixels += size
            job.taken += 1
            if job.taken == len(job.tiles):
                self._queue.popleft()
        return taken

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                taken = self._take()
            self._run_batch([(job, i) for job, i in taken if not job.future.done()])

    def _run_batch(self, taken: list[tuple[_Job, int]]) -> None:
        if not taken:
            return
        groups: dict[tuple[int, ...], list[tuple[_Job, int]]] = {}
        for job, i in taken:
            groups.setdefault(job.tiles[i].shape, []).append((job, i))
        for members in groups.values():
            batch = np.stack([job.tiles[i] for job, i in members])
            try:
                out = np.asarray(self._predict(batch), dtype=np.float32)
                if out.ndim != 4 or out.shape[0] != len(members):
                    raise ValueError(
                        f"the engine returned shape {tuple(out.shape)} for a batch of shape "
                        f"{tuple(batch.shape)}"
                    )
            except Exception as exc:
                for job, _ in members:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            requests = {id(job) for job, _ in members}
            self._record(len(members), len(requests))
            for (job, i), o in zip(members, out, strict=True):
                if job.future.done():
                    continue
                job.results[i] = o
                job.done += 1
                if job.done == len(job.tiles):
                    job.future.set_result([r for r in job.results if r is not None])

    def _record(self, tiles: int, requests: int) -> None:
        s = self.stats
        s.passes += 1
        s.tiles += tiles
        s.max_requests_per_pass = max(s.max_requests_per_pass, requests)
        s.max_tiles_per_pass = max(s.max_tiles_per_pass, tiles)
        if self._on_pass is not None:
            try:
                self._on_pass(tiles, requests)
            except Exception:
                logger.exception("tile batcher: the on_pass callback failed")
