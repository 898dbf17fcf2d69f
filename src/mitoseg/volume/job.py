"""Blockwise, resumable volume prediction on a ``dask.distributed`` cluster.

This module runs the job: the predict tasks (they write the completion record, so its
rules stay in one place) and the phases around them. Around it: :mod:`mitoseg.volume.spec`
(the :class:`~mitoseg.volume.spec.JobSpec` every task carries, the default block depth),
:mod:`mitoseg.volume.worker` (the model and input kept on each worker),
:mod:`mitoseg.volume.cluster` (the embedded ``LocalCluster`` or a running scheduler),
:mod:`mitoseg.volume.stitch` (regions and instances across block faces),
:mod:`mitoseg.volume.tiles` (YX tiles) and :mod:`mitoseg.volume.ngff` (the output).

:func:`run_volume_job` cuts the volume into z-blocks of whole slices (``block_z`` each,
the last one shorter), or with ``block_yx`` into ``block_z x block_yx x block_yx``
boxes. Each block is read with ``plan.z_halo`` (``z_context + z_average``) extra slices
on both sides, clamped at the volume ends, so a 2.5D network sees exactly the neighbours
it sees on the whole stack and z-averaged probabilities average the same slices. Whole
slices run through the pure core (:func:`mitoseg.inference.predict.iter_stack_probabilities`
with the model's :class:`~mitoseg.inference.plan.InferencePlan`: the same normalisation per whole
slice, tiling, blending and threshold) and are cropped back. YX boxes first get every
slice's normalisation (a task per z-block), then run the tiles of the global tile grid
they overlap (:func:`mitoseg.volume.tiles.predict_region`). Either way every voxel is
computed exactly as whole-stack ``mitoseg predict`` computes it: the mask is identical
whatever the input's chunking and the block shape.

Phases (the output layout is in :mod:`mitoseg.volume.ngff`):

1. **predict** (one task per unfinished block): image copy, mask, optional
   probabilities and per-block instance labels (26-connected components, ids
   ``1 .. n_b``) with their pyramids; then the block's row of the completion record.
   A block killed half-way has no row and is redone on restart: it is either fully
   written or redone. YX blocks of a plan with hysteresis split this in three: each
   block's 8-connected 2D regions of the thresholded slices with a seeded flag (their
   own completion record), the regions touching across tile faces in a slice merged
   (a merged region is kept when any part reaches the seed threshold, as
   :func:`mitoseg.inference.keep_seeded_regions` decides on the whole slice), then each
   block's mask from its kept regions, instance labels and completion row.
2. **stitch** (cellpose distributed style): ids are offset by the running count of the
   previous blocks, labels touching across each block's upper z, y and x faces
   (26-connectivity, so across edges and corners too) are merged with a graph's
   connected components (scipy), and components are numbered by the scan position of
   their first voxel, so the ids equal :func:`mitoseg.inference.objects.instance_labels` of the
   whole mask.
3. **relabel** (one task per block, idempotent): final ids (a lookup table from the
   block's local ids) and pyramid into ``labels/instances``; moments of the block's local
   labels (dense ids: counted, not sorted) go out under their final ids and are combined
   into ``objects.csv`` (an object is 3D-connected, so its slices are its z extent).

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
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from mitoseg.inference.plan import InferencePlan
from mitoseg.volume import ngff
from mitoseg.volume.cluster import connect, gather
from mitoseg.volume.spec import JobSpec, auto_block_z
from mitoseg.volume.stitch import kept_regions, seam_task, stitch_instances
from mitoseg.volume.store import Volume, open_volume
from mitoseg.volume.worker import PredictorPlugin, model_payload, plugin_loads
from mitoseg.volume.worker import worker_predictor as _predictor
from mitoseg.volume.worker import worker_volume as _volume

__all__ = ["BLOCK_PARTS", "run_volume_job"]


def _block_probabilities(
    spec: JobSpec, plan: InferencePlan, b: int, ranges: dict[int, Any] | None
) -> tuple[np.ndarray, Any]:
    """``(raw, probabilities)`` of block ``b``: its own raw voxels ``(z, y, x)`` and an
    iterator of its slices' ``(y, x, C)`` float32 probabilities."""
    from mitoseg.inference.predict import iter_stack_probabilities

    vol = _volume(spec)
    z0, z1, y0, y1, x0, x1 = spec.region(b)
    r0, r1 = max(0, z0 - plan.z_halo), min(spec.shape[0], z1 + plan.z_halo)
    if spec.block_yx is None:  # whole slices: the core itself, on the block's stack
        raw = vol.read(r0, r1)
        # the halo's slices are context; only those z-averaging needs are predicted
        stream = iter_stack_probabilities(_predictor(spec), raw, plan, start=z0 - r0, stop=z1 - r0)
        return raw[z0 - r0 : z1 - r0], stream
    from mitoseg.volume.tiles import predict_region

    assert ranges is not None
    # as for whole slices: predict the block's slices and the z-averaging halo only
    lo, hi = max(r0, z0 - plan.z_average), min(r1, z1 + plan.z_average)
    per_slice = predict_region(
        vol.read_region, _predictor(spec), plan, spec.shape[1:], (r0, r1),
        (y0, y1, x0, x1), [ranges[z] for z in range(r0, r1)], (lo - r0, hi - r0),
    )  # fmt: skip
    return vol.read_region(z0, z1, y0, y1, x0, x1), _z_averaged(per_slice, plan, r0, z0, z1)


def _z_averaged(per_slice: np.ndarray, plan: InferencePlan, r0: int, z0: int, z1: int) -> Any:
    """Slices ``z0 .. z1-1`` of a ``(depth, y, x, C)`` stack read from ``r0``, averaged
    over ``z - r .. z + r`` as :func:`mitoseg.inference.predict.iter_stack_probabilities` does."""
    from mitoseg.inference.predict import z_mean

    depth, r = per_slice.shape[0], plan.z_average
    for z in range(z0, z1):
        yield per_slice[z - r0] if r == 0 else z_mean(per_slice, z - r0, depth, r)


#: Parts of a predict task, timed in each block (``block_parts_seconds`` of the summary).
BLOCK_PARTS = ("read", "predict", "write", "instances")


def _predict_block(
    spec: JobSpec, b: int, ranges: dict[int, Any] | None = None
) -> tuple[int, int, int, float, dict[str, float]]:
    """Phase 1 for block ``b``; returns ``(b, local objects, foreground voxels, seconds,
    {part: seconds})`` with the parts of :data:`BLOCK_PARTS`: reading the input,
    normalising, predicting and deciding the mask (YX blocks read and predict their tiles
    together: both count as ``read``, ``predict`` is then the mask decision alone),
    writing image, mask and probabilities with their pyramids, and the block's instance
    labels with the completion record.

    ``ranges`` (YX blocks only): ``{z: (lo, hi) or None}`` normalisation of every slice
    the block reads (:func:`mitoseg.volume.tiles.slice_normalization`).
    """
    from mitoseg.inference.predict import decide_mask

    started = time.perf_counter()
    plan = spec.plan()
    raw, stream = _block_probabilities(spec, plan, b, ranges)
    marks = [time.perf_counter()]
    mask = np.zeros(raw.shape, dtype=np.uint8)
    probs = _probability_buffer(spec, plan, raw.shape)
    for i, p in enumerate(stream):
        mask[i] = decide_mask(p, plan)
        _store_probabilities(probs, i, p)
    marks.append(time.perf_counter())
    root = ngff.open_output(spec.target)
    _write_image(spec, root, b, raw, probs)
    return _mask_out(spec, root, b, mask, started, marks)


def _probability_buffer(
    spec: JobSpec, plan: InferencePlan, shape: tuple[int, ...]
) -> np.ndarray | None:
    """``(C, z, y, x)`` uint8 buffer for the stored probabilities (None: not stored)."""
    return np.zeros((plan.out_channels, *shape), dtype=np.uint8) if spec.probabilities else None


def _store_probabilities(probs: np.ndarray | None, i: int, p: np.ndarray) -> None:
    if probs is not None:
        probs[:, i] = np.rint(np.clip(p, 0, 1) * 255).astype(np.uint8).transpose(2, 0, 1)


def _write_image(
    spec: JobSpec, root: Any, b: int, raw: np.ndarray, probs: np.ndarray | None
) -> None:
    """Block ``b``'s image copy and probabilities, with their pyramids."""
    z0, _, y0, _, x0, _ = spec.region(b)
    ngff.write_levels(root, raw, z0, False, y0, x0)
    if probs is not None:
        ngff.write_levels(root["probabilities"], probs, z0, False, y0, x0)


def _mask_out(
    spec: JobSpec, root: Any, b: int, mask: np.ndarray, started: float, marks: list[float]
) -> tuple[int, int, int, float, dict[str, float]]:
    """Block ``b``'s mask with its pyramid (``write`` goes on from ``marks[-1]``), its
    instance labels (26-connected, ids ``1 .. n``), then its row of the completion
    record, last; returns the predict task's result (see :func:`_predict_block`)."""
    from mitoseg.inference.objects import instance_labels

    z0, z1, y0, y1, x0, x1 = spec.region(b)
    ngff.write_levels(root["labels/mask"], mask, z0, True, y0, x0)
    marks.append(time.perf_counter())
    n = 0
    if spec.instance_class is not None:
        local, n = instance_labels(mask == spec.instance_class)
        root[ngff.LOCAL_ARRAY][z0:z1, y0:y1, x0:x1] = local
    fg = int(np.count_nonzero(mask))
    root[ngff.DONE_ARRAY][b] = np.array([n + 1, fg], dtype=np.int64)  # last: block complete
    marks.append(time.perf_counter())
    parts = dict(zip(BLOCK_PARTS, np.diff([started, *marks]).round(4).tolist(), strict=True))
    return b, n, fg, time.perf_counter() - started, parts


def _two_pass(spec: JobSpec, plan: InferencePlan) -> bool:
    """YX blocks of a binary plan with hysteresis: a region kept or dropped may cross
    blocks, so the mask is decided after the blocks' regions are stitched."""
    return (
        spec.block_yx is not None and plan.seed_threshold is not None and (plan.out_channels == 1)
    )


def _regions_block(
    spec: JobSpec, b: int, ranges: dict[int, Any] | None
) -> tuple[int, int, float, dict[str, float]]:
    """Hysteresis pass 1 for YX block ``b``: image and probabilities as
    :func:`_predict_block`, and the 8-connected regions of each slice's thresholded mask
    (ids ``1 .. n`` over the block's slices) into :data:`~mitoseg.volume.ngff.
    REGIONS_ARRAY` as ``id << 1 | seeded`` (seeded: a pixel reaches the plan's
    ``seed_threshold``); then the block's regions row. Returns ``(b, n, seconds,
    {part: seconds})`` (``instances``: 0 here)."""
    from scipy import ndimage

    started = time.perf_counter()
    plan = spec.plan()
    assert plan.seed_threshold is not None
    raw, stream = _block_probabilities(spec, plan, b, ranges)
    marks = [time.perf_counter()]
    regions = np.zeros(raw.shape, dtype=np.uint32)
    probs = _probability_buffer(spec, plan, raw.shape)
    eight, n = np.ones((3, 3), bool), 0
    for i, p in enumerate(stream):
        _store_probabilities(probs, i, p)
        labels, k = ndimage.label(p[..., 0] >= plan.decision, structure=eight)
        if k == 0:
            continue
        seeded = np.zeros(k + 1, dtype=np.uint32)
        seeded[labels[(p[..., 0] >= plan.seed_threshold) & (labels > 0)]] = 1
        ids = np.arange(k + 1, dtype=np.uint32) + n
        code = (ids << 1) | seeded
        code[0] = 0
        regions[i] = code[labels]
        n += k
    if n >= 2**31:
        raise ValueError(f"block {b}: {n} regions do not fit the region record; use a smaller "
                         "--block-z or --block-yx")  # fmt: skip
    marks.append(time.perf_counter())
    root = ngff.open_output(spec.target)
    _write_image(spec, root, b, raw, probs)
    z0, z1, y0, y1, x0, x1 = spec.region(b)
    root[ngff.REGIONS_ARRAY][z0:z1, y0:y1, x0:x1] = regions
    root[ngff.REGIONS_DONE_ARRAY][b] = np.array([n + 1], dtype=np.int64)  # last
    marks.append(time.perf_counter())
    parts = dict(zip(BLOCK_PARTS, [*np.diff([started, *marks]).round(4).tolist(), 0.0],
                     strict=True))  # fmt: skip
    return b, n, time.perf_counter() - started, parts


def _decide_block(
    spec: JobSpec, b: int, offset: int, keep: np.ndarray
) -> tuple[int, int, int, float, dict[str, float]]:
    """Hysteresis pass 3 for YX block ``b``: the mask is its kept regions; then mask,
    instance labels and the completion record as :func:`_predict_block` (same result)."""
    started = time.perf_counter()
    z0, z1, y0, y1, x0, x1 = spec.region(b)
    root = ngff.open_output(spec.target)
    codes = np.asarray(root[ngff.REGIONS_ARRAY][z0:z1, y0:y1, x0:x1])
    marks = [time.perf_counter()]
    ids = np.where(codes > 0, (codes >> 1).astype(np.int64) + offset, 0)
    mask = keep[ids].astype(np.uint8)
    marks.append(time.perf_counter())
    return _mask_out(spec, root, b, mask, started, marks)


def _ranges_task(spec: JobSpec, z0: int, z1: int) -> dict[int, Any]:
    """Normalisation ``(lo, hi)`` (None: blank) of slices ``z0 .. z1-1`` (YX blocks)."""
    from mitoseg.volume.tiles import slice_normalization

    vol = _volume(spec)
    norm = spec.plan().normalization
    return {
        z: slice_normalization(vol.read_region, z, spec.shape[1:], vol.dtype, norm)
        for z in range(z0, z1)
    }


def _read_done(root: Any, n_blocks: int, name: str = ngff.DONE_ARRAY) -> np.ndarray:
    """A completion record (``name``: the blocks' or, for hysteresis on YX blocks, their
    regions'); a row that cannot be read (killed mid-write) counts as 0."""
    arr = root[name]
    try:
        return np.asarray(arr[:])
    except Exception:
        out = np.zeros((n_blocks, arr.shape[1]), dtype=np.int64)
        for b in range(n_blocks):
            try:
                out[b] = arr[b]
            except Exception:
                out[b] = 0
        return out


def _slice_ranges(
    client: Any, spec: JobSpec, todo: list[int], z_halo: int, fingerprint: str, progress: bool
) -> dict[int, Any]:
    """YX blocks: the normalisation of every slice the unfinished blocks read, one task
    per z-block (empty for whole-slice blocks, which normalise their own slices)."""
    if spec.block_yx is None or not todo:
        return {}
    depth, bz = spec.shape[0], spec.block_z
    per_z = spec.grid[1] * spec.grid[2]
    zblocks = set()
    for b in todo:
        zb = b // per_z
        lo, hi = max(0, zb * bz - z_halo), min(depth, (zb + 1) * bz + z_halo)
        zblocks.update(range(lo // bz, (hi - 1) // bz + 1))
    futures = [
        client.submit(
            _ranges_task, spec, zb * bz, min(depth, (zb + 1) * bz),
            key=f"mitoseg-ranges-{fingerprint}-{zb}", pure=False,
        )
        for zb in sorted(zblocks)
    ]  # fmt: skip
    ranges: dict[int, Any] = {}
    for part in gather(client, futures, "normalisation", progress):
        ranges.update(part)
    return ranges


def _block_ranges(
    spec: JobSpec, b: int, z_halo: int, ranges: dict[int, Any]
) -> dict[int, Any] | None:
    """The slice normalisations block ``b`` reads (None for whole-slice blocks)."""
    if spec.block_yx is None:
        return None
    z0, z1 = spec.region(b)[:2]
    return {z: ranges[z] for z in range(max(0, z0 - z_halo), min(spec.shape[0], z1 + z_halo))}


def _hysteresis_blocks(
    client: Any,
    spec: JobSpec,
    root: Any,
    todo: list[int],
    ranges: dict[int, Any],
    fingerprint: str,
    progress: bool,
) -> tuple[list[Any], dict[str, float]]:
    """The predict phase of YX blocks with hysteresis, in three passes: each unfinished
    block's 2D regions (:func:`_regions_block`, skipped where recorded), the regions
    touching across block faces within a slice merged with their seeds
    (:func:`~mitoseg.volume.stitch.seam_task`,
    :func:`~mitoseg.volume.stitch.kept_regions`), then each unfinished block's mask, its
    kept regions (:func:`_decide_block`). Returns the blocks' results as
    :func:`_predict_block` gives them (seconds and parts of both passes added) and the
    wall time of ``regions`` and ``seams`` (with ``regions_skipped``: unfinished blocks
    whose regions an earlier run recorded)."""
    plan, n_blocks = spec.plan(), spec.n_blocks
    recorded = _read_done(root, n_blocks, ngff.REGIONS_DONE_ARRAY)
    futures = [
        client.submit(
            _regions_block, spec, b, _block_ranges(spec, b, plan.z_halo, ranges),
            key=f"mitoseg-regions-{fingerprint}-{b}", pure=False,
        )
        for b in todo if recorded[b, 0] == 0
    ]  # fmt: skip
    phases: dict[str, float] = {"regions_skipped": len(todo) - len(futures)}
    phase = time.perf_counter()
    first = {r[0]: r for r in gather(client, futures, "regions", progress)}
    phases["regions"] = time.perf_counter() - phase
    recorded = _read_done(root, n_blocks, ngff.REGIONS_DONE_ARRAY)
    if (recorded[:, 0] == 0).any():
        raise RuntimeError(
            f"{spec.target}: regions of blocks {np.flatnonzero(recorded[:, 0] == 0).tolist()} "
            "not recorded"
        )
    offsets = np.concatenate([[0], np.cumsum(recorded[:, 0] - 1)]).astype(np.int64)
    phase = time.perf_counter()
    [offsets_future] = client.scatter([offsets], broadcast=True)
    seam_futures = [
        client.submit(
            seam_task, spec, b, offsets_future, key=f"mitoseg-seam-{fingerprint}-{b}",
            pure=False,
        )
        for b in range(n_blocks)
    ]  # fmt: skip
    seams = gather(client, seam_futures, "seams", progress, ordered=True)
    seeded = np.concatenate([np.zeros(1, bool), *[s for _, s in seams]])
    keep = kept_regions(int(offsets[-1]), np.concatenate([p for p, _ in seams]), seeded)
    [keep_future] = client.scatter([keep], broadcast=True)
    phases["seams"] = time.perf_counter() - phase
    futures = [
        client.submit(
            _decide_block, spec, b, int(offsets[b]), keep_future,
            key=f"mitoseg-decide-{fingerprint}-{b}", pure=False,
        )
        for b in todo
    ]  # fmt: skip
    results = []
    for b, n, fg, seconds, parts in gather(client, futures, "blocks", progress):
        if b in first:  # this run made the block's regions too
            _, _, more, more_parts = first[b]
            seconds += more
            parts = {k: parts[k] + more_parts[k] for k in BLOCK_PARTS}
        results.append((b, n, fg, seconds, parts))
    return results, phases


def run_volume_job(
    source: str,
    target: str,
    model: Any,
    plan: InferencePlan,
    *,
    workers: int = 2,
    scheduler: str | None = None,
    client: Any = None,
    block_z: int | None = None,
    block_yx: int | None = None,
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
        block_z: slices per block (and chunk depth of the output); None:
            :func:`~mitoseg.volume.spec.auto_block_z` for the plan and the volume.
        block_yx: cut each block further into YX tiles of this side (slices too large
            for one worker), computed as the whole slice (:mod:`mitoseg.volume.tiles`;
            hysteresis regions stitched across tiles first, :func:`_hysteresis_blocks`).
            None: whole slices. Pyramid levels: ``1 +`` the power of two in ``block_yx``.
        probabilities: also store ``(C, Z, Y, X)`` uint8 probabilities.
        force: replace an existing output (a complete one, another job's, or a non-output).
        voxel_size_nm: ``(z, y, x)`` nm overriding the input's metadata.
        ngff_version: ``0.5`` (Zarr v3) or ``0.4`` (Zarr v2) output.
        progress: progress bars over blocks.

    Returns:
        ``{"shape", "blocks", "block_z", "skipped", "regions_skipped", "objects",
        "foreground", "voxel_size_nm", "seconds", "target", "objects_csv", "model_loads",
        "block_voxels", "block_seconds", "block_parts_seconds", "phase_seconds"}``;
        ``skipped``: blocks an earlier run finished, ``regions_skipped``: unfinished
        blocks whose hysteresis regions an earlier run recorded (YX blocks with
        hysteresis; else 0); ``model_loads`` maps each worker to the times it loaded the
        model (1: once per worker, not per block); ``block_seconds`` summarises the
        predict tasks of this run (``n``, ``mean``, ``median``, ``max``),
        ``block_parts_seconds`` sums their parts (:data:`BLOCK_PARTS`) over the blocks,
        and ``phase_seconds`` is the wall time of ``predict`` (with hysteresis on YX
        blocks also of its ``regions`` and ``seams`` passes), ``stitch`` and ``relabel``.

    Raises:
        DataError: unreadable input (named).
        FileExistsError: the output exists and is not this job's unfinished run (without
            ``force``).
        ValueError: bad arguments, or an unreachable scheduler.
    """
    _check_arguments(source, target, block_z, block_yx, ngff_version)
    start = time.perf_counter()
    vol = open_volume(source, voxel_size_nm)
    vol.close()
    if block_z is None:
        block_z = auto_block_z(plan, vol.shape, block_yx)
    spec, root = _open_job(
        source, target, vol, plan, block_z, block_yx, bool(probabilities), ngff_version, force
    )
    done = _read_done(root, spec.n_blocks)
    todo = [b for b in range(spec.n_blocks) if done[b, 0] == 0]
    fingerprint = spec.plugin.removeprefix("mitoseg-predictor-")
    close: Callable[[], None] = lambda: None  # noqa: E731
    if client is None:
        client, close = connect(workers, scheduler)
    try:
        plugin = PredictorPlugin(model_payload(model), spec.plan_json, plan.calibration_images())
        client.register_plugin(plugin, name=spec.plugin)
        results, phases = _predict_phase(client, spec, root, todo, fingerprint, progress)
        regions_skipped = int(phases.pop("regions_skipped", 0))
        loads = client.run(plugin_loads, spec.plugin)
        done = _read_done(root, spec.n_blocks)
        if (done[:, 0] == 0).any():
            raise RuntimeError(
                f"{target}: blocks {np.flatnonzero(done[:, 0] == 0).tolist()} not recorded"
            )
        n_objects, table = 0, None
        if spec.instance_class is not None:
            n_objects, table = stitch_instances(client, spec, done, fingerprint, progress, phases)
    finally:
        with contextlib.suppress(Exception):  # the cluster may be gone already
            client.unregister_worker_plugin(spec.plugin)
        close()
    fg = float(done[:, 1].sum()) / float(np.prod(vol.shape))
    _complete(root, n_objects, fg)
    return _summary(
        spec, todo=todo, regions_skipped=regions_skipped, objects=n_objects, foreground=fg,
        started=start, table=table, loads=loads, results=results, phases=phases,
    )  # fmt: skip


def _summary(
    spec: JobSpec,
    *,
    todo: list[int],
    regions_skipped: int,
    objects: int,
    foreground: float,
    started: float,
    table: str | None,
    loads: dict[str, int],
    results: list[Any],
    phases: dict[str, float],
) -> dict[str, Any]:
    """The summary :func:`run_volume_job` returns (its keys are listed there)."""
    return {
        "shape": list(spec.shape),
        "blocks": spec.n_blocks,
        "block_z": spec.block_z,
        "skipped": spec.n_blocks - len(todo),
        "regions_skipped": regions_skipped,
        "objects": objects,
        "foreground": foreground,
        "voxel_size_nm": list(spec.voxel_size_nm) if spec.voxel_size_nm else None,
        "seconds": round(time.perf_counter() - started, 3),
        "target": spec.target,
        "objects_csv": table,
        "model_loads": {str(k): int(v) for k, v in loads.items()},
        "block_voxels": int(np.prod(spec.block_shape)),
        "block_seconds": _stats([r[3] for r in results]),
        "block_parts_seconds": {k: round(sum(r[4][k] for r in results), 3) for k in BLOCK_PARTS},
        "phase_seconds": {k: round(v, 3) for k, v in phases.items()},
    }


def _check_arguments(
    source: str, target: str, block_z: int | None, block_yx: int | None, ngff_version: str
) -> None:
    """The argument checks of :func:`run_volume_job` (before anything is opened)."""
    if block_z is not None and (isinstance(block_z, bool) or block_z < 1):
        raise ValueError(f"block_z must be None or >= 1, got {block_z}")
    if block_yx is not None and (isinstance(block_yx, bool) or block_yx < 1):
        raise ValueError(f"block_yx must be None or >= 1, got {block_yx}")
    if ngff_version not in ngff.NGFF_VERSIONS:
        raise ValueError(
            f"ngff_version must be one of {sorted(ngff.NGFF_VERSIONS)}, got {ngff_version!r}"
        )
    if source.rstrip("/") == target.rstrip("/"):
        raise ValueError(f"{target}: the output must differ from the input")


def _open_job(
    source: str,
    target: str,
    vol: Volume,
    plan: InferencePlan,
    block_z: int,
    block_yx: int | None,
    probabilities: bool,
    ngff_version: str,
    force: bool,
) -> tuple[JobSpec, Any]:
    """The job's spec and output root: a new output, or this job's unfinished one to
    resume (its fingerprint: input, model plan and block size, as in the ``mitoseg``
    attribute).

    Raises:
        FileExistsError: the output exists and is not this job's unfinished run (without
            ``force``, which removes it first).
    """
    plan_json = plan.model_dump_json()
    job = {
        "source": source,
        "shape": list(vol.shape),
        "dtype": str(vol.dtype),
        "block_z": block_z,
        "probabilities": probabilities,
        "ngff": ngff_version,
        "voxel_size_nm": list(vol.voxel_size_nm) if vol.voxel_size_nm else None,
        # the input's scale as written to the output (axes without a unit keep theirs)
        "scale": None if vol.scale is None else vol.scale.model_dump(mode="json"),
        "plan_sha256": hashlib.sha256(plan_json.encode()).hexdigest(),
    }
    if block_yx is not None:
        job["block_yx"] = int(block_yx)
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
        instance_class=plan.foreground_class,
        probabilities=probabilities,
        block_yx=None if block_yx is None else int(block_yx),
    )
    if status is not None:
        return spec, ngff.open_output(target)
    root = ngff.create_output(
        target, shape=vol.shape, dtype=vol.dtype, scale=vol.scale,
        block_z=block_z, n_blocks=spec.n_blocks, ngff=ngff_version,
        instances=spec.instance_class is not None,
        probability_channels=plan.out_channels if probabilities else 0,
        job={**job, "blocks": spec.n_blocks, "started": time.time()},
        block_yx=spec.block_yx, regions=_two_pass(spec, plan),
    )  # fmt: skip
    return spec, root


def _predict_phase(
    client: Any, spec: JobSpec, root: Any, todo: list[int], fingerprint: str, progress: bool
) -> tuple[list[Any], dict[str, float]]:
    """Phase 1 on the unfinished blocks ``todo`` (YX blocks first get their slices'
    normalisation; with hysteresis :func:`_hysteresis_blocks`). Returns the results of
    :func:`_predict_block` and the phases' wall times (``predict``, and with hysteresis
    ``regions``, ``seams``, ``regions_skipped``)."""
    plan = spec.plan()
    ranges = _slice_ranges(client, spec, todo, plan.z_halo, fingerprint, progress)
    phase = time.perf_counter()
    if _two_pass(spec, plan):
        results, phases = _hysteresis_blocks(
            client, spec, root, todo, ranges, fingerprint, progress
        )
    else:
        futures = [
            client.submit(
                _predict_block, spec, b, _block_ranges(spec, b, plan.z_halo, ranges),
                key=f"mitoseg-predict-{fingerprint}-{b}", pure=False,
            )
            for b in todo
        ]  # fmt: skip
        results, phases = gather(client, futures, "blocks", progress), {}
    phases["predict"] = time.perf_counter() - phase
    return results, phases


def _complete(root: Any, n_objects: int, foreground: float) -> None:
    """Mark the output complete, then drop the job's temporary arrays."""
    info = {**dict(root.attrs)["mitoseg"]}
    info.update(
        {"status": "complete", "finished": time.time(), "objects": n_objects,
         "foreground": foreground}
    )  # fmt: skip
    root.attrs.update({"mitoseg": info})
    # after "complete": a kill before this line leaves only a temporary array behind
    for name in (ngff.LOCAL_ARRAY, ngff.REGIONS_ARRAY, ngff.REGIONS_DONE_ARRAY):
        if name in root:
            del root[name]


def _stats(values: list[float]) -> dict[str, float | int]:
    """``n``, ``mean``, ``median``, ``max`` (seconds) of the blocks computed by this run."""
    if not values:
        return {"n": 0}
    arr = np.asarray(values, dtype=np.float64)
    return {
        "n": int(arr.size),
        "mean": round(float(arr.mean()), 4),
        "median": round(float(np.median(arr)), 4),
        "max": round(float(arr.max()), 4),
    }
