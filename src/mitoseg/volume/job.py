"""Blockwise, resumable volume prediction on a ``dask.distributed`` cluster.

Why one module of about 530 lines: the phases (plan, blocks, stitch, finish) share one
output layout and one resume protocol (a block counts as done only after its data); split
over files, the rules of the completion record would be too.

:func:`run_volume_job` cuts the volume into z-blocks of whole slices (``block_z`` each,
the last one shorter). Each block is read with ``plan.z_halo`` (``z_context +
z_average``) extra slices on both sides, clamped at the volume ends, so a 2.5D network
sees exactly the neighbours it sees on the whole stack and z-averaged probabilities
average the same slices, run through the pure core
(:func:`mitoseg.inference.iter_stack_probabilities` with the model's
:class:`~mitoseg.plan.InferencePlan`: the same normalisation per whole slice, tiling,
blending and threshold) and cropped back. Every slice is thus computed exactly as
whole-stack ``mitoseg predict`` computes it: the mask is identical whatever the input's
chunking.

Phases (the output layout is in :mod:`mitoseg.volume.ngff`):

1. **predict** (one task per unfinished block): image copy, mask, optional
   probabilities and per-block instance labels (26-connected components, ids
   ``1 .. n_b``) with their pyramids; then the block's row of the completion record.
   A block killed half-way has no row and is redone on restart: it is either fully
   written or redone.
2. **stitch** (cellpose distributed style): ids are offset by the running count of the
   previous blocks, labels touching across each block face (26-connectivity) are
   merged with a graph's connected components (scipy), and components are numbered by
   their first voxel in scan order, so the ids equal
   :func:`mitoseg.objects.instance_labels` of the whole mask.
3. **relabel** (one task per block, idempotent): final ids and pyramid into
   ``labels/instances``, per-object moments combined into ``objects.csv``.

The model is loaded once per worker by a worker plugin (:class:`PredictorPlugin`) that
carries the Keras model as ``.keras`` bytes (workers need no MLflow access) or a
picklable batch-predict callable. The default cluster is an embedded ``LocalCluster``
(``workers`` processes, one thread each); ``scheduler="tcp://HOST:PORT"`` attaches to a
running one (``dask scheduler`` / ``dask worker``, dask-jobqueue, the Dask Kubernetes
operator). Workers must reach the input and output locations.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from distributed import WorkerPlugin

from mitoseg.plan import InferencePlan
from mitoseg.volume import ngff
from mitoseg.volume.store import Volume, open_volume

__all__ = [
    "JobSpec",
    "PredictorPlugin",
    "block_bounds",
    "face_pairs",
    "run_volume_job",
    "stitch_labels",
]


@dataclass(frozen=True)
class JobSpec:
    """What every task needs (picklable, small)."""

    source: str
    target: str
    voxel_size_nm: tuple[float, float, float] | None
    shape: tuple[int, int, int]
    block_z: int
    plan_json: str
    plugin: str
    instance_class: int | None
    probabilities: bool

    @property
    def n_blocks(self) -> int:
        """Number of z-blocks."""
        return -(-self.shape[0] // self.block_z)

    def plan(self) -> InferencePlan:
        """The inference plan."""
        return InferencePlan.model_validate_json(self.plan_json)


def block_bounds(b: int, depth: int, block_z: int, z_halo: int = 0) -> tuple[int, int, int, int]:
    """``(z0, z1, r0, r1)``: block ``b`` writes slices ``z0 .. z1-1`` and reads
    ``r0 .. r1-1`` (``z_halo`` more on each side, clamped to the volume)."""
    z0 = b * block_z
    z1 = min(depth, z0 + block_z)
    return z0, z1, max(0, z0 - z_halo), min(depth, z1 + z_halo)


class PredictorPlugin(WorkerPlugin):
    """Loads the model once per worker and keeps its batch predictor.

    Args:
        model: ``.keras`` file bytes, or a picklable callable / object with
            ``predict_on_batch`` used as it is.
        plan_json: the inference plan as JSON.
    """

    def __init__(self, model: bytes | Any, plan_json: str) -> None:
        self.model = model
        self.plan_json = plan_json
        self.predict_batch: Callable[[np.ndarray], np.ndarray] | None = None
        self.loads = 0

    def setup(self, worker: Any) -> None:
        """Called once when the plugin reaches a worker: load the model."""
        from mitoseg.inference import as_predict_batch

        plan = InferencePlan.model_validate_json(self.plan_json)
        net = self.model
        if isinstance(net, bytes):
            import keras

            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "model.keras"
                path.write_bytes(net)
                net = keras.models.load_model(path, compile=False)
        if hasattr(net, "predict_on_batch"):
            from mitoseg.runtime import predictor_for_plan

            self.predict_batch = predictor_for_plan(net, plan)
        else:
            self.predict_batch = as_predict_batch(net)
        self.loads += 1


_VOLUMES: dict[str, Volume] = {}


def _volume(spec: JobSpec) -> Volume:
    key = f"{spec.source}|{spec.voxel_size_nm}"
    if key not in _VOLUMES:
        _VOLUMES[key] = open_volume(spec.source, spec.voxel_size_nm)
    return _VOLUMES[key]


def _predictor(spec: JobSpec) -> Callable[[np.ndarray], np.ndarray]:
    from distributed import get_worker

    plugin = get_worker().plugins[spec.plugin]
    assert plugin.predict_batch is not None
    return plugin.predict_batch


def _predict_block(spec: JobSpec, b: int) -> tuple[int, int, int]:
    """Phase 1 for block ``b``; returns ``(b, local objects, foreground voxels)``."""
    from mitoseg.inference import iter_stack_probabilities, probabilities_to_mask
    from mitoseg.objects import instance_labels

    plan = spec.plan()
    vol = _volume(spec)
    k = plan.z_halo  # z_context + z_average: slices a block needs beyond its own
    z0, z1, r0, r1 = block_bounds(b, spec.shape[0], spec.block_z, k)
    raw = vol.read(r0, r1)
    _, h, w = raw.shape
    mask = np.zeros((z1 - z0, h, w), dtype=np.uint8)
    probs = (
        np.zeros((plan.out_channels, z1 - z0, h, w), dtype=np.uint8) if spec.probabilities else None
    )
    stream = iter_stack_probabilities(_predictor(spec), raw, plan)
    for i, p in enumerate(stream):
        z = r0 + i
        if z >= z1:  # the trailing context slices are read, never predicted
            break
        if z < z0:
            continue
        mask[z - z0] = probabilities_to_mask(p, plan.decision)
        if probs is not None:
            probs[:, z - z0] = np.rint(np.clip(p, 0, 1) * 255).astype(np.uint8).transpose(2, 0, 1)
    root = ngff.open_output(spec.target)
    ngff.write_levels(root, raw[z0 - r0 : z1 - r0], z0, label=False)
    ngff.write_levels(root["labels/mask"], mask, z0, label=True)
    if probs is not None:
        ngff.write_levels(root["probabilities"], probs, z0, label=False)
    n = 0
    if spec.instance_class is not None:
        local, n = instance_labels(mask == spec.instance_class)
        root[ngff.LOCAL_ARRAY][z0:z1] = local
    fg = int(np.count_nonzero(mask))
    root[ngff.DONE_ARRAY][b] = np.array([n + 1, fg], dtype=np.int64)  # last: block complete
    return b, n, fg


def face_pairs(last: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Label pairs touching across a z face with 26-connectivity.

    Args:
        last: ``(Y, X)`` labels of the last slice of a block.
        first: ``(Y, X)`` labels of the first slice of the next block.

    Returns:
        ``(N, 2)`` int64 unique ``(label in last, label in first)`` pairs, both > 0.
    """
    h, w = last.shape
    pairs = []
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            a = last[max(0, dy) : h + min(0, dy), max(0, dx) : w + min(0, dx)]
            b = first[max(0, -dy) : h + min(0, -dy), max(0, -dx) : w + min(0, -dx)]
            both = (a > 0) & (b > 0)
            if both.any():
                pairs.append(np.stack([a[both], b[both]], axis=1).astype(np.int64))
    if not pairs:
        return np.zeros((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(pairs), axis=0)


def _face_task(spec: JobSpec, b: int) -> tuple[int, np.ndarray]:
    z1 = min(spec.shape[0], (b + 1) * spec.block_z)
    local = ngff.open_output(spec.target)[ngff.LOCAL_ARRAY]
    both = np.asarray(local[z1 - 1 : z1 + 1])
    return b, face_pairs(both[0], both[1])


def stitch_labels(counts: list[int], faces: dict[int, np.ndarray]) -> tuple[np.ndarray, int]:
    """Global relabelling of per-block labels.

    Args:
        counts: objects per block (local ids ``1 .. counts[b]``).
        faces: ``{b: (N, 2) pairs}`` of local ids touching between block ``b`` and
            ``b + 1`` (:func:`face_pairs`).

    Returns:
        ``(mapping, n)``: ``mapping[offset_b + local]`` is the final id (``mapping[0] =
        0``) where ``offset_b = sum(counts[:b])``; final ids ``1 .. n`` are numbered by
        the smallest global id of each merged set (scan order of the first voxel).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    total = int(offsets[-1])
    rows, cols = [], []
    for b, pairs in faces.items():
        if pairs.size:
            rows.append(pairs[:, 0] + offsets[b])
            cols.append(pairs[:, 1] + offsets[b + 1])
    r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    c = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    graph = coo_matrix((np.ones(r.size, dtype=np.int8), (r, c)), shape=(total + 1, total + 1))
    _, comp = connected_components(graph, directed=False)
    comp = comp[1:]
    if total == 0:
        return np.zeros(1, dtype=np.uint32), 0
    first = np.full(comp.max() + 1, np.iinfo(np.int64).max)
    np.minimum.at(first, comp, np.arange(1, total + 1))
    used = np.flatnonzero(first != np.iinfo(np.int64).max)
    rank = np.zeros(comp.max() + 1, dtype=np.uint32)
    rank[used[np.argsort(first[used], kind="stable")]] = np.arange(1, used.size + 1)
    mapping = np.zeros(total + 1, dtype=np.uint32)
    mapping[1:] = rank[comp]
    return mapping, int(used.size)


def _relabel_task(
    spec: JobSpec, b: int, offset: int, mapping: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    from mitoseg.objects import object_moments

    z0, z1, _, _ = block_bounds(b, spec.shape[0], spec.block_z)
    root = ngff.open_output(spec.target)
    local = np.asarray(root[ngff.LOCAL_ARRAY][z0:z1]).astype(np.int64)
    final = np.where(local > 0, mapping[np.where(local > 0, local + offset, 0)], 0).astype(
        np.uint32
    )
    ngff.write_levels(root["labels/instances"], final, z0, label=True)
    return object_moments(final, _volume(spec).read(z0, z1), z0)


def _plugin_loads(name: str, dask_worker: Any = None) -> int:
    """Times the model was loaded on this worker (run on every worker by ``client.run``)."""
    plugin = dask_worker.plugins.get(name) if dask_worker is not None else None
    return int(getattr(plugin, "loads", 0))


def _read_done(root: Any, n_blocks: int) -> np.ndarray:
    """The completion record; a row that cannot be read (killed mid-write) counts as 0."""
    arr = root[ngff.DONE_ARRAY]
    try:
        return np.asarray(arr[:])
    except Exception:
        out = np.zeros((n_blocks, 2), dtype=np.int64)
        for b in range(n_blocks):
            try:
                out[b] = arr[b]
            except Exception:
                out[b] = 0
        return out


def _model_payload(model: Any) -> bytes | Any:
    if hasattr(model, "save") and hasattr(model, "predict_on_batch"):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.keras"
            model.save(path)
            return path.read_bytes()
    if callable(model) or hasattr(model, "predict_on_batch"):
        return model
    raise TypeError(
        f"expected a Keras model or a batch-predict callable, got {type(model).__name__}"
    )


def _instance_class(plan: InferencePlan) -> int | None:
    if plan.n_classes == 2:
        return 1
    if "mitochondria" in plan.class_names:
        return plan.class_names.index("mitochondria")
    return None


def _gather(client: Any, futures: list[Any], description: str, progress: bool) -> list[Any]:
    from distributed import as_completed

    from mitoseg.progress import progress_iter

    results = []
    try:
        for fut in progress_iter(as_completed(futures), len(futures), description, progress):
            results.append(fut.result())
    except BaseException:
        client.cancel(futures)
        raise
    return results


def _connect(workers: int, scheduler: str | None) -> tuple[Any, Callable[[], None]]:
    from distributed import Client, LocalCluster

    if scheduler is not None:
        try:
            client = Client(scheduler, timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise ValueError(f"cannot reach the Dask scheduler {scheduler}: {exc}") from None
        return client, client.close
    cluster = LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
    )
    client = Client(cluster)

    def close() -> None:
        client.close()
        cluster.close()

    return client, close


def run_volume_job(
    source: str,
    target: str,
    model: Any,
    plan: InferencePlan,
    *,
    workers: int = 2,
    scheduler: str | None = None,
    client: Any = None,
    block_z: int = 8,
    probabilities: bool = False,
    force: bool = False,
    voxel_size_nm: Any | None = None,
    ngff_version: str = "0.5",
    progress: bool = False,
) -> dict[str, Any]:
    """Segment a volume blockwise into an OME-Zarr output; resume an interrupted job.

    Args:
        source: OME-Zarr / Zarr store (path or ``s3://``) or TIFF stack.
        target: output store (path or ``s3://``), e.g. ``OUT.ome.zarr``.
        model: Keras model (shipped to the workers as ``.keras`` bytes) or a picklable
            batch-predict callable.
        plan: the model's inference plan.
        workers: LocalCluster worker processes (when neither ``client`` nor ``scheduler``).
        scheduler: ``tcp://HOST:PORT`` of a running Dask scheduler.
        client: an existing ``distributed.Client`` (used as it is, not closed).
        block_z: slices per block (and chunk depth of the output).
        probabilities: also store ``(C, Z, Y, X)`` uint8 probabilities.
        force: replace an existing output (a complete one, another job's, or a non-output).
        voxel_size_nm: ``(z, y, x)`` nm overriding the input's metadata.
        ngff_version: ``0.5`` (Zarr v3) or ``0.4`` (Zarr v2) output.
        progress: progress bars over blocks.

    Returns:
        ``{"shape", "blocks", "skipped", "objects", "foreground", "voxel_size_nm",
        "seconds", "target", "objects_csv", "model_loads"}``; ``model_loads`` maps each
        worker to the times it loaded the model (1: once per worker, not per block).

    Raises:
        DataError: unreadable input (named).
        FileExistsError: the output exists and is not this job's unfinished run (without
            ``force``).
        ValueError: bad arguments, or an unreachable scheduler.
    """
    from mitoseg.objects import combine_moments, rows_from_moments, write_object_table

    if block_z < 1:
        raise ValueError(f"block_z must be >= 1, got {block_z}")
    if ngff_version not in ngff.NGFF_VERSIONS:
        raise ValueError(
            f"ngff_version must be one of {sorted(ngff.NGFF_VERSIONS)}, got {ngff_version!r}"
        )
    if source.rstrip("/") == target.rstrip("/"):
        raise ValueError(f"{target}: the output must differ from the input")
    start = time.perf_counter()
    vol = open_volume(source, voxel_size_nm)
    vol.close()
    plan_json = plan.model_dump_json()
    job = {
        "source": source,
        "shape": list(vol.shape),
        "dtype": str(vol.dtype),
        "block_z": block_z,
        "probabilities": bool(probabilities),
        "ngff": ngff_version,
        "voxel_size_nm": list(vol.voxel_size_nm) if vol.voxel_size_nm else None,
        "plan_sha256": hashlib.sha256(plan_json.encode()).hexdigest(),
    }
    fingerprint = hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:16]
    job["fingerprint"] = fingerprint
    status = ngff.output_status(target) if not force else None
    if force:
        ngff.remove_store(target)
    elif status is not None and status.get("fingerprint") != fingerprint:
        raise FileExistsError(
            f"{target}: exists and was written by another job (other input, model, plan or "
            "block size); use --force to replace it"
        )
    elif status is not None and status.get("status") == "complete":
        raise FileExistsError(f"{target}: exists (a completed job); use --force to replace it")
    spec = JobSpec(
        source=source,
        target=target,
        voxel_size_nm=tuple(vol.voxel_size_nm) if vol.voxel_size_nm else None,  # type: ignore[arg-type]
        shape=vol.shape,
        block_z=block_z,
        plan_json=plan_json,
        plugin=f"mitoseg-predictor-{fingerprint}",
        instance_class=_instance_class(plan),
        probabilities=bool(probabilities),
    )
    if status is None:
        root = ngff.create_output(
            target, shape=vol.shape, dtype=vol.dtype, voxel_size_nm=spec.voxel_size_nm,
            block_z=block_z, n_blocks=spec.n_blocks, ngff=ngff_version,
            instances=spec.instance_class is not None,
            probability_channels=plan.out_channels if probabilities else 0,
            job={**job, "blocks": spec.n_blocks, "started": time.time()},
        )  # fmt: skip
    else:
        root = ngff.open_output(target)
    done = _read_done(root, spec.n_blocks)
    todo = [b for b in range(spec.n_blocks) if done[b, 0] == 0]
    close: Callable[[], None] = lambda: None  # noqa: E731
    if client is None:
        client, close = _connect(workers, scheduler)
    try:
        client.register_plugin(PredictorPlugin(_model_payload(model), plan_json), name=spec.plugin)
        futures = [
            client.submit(
                _predict_block, spec, b, key=f"mitoseg-predict-{fingerprint}-{b}", pure=False
            )
            for b in todo
        ]
        _gather(client, futures, "blocks", progress)
        loads = client.run(_plugin_loads, spec.plugin)
        done = _read_done(root, spec.n_blocks)
        if (done[:, 0] == 0).any():
            raise RuntimeError(
                f"{target}: blocks {np.flatnonzero(done[:, 0] == 0).tolist()} not recorded"
            )
        n_objects = 0
        table = None
        if spec.instance_class is not None:
            counts = (done[:, 0] - 1).tolist()
            face_futures = [
                client.submit(
                    _face_task, spec, b, key=f"mitoseg-face-{fingerprint}-{b}", pure=False
                )
                for b in range(spec.n_blocks - 1)
            ]
            faces = dict(_gather(client, face_futures, "stitching", progress))
            mapping, n_objects = stitch_labels(counts, faces)
            offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            [mapping_future] = client.scatter([mapping], broadcast=True)
            relabel = [
                client.submit(
                    _relabel_task, spec, b, int(offsets[b]), mapping_future,
                    key=f"mitoseg-relabel-{fingerprint}-{b}", pure=False,
                )
                for b in range(spec.n_blocks)
            ]  # fmt: skip
            ids, moments = combine_moments(_gather(client, relabel, "instances", progress))
            rows = rows_from_moments(ids, moments, spec.voxel_size_nm, vol.shape[0] == 1)
            buf = io.StringIO()
            with tempfile.TemporaryDirectory() as tmp:
                local_csv = write_object_table(Path(tmp) / "objects.csv", rows)
                buf.write(local_csv.read_text())
            table = ngff.write_text(target, "objects.csv", buf.getvalue())
    finally:
        with contextlib.suppress(Exception):  # the cluster may be gone already
            client.unregister_worker_plugin(spec.plugin)
        close()
    fg = float(done[:, 1].sum()) / float(np.prod(vol.shape))
    info = {**dict(root.attrs)["mitoseg"]}
    info.update(
        {"status": "complete", "finished": time.time(), "objects": n_objects, "foreground": fg}
    )
    root.attrs.update({"mitoseg": info})
    # after "complete": a kill before this line leaves only a temporary array behind
    if ngff.LOCAL_ARRAY in root:
        del root[ngff.LOCAL_ARRAY]
    return {
        "shape": list(vol.shape),
        "blocks": spec.n_blocks,
        "skipped": spec.n_blocks - len(todo),
        "objects": n_objects,
        "foreground": fg,
        "voxel_size_nm": list(spec.voxel_size_nm) if spec.voxel_size_nm else None,
        "seconds": round(time.perf_counter() - start, 3),
        "target": target,
        "objects_csv": table,
        "model_loads": {str(k): int(v) for k, v in loads.items()},
    }
