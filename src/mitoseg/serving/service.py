"""BentoML 1.4 service: mitochondria segmentation over HTTP.

Two services, one process each under ``bentoml serve``:

* :class:`UNetRunner` holds the model on the engine its inference plan names, built
  once (:func:`load_predictor`: a plan on OpenVINO compiles the model saved at import
  without importing TensorFlow; a Keras plan goes through
  :func:`mitoseg.inference.runtime.predictor_for_plan`; ``resources={"gpu": 1}``:
  TensorFlow uses the GPU when the machine has one, the CPU otherwise) and exposes
  ``segment_classes``: a decoded ``(Z, H, W)`` stack -> ``(Z, H, W)`` uint8 classes, by
  the one inference implementation, :func:`mitoseg.inference.predict.segment_stack`, with the
  model's plan (only raw slices and uint8 classes cross the process boundary, not float
  tiles). Its :class:`~mitoseg.serving.settings.TileBatcher`
  merges the tiles of concurrent requests into forward passes of up to
  ``serve.max_batch_size`` tiles and ``serve.max_batch_mpixel`` tile pixels (the
  engine's memory grows with the pass), one pass per tile shape (tiles of different
  images may differ), and never waits for a batch to fill: an idle engine runs a
  request at once. On SIGTERM/SIGINT the queued tiles are failed at once (JSON 503),
  so the worker stops without draining the queue (:func:`stop_on_signals`). (BentoML's
  own adaptive batcher, ``bentoml/_internal/marshal/dispatcher.py``,
  concatenates inputs into one array, and its cork delays lone requests while it
  trains its latency model and whenever its measured queue wait is high; it has no
  setting to dispatch an idle queue at once.)
* :class:`MitoSeg` is the public API. It decodes and validates uploads
  (:mod:`mitoseg.serving.codec`; TIFF and PNG are recognised by their bytes, whatever
  content type the client sent), prices each request against the compute budget
  (:class:`~mitoseg.serving.settings.ComputeBudget`: 413 above ``serve.max_request_*``,
  429 with ``Retry-After`` above ``serve.max_inflight_*``) and hands the decoded stack
  to the runner.

Endpoints (all ``POST``; uploads are multipart ``image`` file fields):
``/segment`` (one TIFF/PNG -> PNG or TIFF mask, ``format`` field), ``/segment_stack``
(multi-page TIFF -> multi-page TIFF), ``/stats`` (object count, area fraction,
per-object area and centroid), ``/preview`` (the upload as an 8-bit PNG), ``/metadata``
(model lineage, plan, limits), the task ``/segment_volume`` (``@bentoml.task``: a
volume job from an input URI to an output URI, :mod:`mitoseg.serving.jobs`; no voxel
travels over HTTP) and ``/volume_progress`` (its blocks done / total). ``GET /ui/`` is
a web page on these (:mod:`mitoseg.serving.web`): upload or pick a sample, see the mask
overlaid, the count and the measurement table, download the mask. BentoML adds
``/livez``, ``/readyz``, ``/metrics`` and the OpenAPI page (``/``, also ``/docs``) with
``/docs.json``. Every client error is a JSON 4xx ``{"error": code, "message": ...,
"status": ...}`` logged as one WARNING line (:mod:`mitoseg.serving.middleware`). With
``MITOSEG_API_TOKEN`` set, everything but health, readiness and docs needs
``Authorization: Bearer <token>``.

The model comes from the BentoML model store: Bento argument ``model_tag``, else
``$MITOSEG_BENTO_MODEL``, else ``mitoseg-unet:latest``; imported by
:func:`mitoseg.serving.bento.import_model` with its inference plan
(``inference_plan.json``) beside ``model.keras``. The plan decides how the model runs
(tiles, halo, threshold, normalisation, engine); the ``serve:`` limits are those stored
with the model, overridden by Bento arguments of the same names
(:func:`~mitoseg.serving.settings.resolve_serve_config`). Nothing is read from the store
at import time: both services resolve the model in ``__init__``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any, Literal

import bentoml
import numpy as np
from starlette.responses import JSONResponse, Response

from mitoseg.config import ServeConfig
from mitoseg.inference.plan import PLAN_FILE, InferencePlan
from mitoseg.inference.predict import mask_to_image
from mitoseg.serving.analysis import mask_stats
from mitoseg.serving.bento import BENTO_MODEL_NAME, MODEL_FILE, MODEL_TAG_ENV
from mitoseg.serving.codec import (
    Limits,
    UploadError,
    decode_upload,
    encode_png,
    encode_tiff,
    probe_upload,
)
from mitoseg.serving.deadline import (
    DeadlineMiddleware,
    RequestClock,
    current_request,
    waiting_for,
)
from mitoseg.serving.jobs import (
    JobError,
    JobRunner,
    VolumeJobRequest,
    VolumeSubmitGuard,
    job_progress,
    model_loader,
    resolve_job_settings,
)
from mitoseg.serving.middleware import GuardMiddleware, install_client_error_filter
from mitoseg.serving.monitoring import (
    current_drift_summary,
    drift_app,
    runner_monitor,
    service_monitor,
)
from mitoseg.serving.settings import (
    BatcherStopped,
    ComputeBudget,
    OverBudget,
    TileBatcher,
    request_cost,
    resolve_serve_config,
)
from mitoseg.serving.web import UI_PATH, ui_app

logger = logging.getLogger("mitoseg.serving")

#: Environment variable holding the optional API token.
TOKEN_ENV = "MITOSEG_API_TOKEN"
#: Retries of a runner call whose pooled connection was closed under it (only while the
#: runner answers its readiness probe: a runner that died mid-request is a 503 at once).
RUNNER_RETRIES = 2
#: Seconds the runner gets to answer a readiness probe (``/readyz``, and after a dropped
#: connection).
READY_PROBE_S = 2.0
#: Name of the runner service, for messages.
RUNNER_NAME = "mitoseg-unet-runner"
#: BentoML's client to the runner renews its HTTP session after ``max_requests`` calls or
#: ``max_age`` seconds, closing the old one under the calls still in flight on it; the
#: runner is a local socket, so the session is kept.
RUNNER_CONNECTION = {"max_requests": 2**31 - 1, "max_age": 10.0 * 365 * 24 * 3600}
#: Slack for multipart framing on top of ``serve.max_bytes`` for the whole request body.
MULTIPART_SLACK = 1024 * 1024
#: Threads of each service: concurrent requests in the API, concurrent calls in the runner.
THREADS = 32
#: Route of the volume job task (``/submit``, ``/status``, ``/get`` below it).
VOLUME_ROUTE = "/segment_volume"


def _jobs_running() -> int:
    """Volume jobs running in this process's service instance (the submit guard's 429);
    BentoML holds the instance (``bentoml.get_current_service``), 0 before it exists."""
    try:
        service = bentoml.get_current_service()
    except bentoml.exceptions.BentoMLException:
        return 0
    jobs = getattr(service, "jobs", None)
    return jobs.running() if jobs is not None else 0


def _arguments() -> dict[str, Any]:
    """The Bento arguments (``bentoml serve --arg k=v``, or stored in a built Bento)."""
    return dict(vars(bentoml.use_arguments()))


def _model_tag() -> str:
    """The model to serve: Bento argument ``model_tag`` (baked in by ``mitoseg bento
    build``, passed by ``mitoseg serve``), else ``$MITOSEG_BENTO_MODEL``, else the latest
    ``mitoseg-unet``."""
    return (
        _arguments().get("model_tag")
        or os.environ.get(MODEL_TAG_ENV)
        or f"{BENTO_MODEL_NAME}:latest"
    )


#: Lazy reference: resolved against the store only when a service starts.
MODEL_REF = bentoml.models.BentoModel(_model_tag())


@dataclass(frozen=True)
class Deployment:
    """The model a service process runs, read from the BentoML model store.

    Attributes:
        tag: the resolved model tag, e.g. ``mitoseg-unet:abc123``.
        path: the model directory (``model.keras``, ``inference_plan.json``).
        metadata: lineage metadata recorded by ``import_model``.
        plan: the model's inference plan.
        serve: effective ``serve:`` settings.
    """

    tag: str
    path: Path
    metadata: dict[str, Any]
    plan: InferencePlan
    serve: ServeConfig


def load_deployment(model_ref: Any) -> Deployment:
    """Resolve ``model_ref`` (a ``bentoml.models.BentoModel`` reference; on an instance,
    ``self.model_ref`` is already the resolved model, so pass ``type(self).model_ref``)
    in the local model store and read its metadata and plan.

    Raises:
        bentoml.exceptions.NotFound: the model is not in the store.
        mitoseg.io.DataError: the model has no valid ``inference_plan.json``.
        ValueError: invalid ``serve`` settings (stored or Bento arguments).
    """
    from mitoseg.io import DataError

    stored = model_ref.stored
    if stored is None:
        raise bentoml.exceptions.NotFound(
            f"model {model_ref.tag} is not in the BentoML model store; import one with "
            "`mitoseg bento build` or `mitoseg serve`"
        )
    path = Path(stored.path)
    try:
        plan = InferencePlan.read(Path(stored.path_of(PLAN_FILE)))
    except DataError as exc:
        raise DataError(
            f"{exc}; model {stored.tag} was imported without a valid inference plan: "
            "import it again with `mitoseg serve` or `mitoseg bento build`"
        ) from None
    metadata = dict(stored.info.metadata)
    serve = resolve_serve_config(metadata.get("serve"), _arguments())
    return Deployment(str(stored.tag), path, metadata, plan, serve)


def load_predictor(deployment: Deployment) -> Any:
    """The batch predictor of the deployed model on its plan's engine.

    A plan on OpenVINO runs the model saved at import
    (:data:`~mitoseg.inference.runtime.OPENVINO_FILE`), compiled without importing
    TensorFlow; otherwise (a Keras plan, or a model imported before the OpenVINO model
    was saved with it) the Keras model is loaded and compiled by
    :func:`~mitoseg.inference.runtime.predictor_for_plan`.
    """
    from mitoseg.inference.runtime import OPENVINO_FILE, predictor_from_openvino

    plan = deployment.plan
    saved = deployment.path / OPENVINO_FILE
    if plan.runtime == "openvino" and saved.is_file():
        return predictor_from_openvino(saved, plan)
    import keras

    import mitoseg.model.unet  # noqa: F401  (registers custom objects, if any)
    from mitoseg.inference.runtime import predictor_for_plan

    model = keras.saving.load_model(deployment.path / MODEL_FILE, compile=False)
    return predictor_for_plan(model, plan)


def stop_on_signals(batcher: TileBatcher) -> None:
    """On SIGTERM or SIGINT, fail the tiles queued in ``batcher`` at once (their
    requests get a JSON 503), then hand the signal on to the server's own handler.

    Uvicorn's graceful shutdown waits for the requests in flight; without this, a queue
    of requests waiting for the engine (16 clients: about 16 forward passes) holds the
    worker for that long after the signal, past the stop deadline of ``mitoseg serve``
    and of container runtimes, which then kill it. Installed from the service's
    ``__init__``, which BentoML runs inside uvicorn's signal capture (on the main thread
    only: signal handlers cannot be set elsewhere).
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)

        def handler(signum: int, frame: Any, previous: Any = previous) -> None:
            # not here: the handler interrupts the main thread at any bytecode
            reason = "the server is shutting down"
            threading.Thread(target=batcher.stop, args=(reason,), daemon=True).start()
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:
                signal.signal(signum, signal.SIG_DFL)
                signal.raise_signal(signum)

        signal.signal(sig, handler)


@bentoml.service(
    name=RUNNER_NAME,
    resources={"gpu": 1},
    workers=1,
    threads=THREADS,
    traffic={"timeout": 600},
    runner_connection=RUNNER_CONNECTION,
)
class UNetRunner:
    """The model on its plan's engine, behind a cross-request tile batcher."""

    model_ref = MODEL_REF

    def __init__(self) -> None:
        install_client_error_filter()
        self.deployment = load_deployment(type(self).model_ref)
        predict = load_predictor(self.deployment)
        self._tiles_hist = bentoml.metrics.Histogram(
            name="mitoseg_batch_tiles",
            documentation="Tiles per forward pass of the model",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
        )
        self._requests_hist = bentoml.metrics.Histogram(
            name="mitoseg_batch_requests",
            documentation="Runner calls (request tile batches) sharing one forward pass",
            buckets=(1, 2, 3, 4, 6, 8, 16, 32),
        )
        serve = self.deployment.serve
        self.batcher = TileBatcher(
            predict,
            serve.max_batch_size,
            max_batch_pixels=round(serve.max_batch_mpixel * 1e6),
            # two passes' worth of requests tile and queue at once; the others wait
            # with their raw slices only
            max_inflight_pixels=round(2 * serve.max_batch_mpixel * 1e6),
            on_pass=self._observe,
        )
        stop_on_signals(self.batcher)
        self.confidence = runner_monitor(self.deployment, _arguments())
        logger.info(
            "runner: %s on %s/%s, up to %d tiles per forward pass",
            self.deployment.tag,
            self.deployment.plan.runtime,
            self.deployment.plan.precision,
            self.batcher.max_batch_size,
        )

    def __is_ready__(self) -> bool:
        """Ready while the engine thread takes work (BentoML's ``/readyz``)."""
        return self.batcher.alive

    def _observe(self, tiles: int, requests: int) -> None:
        self._tiles_hist.observe(tiles)
        self._requests_hist.observe(requests)

    def _predict_batch(self, batch: np.ndarray) -> np.ndarray:
        """``(B, TH, TW, 1)`` -> ``(B, TH, TW, C)`` through the shared batcher; the tiles
        are dropped from its queue when the caller disconnects."""
        future = self.batcher.submit(list(np.ascontiguousarray(batch, dtype=np.float32)))
        clock = current_request()
        if clock is not None:
            clock.on_cancel(future.cancel)
        return np.stack(future.result())

    @bentoml.api
    def segment_classes(self, stack: np.ndarray) -> np.ndarray:
        """Segment a decoded stack with the plan, here beside the model: only the raw
        slices and the uint8 classes cross the process boundary, not float tiles. The
        tiles of concurrent calls share forward passes through the batcher.

        Args:
            stack: ``(Z, H, W)`` raw intensities (uint8, uint16 or float32).

        Returns:
            ``(Z, H, W)`` uint8 class indexes.
        """
        clock = current_request()
        gone = (lambda: clock.disconnected) if clock is not None else None
        try:
            with self.batcher.admit(int(np.prod(stack.shape)), cancelled=gone):
                return self.confidence.segment(self._predict_batch, stack)  # = segment_stack
        except BatcherStopped as exc:
            raise bentoml.exceptions.BentoMLException(
                str(exc), error_code=HTTPStatus.SERVICE_UNAVAILABLE
            ) from None
        except concurrent.futures.CancelledError:
            raise bentoml.exceptions.BentoMLException(
                "the caller disconnected; its tiles were dropped",
                error_code=HTTPStatus.REQUEST_TIMEOUT,
            ) from None


def _message(exc: Exception) -> str:
    """The ``message`` of a JSON error body carried by ``exc``, else its text."""
    import json

    try:
        return str(json.loads(str(exc))["message"])
    except (ValueError, KeyError, TypeError):
        return str(exc)


def _error(exc: UploadError) -> JSONResponse:
    headers = exc.headers() if isinstance(exc, OverBudget) else None
    return JSONResponse(exc.to_json(), status_code=exc.status, headers=headers)


@bentoml.service(
    name="mitoseg",
    workers=1,
    threads=THREADS,
    traffic={"timeout": 600, "max_concurrency": 64},
)
class MitoSeg:
    """Public segmentation API (see the module docstring)."""

    model_ref = MODEL_REF
    runner = bentoml.depends(UNetRunner)

    def __init__(self) -> None:
        install_client_error_filter()
        self.deployment = load_deployment(type(self).model_ref)
        self.plan = self.deployment.plan
        self.limits = Limits.from_config(self.deployment.serve)
        self.budget = ComputeBudget(self.deployment.serve)
        resolve_job_settings(_arguments())  # a bad volume_* setting fails at start-up
        self.jobs = JobRunner(model_loader(self.deployment.path, self.plan))
        self.monitor = service_monitor(self.deployment, _arguments())

    async def __is_ready__(self) -> bool:
        """Ready when the runner answers its readiness probe within
        :data:`READY_PROBE_S` (its model loaded, its engine thread alive), so that a
        request would be served now; else ``/readyz`` is a JSON 503 saying so."""
        from starlette.exceptions import HTTPException

        if not await self._runner_ready():
            raise HTTPException(
                503,
                f"not ready: the model runner ({RUNNER_NAME}) did not answer its readiness "
                f"probe within {READY_PROBE_S:g} s (loading its model, busy starting, or "
                "restarting)",
            )
        return True

    async def _runner_ready(self) -> bool:
        try:
            ready = await asyncio.wait_for(self.runner.is_ready(READY_PROBE_S), READY_PROBE_S)
        except Exception:  # refused, reset, timed out: not ready
            return False
        return bool(ready)

    async def _call_runner(self, stack: np.ndarray, clock: RequestClock | None) -> Any:
        """One runner call, on the event loop: bounded by the request's deadline and
        cancelled when its client disconnects."""
        task = asyncio.ensure_future(self.runner.to_async.call("segment_classes", stack))
        if clock is None:
            return await task
        clock.on_cancel(task.cancel)
        return await asyncio.wait_for(task, clock.remaining())

    def _segment(self, stack: np.ndarray) -> np.ndarray:
        """``(Z, H, W)`` raw -> ``(Z, H, W)`` uint8 classes through the runner.

        A pooled connection dropped under the call is retried while the runner answers
        its readiness probe (the call is idempotent); a runner that does not (it died
        and is restarting) is a 503 at once.

        Raises:
            UploadError: 503 ``runner_unavailable``; 504 ``timeout`` (the request's
                deadline, ``serve.request_timeout_s``, passed); 499 ``client_closed``
                (the client disconnected: the call was cancelled).
        """
        import aiohttp
        import anyio.from_thread

        clock = current_request()
        waiting_for(f"the model runner ({RUNNER_NAME})")
        for attempt in range(RUNNER_RETRIES + 1):
            try:
                out = anyio.from_thread.run(self._call_runner, stack, clock)
                return np.asarray(out, dtype=np.uint8)
            except aiohttp.ClientConnectionError as exc:
                if attempt == RUNNER_RETRIES or not anyio.from_thread.run(self._runner_ready):
                    raise UploadError(
                        503,
                        "runner_unavailable",
                        f"the model runner ({RUNNER_NAME}) stopped answering during the "
                        f"request ({type(exc).__name__}); it restarts on its own: retry "
                        "when /readyz answers 200",
                    ) from None
                logger.warning("runner connection dropped; retrying (%d)", attempt + 1)
            except bentoml.exceptions.BentoMLException as exc:
                status = int(exc.error_code)
                if status not in (503, 504):
                    raise
                raise UploadError(
                    status,
                    "runner_unavailable" if status == 503 else "timeout",
                    f"the model runner ({RUNNER_NAME}) answered {status}: {_message(exc)}",
                ) from None
            except TimeoutError:
                assert clock is not None  # no deadline without a clock
                raise UploadError(
                    504,
                    "timeout",
                    f"no response from the model runner ({RUNNER_NAME}) within "
                    f"{clock.timeout_s:g} s ({clock.setting})",
                ) from None
            except (asyncio.CancelledError, concurrent.futures.CancelledError):
                raise UploadError(499, "client_closed", "the client disconnected") from None
        raise AssertionError("unreachable")

    def _upload_bytes(self, image: Path) -> bytes:
        """The uploaded file's bytes; ``UploadError`` 413 above ``serve.max_bytes``."""
        size = image.stat().st_size
        if size > self.limits.max_bytes:
            raise UploadError(
                413,
                "too_large",
                f"the upload is {size} bytes; the limit is {self.limits.max_bytes} bytes",
            )
        return image.read_bytes()

    def _classes(self, image: Path, max_pages: int | None) -> np.ndarray:
        """Read, validate, price and segment an upload.

        Returns:
            ``(Z, H, W)`` uint8 class indexes.

        Raises:
            UploadError: a bad upload, or one over the compute budget (``OverBudget``).
        """
        return self._decode_and_segment(image, max_pages)[1]

    def _decode_and_segment(
        self, image: Path, max_pages: int | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`_classes`, also returning the decoded ``(Z, H, W)`` raw stack."""
        data = self._upload_bytes(image)
        info = probe_upload(data, self.limits, max_pages=max_pages)
        with self.budget.admit(request_cost(info.shape, self.plan)):
            stack = np.ascontiguousarray(decode_upload(data, self.limits, max_pages=max_pages))
            classes = self._segment(stack)
        self.monitor.observe(stack, classes, data)
        return stack, classes

    @bentoml.api(route="/segment")
    def segment(self, image: Path, format: Literal["png", "tiff"] = "png") -> Path:
        """Segment one image (TIFF or PNG, 8/16-bit or float32, grayscale or RGB).

        Returns the mask as PNG (default) or TIFF: 0/255 for binary models, class
        indexes for multiclass ones.
        """
        try:
            classes = self._classes(image, max_pages=1)
        except UploadError as exc:
            return _error(exc)  # type: ignore[return-value]
        mask = mask_to_image(classes, self.plan.n_classes)[0]
        if format == "tiff":
            return Response(encode_tiff(mask), media_type="image/tiff")  # type: ignore[return-value]
        return Response(encode_png(mask), media_type="image/png")  # type: ignore[return-value]

    @bentoml.api(route="/segment_stack")
    def segment_stack(self, image: Path) -> Path:
        """Segment every page of a (multi-page) TIFF; returns a multi-page TIFF mask."""
        try:
            classes = self._classes(image, max_pages=None)
        except UploadError as exc:
            return _error(exc)  # type: ignore[return-value]
        mask = mask_to_image(classes, self.plan.n_classes)
        return Response(encode_tiff(mask), media_type="image/tiff")  # type: ignore[return-value]

    @bentoml.api(route="/stats")
    def stats(self, image: Path, pixel_size_nm: float | None = None) -> dict[str, Any]:
        """Segment one image and measure its mitochondria.

        Returns ``count``, ``area_fraction``, ``foreground_pixels``, ``pixel_size_nm`` and
        ``objects`` (``id``, ``area`` in pixels, ``centroid`` ``[y, x]``, ``bbox``,
        ``area_nm2``, ``mean_intensity`` of the raw image, ``elongation``). The pixel size
        is ``pixel_size_nm`` when given, else the model's training voxel size when its plan
        records one; without either, ``area_nm2`` is null.
        """
        if pixel_size_nm is not None and not pixel_size_nm > 0:
            return _error(  # type: ignore[return-value]
                UploadError(
                    400, "bad_pixel_size", f"pixel_size_nm must be > 0, got {pixel_size_nm}"
                )
            )
        try:
            stack, classes = self._decode_and_segment(image, max_pages=1)
        except UploadError as exc:
            return _error(exc)  # type: ignore[return-value]
        plan = self.plan
        fg = plan.foreground_class
        if fg is None:
            msg = f"the model has no class named 'mitochondria' (classes: {plan.class_names})"
            return _error(UploadError(422, "no_mitochondria_class", msg))  # type: ignore[return-value]
        if pixel_size_nm is not None:
            pixel: tuple[float, float] | None = (pixel_size_nm, pixel_size_nm)
        elif plan.voxel_size_nm is not None:
            pixel = (plan.voxel_size_nm[1], plan.voxel_size_nm[2])
        else:
            pixel = None
        out = mask_stats(classes[0], fg, plan.min_object_size, stack[0], pixel)
        return {"class": plan.class_names[fg], "min_object_size": plan.min_object_size, **out}

    @bentoml.api(route="/preview")
    def preview(self, image: Path) -> Path:
        """The first page of an upload as an 8-bit PNG (robust 0.5-99.5 % intensity
        range), for the web page: browsers do not display TIFF."""
        from mitoseg.inference.normalize import normalize_slice

        try:
            page = decode_upload(self._upload_bytes(image), self.limits, max_pages=1)[0]
        except UploadError as exc:
            return _error(exc)  # type: ignore[return-value]
        png = np.rint(normalize_slice(page) * 255).astype(np.uint8)
        return Response(encode_png(png), media_type="image/png")  # type: ignore[return-value]

    @bentoml.task(route=VOLUME_ROUTE)
    def segment_volume(
        self,
        input_uri: str,
        output_uri: str,
        block_z: int | None = None,
        block_yx: int | None = None,
        force: bool = False,
        probabilities: bool = False,
    ) -> dict[str, Any]:
        """Segment a volume the server can reach into an OME-Zarr store (a task).

        ``POST /segment_volume/submit`` with JSON ``{"input_uri", "output_uri", ...}``
        answers ``{"task_id", "status"}`` at once (a bad request gets its 4xx there);
        ``GET /segment_volume/status?task_id=`` and ``/get?task_id=`` give the task's
        state and, when done, the job summary. ``input_uri``: OME-Zarr / Zarr / TIFF
        (``s3://`` or an absolute server path); ``output_uri``: ``... .zarr``.
        ``block_z`` slices per block (None: from the plan), ``block_yx`` YX tile side
        (None: whole slices),
        ``force`` replaces an existing output. Progress: ``/volume_progress``.
        """
        request = VolumeJobRequest(
            input_uri=input_uri, output_uri=output_uri, block_z=block_z, block_yx=block_yx,
            force=force, probabilities=probabilities,
        )  # fmt: skip
        try:
            return self.jobs.run(request, resolve_job_settings(_arguments()))
        except JobError as exc:
            return _error(exc)  # type: ignore[return-value]

    @bentoml.api(route="/volume_progress")
    def volume_progress(self, output_uri: str) -> dict[str, Any]:
        """Status (``absent``, ``running``, ``complete``) and blocks done / total of the
        job writing ``output_uri``, from the store's completion record."""
        try:
            return job_progress(output_uri, resolve_job_settings(_arguments()))
        except JobError as exc:
            return _error(exc)  # type: ignore[return-value]

    @bentoml.api(route="/metadata")
    def metadata(self) -> dict[str, Any]:
        """Model lineage (name, version, alias, run id, git commit, data hash, metrics,
        source), its inference plan (threshold, classes, tiling, engine) and the serving
        limits."""
        meta = self.deployment.metadata
        keys = ("name", "version", "alias", "run_id", "git_commit", "data_hash", "metrics")
        plan = self.plan
        return {
            "bento_model": self.deployment.tag,
            **{k: meta.get(k) for k in (*keys, "source_uri")},
            "threshold": plan.threshold,
            "engine": f"{plan.runtime}/{plan.precision}",
            "n_classes": plan.n_classes,
            "class_names": plan.class_names,
            "plan": plan.model_dump(mode="json"),
            "serve": self.deployment.serve.model_dump(),
        }


# Outermost of ours: every request gets a response by its deadline (serve.request_timeout_s);
# the runner's drops the tiles of a caller that went away.
for _service in (MitoSeg, UNetRunner):
    _service.add_asgi_middleware(
        DeadlineMiddleware,
        timeout_s=resolve_serve_config(None, _arguments()).request_timeout_s,
        probe_timeout_s=2 * READY_PROBE_S + 1,
    )
MitoSeg.add_asgi_middleware(
    GuardMiddleware,
    token_env=TOKEN_ENV,
    # From Bento arguments or defaults: the store is not read at import.
    max_bytes=resolve_serve_config(None, _arguments()).max_bytes + MULTIPART_SLACK,
    upload_paths=("/segment", "/segment_stack", "/stats", "/preview"),
)
# Inside the guard above: a volume job is checked at submit, after auth and size.
MitoSeg.add_asgi_middleware(
    VolumeSubmitGuard,
    route=VOLUME_ROUTE,
    settings=lambda: resolve_job_settings(_arguments()),
    busy=_jobs_running,
)
# The web page (GET /ui/, open like the API docs); it calls the API above.
MitoSeg.mount_asgi_app(ui_app(), path=UI_PATH)
# GET /drift: the drift window against the model's reference profile (monitoring.py).
MitoSeg.mount_asgi_app(drift_app(current_drift_summary), path="/drift")
