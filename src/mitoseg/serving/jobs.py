"""Volume jobs from the endpoint: URI checks, admission, running and progress.

The service's task endpoint ``/segment_volume`` (``@bentoml.task``) takes an input and an
output URI (``s3://bucket/key`` or an absolute path the server can reach) and runs
:func:`mitoseg.volume.job.run_volume_job` on them; no voxel travels over HTTP. This
module holds everything but the BentoML wiring:

* :class:`VolumeJobSettings`: what the server allows (URI prefixes, cluster, voxel and
  concurrency limits), from Bento arguments (``volume_allow``, ``volume_workers``,
  ``volume_scheduler``, ``volume_max_voxels``, ``volume_max_jobs``) or the environment
  variables of the same names in capitals with a ``MITOSEG_`` prefix
  (``MITOSEG_VOLUME_ALLOW=/data,s3://lab/``); arguments win.
* :func:`check_request`: the request checked before anything runs (at submit, by
  :class:`VolumeSubmitGuard`, and again when the task starts): URIs, allow-list, input
  readable as a 3D volume, output not another job's, voxel limit. Every refusal is a
  :class:`JobError` (a 4xx with ``{"error", "message", "status"}`` naming the URI).
* :class:`JobRunner`: runs one job on an embedded in-process ``LocalCluster`` or the
  configured scheduler, at most ``max_jobs`` at once (429 ``busy`` beyond that).
* :func:`job_progress`: status and blocks done / total, read from the output store's
  completion record (so it is right after a server restart too).

Nothing here imports BentoML; zarr, dask and keras are imported inside functions.
"""

from __future__ import annotations

import posixpath
import threading
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mitoseg.decode import ImageError
from mitoseg.serving.settings import settings_from

__all__ = [
    "JOB_ENV_PREFIX",
    "JobError",
    "JobRunner",
    "VolumeJobRequest",
    "VolumeJobSettings",
    "VolumeSubmitGuard",
    "check_request",
    "check_uri",
    "job_progress",
    "require_volume_stack",
    "resolve_job_settings",
]

#: Environment variables ``MITOSEG_VOLUME_*`` configure the job endpoint.
JOB_ENV_PREFIX = "MITOSEG_"
#: Seconds a 429 asks the client to wait when the job slots are taken.
RETRY_AFTER_S = 30


class JobError(ImageError):
    """A refused volume job request: one HTTP 4xx (``status``, ``code``, ``message``)."""


class VolumeJobSettings(BaseModel):
    """What the server's volume job endpoint accepts and where jobs run.

    Attributes:
        allow: URI prefixes jobs may read and write (``/data/``, ``s3://lab/``); empty:
            any absolute path or ``s3://`` URI the server can reach.
        workers: in-process Dask workers of the embedded cluster (one thread each).
        scheduler: ``tcp://HOST:PORT`` of a Dask cluster to run jobs on instead.
        max_voxels: largest input volume, voxels (None: no limit); 413 above it.
        max_jobs: jobs running at once; 429 ``busy`` beyond it.
    """

    model_config = ConfigDict(extra="forbid")

    allow: list[str] = Field(default_factory=list)
    workers: int = Field(1, ge=1, le=64)
    scheduler: str | None = None
    max_voxels: int | None = Field(None, gt=0)
    max_jobs: int = Field(1, ge=1)


def resolve_job_settings(
    arguments: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> VolumeJobSettings:
    """Settings from Bento arguments ``volume_<field>`` over ``MITOSEG_VOLUME_<FIELD>``.

    ``allow`` is a comma-separated list; empty strings count as unset.

    Raises:
        ValueError: an invalid value (the message names the argument or variable).
    """

    def split_allow(name: str, value: Any) -> Any:
        if name == "allow" and isinstance(value, str):
            return [p.strip() for p in value.split(",") if p.strip()]
        return value

    settings, source = settings_from(
        VolumeJobSettings, arguments, environ, "volume_", f"{JOB_ENV_PREFIX}VOLUME_", split_allow
    )
    prefixes = []
    for prefix in settings.allow:
        try:
            prefixes.append(check_uri(prefix, "allow-list prefix", []))
        except JobError as exc:
            raise ValueError(f"{source['allow']}: {exc.message}") from None
    return settings.model_copy(update={"allow": prefixes})


class VolumeJobRequest(BaseModel):
    """One job: read ``input_uri``, write the OME-Zarr ``output_uri``.

    Attributes:
        input_uri: OME-Zarr / Zarr store or TIFF stack (absolute path or ``s3://``).
        output_uri: output store, ending in ``.zarr`` (absolute path or ``s3://``).
        block_z: slices per block (None: from the plan,
            :func:`mitoseg.volume.spec.auto_block_z`).
        block_yx: YX tile side of a block (None: whole slices).
        force: replace an existing output.
        probabilities: also store uint8 probabilities.
    """

    model_config = ConfigDict(extra="forbid")

    input_uri: str
    output_uri: str
    block_z: int | None = Field(None, ge=1)
    block_yx: int | None = Field(None, ge=1)
    force: bool = False
    probabilities: bool = False


def _is_under(uri: str, prefix: str) -> bool:
    if uri.startswith("s3://") != prefix.startswith("s3://"):
        return False
    if prefix.startswith("s3://"):
        p = prefix.rstrip("/")
        return uri == p or uri.startswith(p + "/")
    return uri == prefix.rstrip("/") or uri.startswith(prefix.rstrip("/") + "/")


def check_uri(uri: Any, role: str, allow: list[str]) -> str:
    """The normalised URI, or a :class:`JobError` 400 ``bad_uri`` naming it.

    Accepted: ``s3://bucket[/key]`` and absolute local paths (normalised, no ``..``
    left); with a non-empty ``allow``, only URIs at or below one of its prefixes.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise JobError(400, "bad_uri", f"{role}: expected a non-empty URI, got {uri!r}")
    text = uri.strip()
    if text.startswith("s3://"):
        bucket = text[5:].split("/", 1)[0]
        if not bucket or ".." in text[5:].split("/"):
            raise JobError(400, "bad_uri", f"{role} {text}: expected s3://bucket/key")
        norm = text.rstrip("/")
    elif "://" in text:
        raise JobError(
            400,
            "bad_uri",
            f"{role} {text}: only s3:// URIs and absolute paths on the server are accepted",
        )
    elif not text.startswith("/"):
        raise JobError(
            400, "bad_uri", f"{role} {text}: a local path must be absolute (the server's path)"
        )
    else:
        norm = posixpath.normpath(text)
    if allow and not any(_is_under(norm, p) for p in allow):
        raise JobError(
            403,
            "uri_not_allowed",
            f"{role} {text}: not under an allowed prefix ({', '.join(allow)}; "
            "volume_allow / MITOSEG_VOLUME_ALLOW)",
        )
    return norm


def require_volume_stack() -> None:
    """A 501 ``not_installed`` when the server lacks the volume stack (the GPU Bento of
    ``mitoseg bento build`` leaves out dask and zarr)."""
    import importlib

    for module in ("zarr", "distributed"):
        try:
            importlib.import_module(module)
        except ImportError:
            raise JobError(
                501,
                "not_installed",
                f"volume jobs need dask.distributed and zarr on the server (pip install "
                f"'mitoseg[volume]'); this server has no {module}",
            ) from None


def check_request(
    request: VolumeJobRequest, settings: VolumeJobSettings
) -> tuple[VolumeJobRequest, tuple[int, int, int]]:
    """Check a job before it runs; returns it with normalised URIs, and the input shape.

    Raises:
        JobError: 400 ``bad_uri`` / 403 ``uri_not_allowed`` (:func:`check_uri`); 400
            ``bad_input`` (input missing, not a store, not 3D, ...); 400 ``bad_output``
            (output not ``.zarr``, or the input itself); 409 ``output_exists`` (an
            output that is complete or another job's, without ``force``); 413
            ``too_large`` (more voxels than ``max_voxels``); 501 ``not_installed``
            (:func:`require_volume_stack`).
    """
    require_volume_stack()
    from mitoseg.io import DataError
    from mitoseg.volume import ngff
    from mitoseg.volume.store import open_volume

    src = check_uri(request.input_uri, "input_uri", settings.allow)
    dst = check_uri(request.output_uri, "output_uri", settings.allow)
    if not dst.endswith(".zarr"):
        raise JobError(
            400, "bad_output", f"output_uri {dst}: must name a Zarr store ending in .zarr"
        )
    if dst == src:
        raise JobError(400, "bad_output", f"output_uri {dst}: must differ from the input")
    try:
        vol = open_volume(src)
    except DataError as exc:
        raise JobError(400, "bad_input", f"input_uri {exc}") from None
    except Exception as exc:  # s3fs / botocore: unreachable endpoint, denied, ...
        raise JobError(
            400, "bad_input", f"input_uri {src}: cannot open ({type(exc).__name__}: {exc})"
        ) from None
    vol.close()
    voxels = int(vol.shape[0]) * int(vol.shape[1]) * int(vol.shape[2])
    if settings.max_voxels is not None and voxels > settings.max_voxels:
        raise JobError(
            413,
            "too_large",
            f"input_uri {src}: {' x '.join(map(str, vol.shape))} = {voxels} voxels; the "
            f"limit is {settings.max_voxels} voxels (volume_max_voxels)",
        )
    if not request.force:
        try:
            status = ngff.output_status(dst)
        except FileExistsError as exc:
            raise JobError(409, "output_exists", f"output_uri {exc}") from None
        if status is not None and status.get("status") == "complete":
            raise JobError(
                409,
                "output_exists",
                f"output_uri {dst}: exists (a completed job); submit with force to replace it",
            )
    checked = request.model_copy(update={"input_uri": src, "output_uri": dst})
    return checked, vol.shape


def job_progress(output_uri: str, settings: VolumeJobSettings) -> dict[str, Any]:
    """Status and progress of the job writing ``output_uri``.

    Returns:
        ``{"output_uri", "status", "blocks_done", "blocks_total", "fraction"}``;
        ``status`` is ``absent`` (no output yet), ``running`` or ``complete``, from the
        store's ``mitoseg`` attribute; blocks are rows of its completion record.

    Raises:
        JobError: a bad URI (:func:`check_uri`), 409 ``not_a_job_output``, or 501
            ``not_installed``.
    """
    require_volume_stack()
    import zarr

    from mitoseg.volume import ngff
    from mitoseg.volume.store import open_store

    uri = check_uri(output_uri, "output_uri", settings.allow)
    try:
        info = ngff.output_status(uri)
    except FileExistsError as exc:
        raise JobError(409, "not_a_job_output", f"output_uri {exc}") from None
    if info is None:
        return {"output_uri": uri, "status": "absent", "blocks_done": 0, "blocks_total": None,
                "fraction": 0.0}  # fmt: skip
    root = zarr.open_group(store=open_store(uri, read_only=True), mode="r")
    total = int(info.get("blocks") or 0)
    try:
        done = int((root[ngff.DONE_ARRAY][:][:, 0] > 0).sum())
    except Exception:  # a record row being written right now
        done = 0
    if info.get("status") == "complete":
        done = total
    return {
        "output_uri": uri,
        "status": str(info.get("status")),
        "blocks_done": done,
        "blocks_total": total,
        "fraction": round(done / total, 4) if total else 0.0,
    }


class JobRunner:
    """Runs volume jobs for one service process, at most ``max_jobs`` at once.

    Args:
        load_model: returns ``(model, plan)`` (a Keras model and its
            :class:`~mitoseg.inference.plan.InferencePlan`); called once, at the first job.
    """

    def __init__(self, load_model: Callable[[], tuple[Any, Any]]) -> None:
        self._load_model = load_model
        self._model: tuple[Any, Any] | None = None
        self._lock = threading.Lock()  # the job slots: held for a moment, never while loading
        self._model_lock = threading.Lock()  # loading the model (seconds): once
        self._running: set[str] = set()

    def running(self) -> int:
        """Jobs running now."""
        with self._lock:
            return len(self._running)

    def _reserve(self, output_uri: str, settings: VolumeJobSettings) -> None:
        with self._lock:
            if output_uri in self._running:
                raise JobError(
                    409, "output_busy", f"output_uri {output_uri}: a job is writing it now"
                )
            if len(self._running) >= settings.max_jobs:
                raise JobError(
                    429,
                    "busy",
                    f"{len(self._running)} volume job(s) running, the limit is "
                    f"{settings.max_jobs} (volume_max_jobs); retry later",
                )
            self._running.add(output_uri)

    def run(self, request: VolumeJobRequest, settings: VolumeJobSettings) -> dict[str, Any]:
        """Check and run one job to its end (blocking).

        Returns:
            The job summary of :func:`~mitoseg.volume.job.run_volume_job` plus
            ``input_uri`` and ``output_uri``.

        Raises:
            JobError: a refused request (:func:`check_request`, 429 ``busy``, 409
                ``output_busy``, 409 ``output_exists`` for another job's output, 503
                ``no_cluster``), or 400 ``bad_request`` when the job failed on its data
                (a chunk that cannot be read): the output stays ``running`` and resumes
                when the job is submitted again. Other failures propagate (a 500).
        """
        from mitoseg.io import DataError
        from mitoseg.volume.job import run_volume_job

        checked, _ = check_request(request, settings)
        self._reserve(checked.output_uri, settings)
        try:
            with self._model_lock:
                if self._model is None:
                    self._model = self._load_model()
                model, plan = self._model
            client, close = _client(settings)
            try:
                summary = run_volume_job(
                    checked.input_uri,
                    checked.output_uri,
                    model,
                    plan,
                    client=client,
                    block_z=checked.block_z,
                    block_yx=checked.block_yx,
                    force=checked.force,
                    probabilities=checked.probabilities,
                )
            finally:
                close()
        except JobError:
            raise
        except FileExistsError as exc:  # another job's output (other input, plan, blocks)
            raise JobError(409, "output_exists", f"output_uri {exc}") from None
        except (DataError, ValueError) as exc:  # e.g. a chunk that cannot be read
            raise JobError(400, "bad_request", str(exc)) from None
        finally:
            with self._lock:
                self._running.discard(checked.output_uri)
        return {"input_uri": checked.input_uri, "output_uri": checked.output_uri, **summary}


def _client(settings: VolumeJobSettings) -> tuple[Any, Callable[[], None]]:
    """A Dask client on the configured scheduler, or on an in-process ``LocalCluster``."""
    from distributed import Client, LocalCluster

    if settings.scheduler:
        try:
            client = Client(settings.scheduler, timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise JobError(
                503, "no_cluster", f"cannot reach the Dask scheduler {settings.scheduler}: {exc}"
            ) from None
        return client, client.close
    cluster = LocalCluster(
        n_workers=settings.workers,
        threads_per_worker=1,
        processes=False,
        dashboard_address=None,
    )
    client = Client(cluster)

    def close() -> None:
        client.close()
        cluster.close()

    return client, close


# ----------------------------------------------------------------- submit guard

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class VolumeSubmitGuard:
    """ASGI middleware: check a volume job at ``POST <route>/submit`` before BentoML
    queues it, so a bad request gets its 4xx at once instead of a failed task.

    Installed after (inside) :class:`~mitoseg.serving.middleware.GuardMiddleware`, so
    auth and the body limit apply first. The JSON body is read, checked with
    :func:`check_request` (in a thread: it may touch S3) and replayed to the app.

    Args:
        app: the wrapped ASGI app.
        route: the task's route, e.g. ``/segment_volume``.
        settings: returns the current :class:`VolumeJobSettings`.
        busy: returns the number of jobs running in this process.
    """

    def __init__(
        self,
        app: Callable[[Scope, Receive, Send], Awaitable[None]],
        route: str,
        settings: Callable[[], VolumeJobSettings],
        busy: Callable[[], int] = lambda: 0,
    ) -> None:
        self.app = app
        self.path = route.rstrip("/") + "/submit"
        self.settings = settings
        self.busy = busy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check submissions; pass everything else through."""
        if scope["type"] != "http" or scope.get("path") != self.path:
            await self.app(scope, receive, send)
            return
        import anyio

        from mitoseg.serving.middleware import json_error

        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            settings = self.settings()
            try:
                request = VolumeJobRequest.model_validate_json(body or b"{}")
            except ValidationError as exc:
                parts = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
                raise JobError(400, "invalid_request", "; ".join(parts)) from None
            await anyio.to_thread.run_sync(check_request, request, settings)
            if self.busy() >= settings.max_jobs:
                raise JobError(
                    429,
                    "busy",
                    f"{self.busy()} volume job(s) running, the limit is {settings.max_jobs} "
                    "(volume_max_jobs); retry later",
                )
        except JobError as exc:
            status, headers, payload = json_error(exc.status, exc.code, exc.message)
            if exc.status == 429:
                headers = [*headers, (b"retry-after", str(RETRY_AFTER_S).encode())]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": payload})
            return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def model_loader(model_dir: Path, plan: Any) -> Callable[[], tuple[Any, Any]]:
    """``load_model`` for :class:`JobRunner`: the ``model.keras`` of a BentoML model
    directory with the deployment's plan."""

    def load() -> tuple[Any, Any]:
        import keras

        import mitoseg.model.unet  # noqa: F401  (registers custom objects, if any)
        from mitoseg.serving.bento import MODEL_FILE

        return keras.saving.load_model(model_dir / MODEL_FILE, compile=False), plan

    return load
