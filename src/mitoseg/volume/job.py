"""Blockwise, resumable volume prediction on a ``dask.distributed`` cluster.

Why one module of about 790 lines: the phases (plan, blocks, stitch, finish) share one
output layout and one resume protocol (a block counts as done only after its data); split
over files, the rules of the completion record would be too. The YX-tile arithmetic lives
in :mod:`mitoseg.volume.tiles`.

:func:`run_volume_job` cuts the volume into z-blocks of whole slices (``block_z`` each,
the last one shorter), or with ``block_yx`` into ``block_z x block_yx x block_yx``
boxes. Each block is read with ``plan.z_halo`` (``z_context + z_average``) extra slices
on both sides, clamped at the volume ends, so a 2.5D network sees exactly the neighbours
it sees on the whole stack and z-averaged probabilities average the same slices. Whole
slices run through the pure core (:func:`mitoseg.inference.iter_stack_probabilities`
with the model's :class:`~mitoseg.plan.InferencePlan`: the same normalisation per whole
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
   their first voxel, so the ids equal :func:`mitoseg.objects.instance_labels` of the
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
import io
import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from distributed import WorkerPlugin

from mitoseg.inference.plan import InferencePlan
from mitoseg.volume import ngff
from mitoseg.volume.store import Volume, open_volume

__all__ = [
    "JobSpec",
    "PredictorPlugin",
    "auto_block_z",
    "block_bounds",
    "face_pairs",
    "kept_regions",
    "local_cluster",
    "run_volume_job",
    "stitch_global",
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
    block_yx: int | None = None

    @property
    def grid(self) -> tuple[int, int, int]:
        """Blocks along z, y and x (one along y and x for whole-slice blocks)."""
        z, y, x = self.shape
        side = self.block_yx
        return (
            -(-z // self.block_z),
            1 if side is None else -(-y // side),
            (1 if side is None else -(-x // side)),
        )

    @property
    def block_shape(self) -> tuple[int, int, int]:
        """``(block_z, by, bx)``: the size of a full block."""
        _, y, x = self.shape
        side = self.block_yx
        return self.block_z, y if side is None else side, x if side is None else side

    @property
    def n_blocks(self) -> int:
        """Number of blocks (z-major, then y, then x)."""
        nz, ny, nx = self.grid
        return nz * ny * nx

    def region(self, b: int) -> tuple[int, int, int, int, int, int]:
        """``(z0, z1, y0, y1, x0, x1)`` block ``b`` writes."""
        _, ny, nx = self.grid
        zb, rest = divmod(b, ny * nx)
        yb, xb = divmod(rest, nx)
        bz, by, bx = self.block_shape
        z, y, x = self.shape
        return (zb * bz, min(z, (zb + 1) * bz), yb * by, min(y, (yb + 1) * by), xb * bx,
                min(x, (xb + 1) * bx))  # fmt: skip

    def plan(self) -> InferencePlan:
        """The inference plan."""
        return InferencePlan.model_validate_json(self.plan_json)


#: Smallest automatic block depth (slices), the largest share of a block's predictions
#: the z-averaging halo may take, and the voxel budget of one automatic block.
MIN_BLOCK_Z, MAX_HALO_SHARE, AUTO_BLOCK_VOXELS = 8, 0.10, 2**27


def auto_block_z(plan: InferencePlan, shape: tuple[int, int, int], block_yx: int | None) -> int:
    """The default slices per block for ``plan`` on a ``(Z, Y, X)`` volume.

    A block predicts its own slices plus ``plan.z_average`` on each side (the halo its
    z-averaging reads; 2.5D context slices are only read). The depth is the smallest at
    or above :data:`MIN_BLOCK_Z` whose halo costs at most :data:`MAX_HALO_SHARE` of the
    block's predictions (20 slices for ``z_average = 1``), within
    :data:`AUTO_BLOCK_VOXELS` voxels per block (whole slices, or ``block_yx`` tiles) and
    the volume's depth. Deeper blocks mean fewer of them: a volume of few blocks spreads
    less evenly over the workers.
    """
    depth, y, x = shape
    side = (y * x) if block_yx is None else min(y, block_yx) * min(x, block_yx)
    want = max(MIN_BLOCK_Z, math.ceil(2 * plan.z_average / MAX_HALO_SHARE))
    budget = max(MIN_BLOCK_Z, AUTO_BLOCK_VOXELS // max(1, side))
    return max(1, min(want, budget, depth))


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
        calibration: the plan's int8 calibration inputs
            (:meth:`~mitoseg.plan.InferencePlan.calibration_images`; its JSON does not
            hold them), so every worker compiles the engine the plan was decided with.
    """

    def __init__(
        self, model: bytes | Any, plan_json: str, calibration: np.ndarray | None = None
    ) -> None:
        self.model = model
        self.plan_json = plan_json
        self.calibration = calibration
        self.predict_batch: Callable[[np.ndarray], np.ndarray] | None = None
        self.loads = 0
        #: volumes opened on this worker, by source and voxel size (opened once per job)
        self.volumes: dict[str, Volume] = {}

    def setup(self, worker: Any) -> None:
        """Called once when the plugin reaches a worker: load the model."""
        from mitoseg.inference.predict import as_predict_batch

        plan = InferencePlan.model_validate_json(self.plan_json)
        net = self.model
        if isinstance(net, bytes):
            import keras

            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "model.keras"
                path.write_bytes(net)
                net = keras.models.load_model(path, compile=False)
        if hasattr(net, "predict_on_batch"):
            from mitoseg.inference.runtime import predictor_for_plan

            self.predict_batch = predictor_for_plan(net, plan, calibration=self.calibration)
        else:
            self.predict_batch = as_predict_batch(net)
        self.loads += 1


def _plugin(spec: JobSpec) -> PredictorPlugin:
    """The job's plugin on the worker running the calling task."""
    from distributed import get_worker

    return get_worker().plugins[spec.plugin]


def _volume(spec: JobSpec) -> Volume:
    """The job's input volume, opened once per worker (kept by the job's plugin)."""
    volumes = _plugin(spec).volumes
    key = f"{spec.source}|{spec.voxel_size_nm}"
    if key not in volumes:
        volumes[key] = open_volume(spec.source, spec.voxel_size_nm)
    return volumes[key]


def _predictor(spec: JobSpec) -> Callable[[np.ndarray], np.ndarray]:
    plugin = _plugin(spec)
    assert plugin.predict_batch is not None
    return plugin.predict_batch


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
    over ``z - r .. z + r`` as :func:`mitoseg.inference.iter_stack_probabilities` does."""
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


def _line_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairs ``(a[u, v], b[u, v + dv])`` with both > 0, ``dv`` in ``0 .. 2``: ``a`` is
    ``(U, V)``, ``b`` is ``(U, V + 2)`` (one more on each side of ``v``; ``u`` is z, so
    regions touch within one slice only)."""
    found = [np.zeros((0, 2), dtype=np.int64)]
    w = a.shape[1]
    for dv in (0, 1, 2):
        other = b[:, dv : dv + w]
        both = (a > 0) & (other > 0)
        if both.any():
            found.append(np.stack([a[both], other[both]], axis=1).astype(np.int64))
    return np.unique(np.concatenate(found), axis=0)


def _seam_task(spec: JobSpec, b: int, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hysteresis pass 2 for YX block ``b``: global ids of its regions touching the
    blocks after it on y or x in the same slice (8-connected: with the in-plane diagonal
    neighbours), and its regions' seeded flags.

    Returns:
        ``(pairs (N, 2) int64 global ids, seeded (n_b,) bool)``.
    """
    z0, z1, y0, y1, x0, x1 = spec.region(b)
    lo, hi = (z0, y0, x0), (z1, y1, x1)
    arr = ngff.open_output(spec.target)[ngff.REGIONS_ARRAY]
    own = np.asarray(arr[z0:z1, y0:y1, x0:x1])
    _, ny, nx = spec.grid
    per_z = ny * nx

    def global_ids(codes: np.ndarray, ys: int, xs: int) -> np.ndarray:
        """Region codes of a ``(z, y, x)`` box of this z-block at ``(z0, ys, xs)``."""
        yb = (np.arange(codes.shape[1]) + ys) // spec.block_shape[1]
        xb = (np.arange(codes.shape[2]) + xs) // spec.block_shape[2]
        block = (b // per_z) * per_z + yb[:, None] * nx + xb[None, :]
        return np.where(codes > 0, (codes >> 1).astype(np.int64) + offsets[block][None], 0)

    pairs = [np.zeros((0, 2), dtype=np.int64)]
    for axis in (1, 2):
        if hi[axis] >= spec.shape[axis]:
            continue
        other_axis = 3 - axis
        start = [z0, y0, x0]
        start[axis] = hi[axis] - 1
        a = global_ids(own.take([-1], axis=axis), start[1], start[2])
        wide = [slice(z0, z1), slice(y0, y1), slice(x0, x1)]
        wide[axis] = slice(hi[axis], hi[axis] + 1)
        o_lo, o_hi = max(0, lo[other_axis] - 1), min(spec.shape[other_axis], hi[other_axis] + 1)
        wide[other_axis] = slice(o_lo, o_hi)
        other = global_ids(np.asarray(arr[tuple(wide)]), wide[1].start, wide[2].start)
        pad = [(0, 0)] * 3
        pad[other_axis] = (1 - (lo[other_axis] - o_lo), 1 - (o_hi - hi[other_axis]))
        other = np.pad(other, pad)  # zeros past the volume's edges
        pairs.append(_line_pairs(np.squeeze(a, axis), np.squeeze(other, axis)))
    count = int(offsets[b + 1] - offsets[b])
    seeded = np.zeros(count + 1, dtype=bool)
    fg = own > 0
    seeded[(own[fg] >> 1).astype(np.int64)] = (own[fg] & 1).astype(bool)
    return np.concatenate(pairs), seeded[1:]


def kept_regions(total: int, pairs: np.ndarray, seeded: np.ndarray) -> np.ndarray:
    """Hysteresis across blocks: which regions a whole slice keeps.

    Args:
        total: global region ids ``1 .. total``.
        pairs: ``(N, 2)`` int64 ids of regions that touch (in one slice).
        seeded: ``(total + 1,)`` bool, a region reaches the seed threshold (entry 0 unused).

    Returns:
        ``(total + 1,)`` bool: the region's merged region has a seed (``[0]`` False).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    r, c = (pairs[:, 0], pairs[:, 1]) if pairs.size else (np.zeros(0, np.int64),) * 2
    graph = coo_matrix((np.ones(r.size, dtype=np.int8), (r, c)), shape=(total + 1, total + 1))
    _, comp = connected_components(graph, directed=False)
    any_seed = np.zeros(comp.max() + 1, dtype=bool)
    np.logical_or.at(any_seed, comp, np.asarray(seeded, dtype=bool))
    keep = any_seed[comp]
    keep[0] = False
    return keep


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


def _plane_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairs ``(a[u, v], b[u + 1 + du, v + 1 + dv])`` with both > 0, ``du, dv`` in
    ``-1 .. 1``: ``a`` is ``(U, V)``, ``b`` is ``(U + 2, V + 2)`` (one more on each side)."""
    h, w = a.shape
    top = int(max(a.max(initial=0), b.max(initial=0))) + 1
    packed = top <= 3_037_000_499  # pair (i, j) as one int64 i * top + j: a 1-D unique
    found = []
    for du in (0, 1, 2):
        for dv in (0, 1, 2):
            other = b[du : du + h, dv : dv + w]
            both = (a > 0) & (other > 0)
            if not both.any():
                continue
            i, j = a[both].astype(np.int64), other[both].astype(np.int64)
            found.append(np.unique(i * top + j) if packed else np.stack([i, j], axis=1))
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    if not packed:  # ids too large to pack: sort the rows
        return np.unique(np.concatenate(found), axis=0)
    keys = np.unique(np.concatenate(found))
    return np.stack([keys // top, keys % top], axis=1)


def face_pairs(last: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Label pairs touching across a z face with 26-connectivity.

    Args:
        last: ``(Y, X)`` labels of the last slice of a block.
        first: ``(Y, X)`` labels of the first slice of the next block.

    Returns:
        ``(N, 2)`` int64 unique ``(label in last, label in first)`` pairs, both > 0.
    """
    return _plane_pairs(np.asarray(last), np.pad(np.asarray(first), 1))


def _global_ids(spec: JobSpec, local: np.ndarray, origin: tuple[int, int, int],
                offsets: np.ndarray) -> np.ndarray:  # fmt: skip
    """Local labels of a ``(z, y, x)`` box at ``origin`` -> global ids (``local +``
    the offset of the block each voxel belongs to; 0 stays 0)."""
    _, ny, nx = spec.grid
    idx = [
        (np.arange(n) + o) // s
        for n, o, s in zip(local.shape, origin, spec.block_shape, strict=True)
    ]
    block = (idx[0][:, None, None] * ny + idx[1][None, :, None]) * nx + idx[2][None, None, :]
    return np.where(local > 0, local.astype(np.int64) + offsets[block], 0)


def _face_task(spec: JobSpec, b: int, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Block ``b``'s global ids touching the blocks after it on z, y or x (26-connected:
    across each upper face, with the in-plane neighbours, so edges and corners count),
    and the scan position (flat index) of each of its labels' first voxel.

    Returns:
        ``(pairs (N, 2) int64 global ids, firsts (n_b,) int64)``.
    """
    from mitoseg.inference.objects import first_voxels

    region = spec.region(b)
    lo, hi = region[0::2], region[1::2]
    local = ngff.open_output(spec.target)[ngff.LOCAL_ARRAY]
    own = np.asarray(local[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]])
    pairs = [np.zeros((0, 2), dtype=np.int64)]
    for axis in range(3):
        if hi[axis] >= spec.shape[axis]:
            continue
        # this block's last plane on `axis`, and the next plane one wider on both sides
        start = list(lo)
        start[axis] = hi[axis] - 1
        a = _global_ids(spec, own.take([-1], axis=axis), tuple(start), offsets)
        wide = [slice(max(0, lo[i] - 1), min(spec.shape[i], hi[i] + 1)) for i in range(3)]
        wide[axis] = slice(hi[axis], hi[axis] + 1)
        other = _global_ids(
            spec, np.asarray(local[tuple(wide)]), tuple(w.start for w in wide), offsets
        )
        pad = [
            (0, 0) if i == axis else (1 - (lo[i] - wide[i].start), 1 - (wide[i].stop - hi[i]))
            for i in range(3)
        ]
        other = np.pad(other, pad)  # zeros past the volume's edges
        pairs.append(_plane_pairs(np.squeeze(a, axis), np.squeeze(other, axis)))
    ids, first = first_voxels(own)
    zyx = np.unravel_index(first, own.shape)
    flat = np.ravel_multi_index(tuple(c + o for c, o in zip(zyx, lo, strict=True)), spec.shape)
    firsts = np.zeros(int(ids.max()) if ids.size else 0, dtype=np.int64)
    firsts[ids - 1] = flat
    return np.concatenate(pairs), firsts


def stitch_global(total: int, pairs: np.ndarray, firsts: np.ndarray) -> tuple[np.ndarray, int]:
    """Merge touching labels and number the merged objects in scan order.

    Args:
        total: global ids ``1 .. total``.
        pairs: ``(N, 2)`` int64 global ids that touch.
        firsts: ``(total + 1,)`` sort key of each id (the flat index of its first voxel;
            entry 0 unused).

    Returns:
        ``(mapping, n)``: ``mapping[id]`` is the final id (``mapping[0] = 0``); final ids
        ``1 .. n`` follow the smallest key of each merged set, so they equal
        :func:`mitoseg.objects.instance_labels` of the whole mask.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if total == 0:
        return np.zeros(1, dtype=np.uint32), 0
    r, c = (pairs[:, 0], pairs[:, 1]) if pairs.size else (np.zeros(0, np.int64),) * 2
    graph = coo_matrix((np.ones(r.size, dtype=np.int8), (r, c)), shape=(total + 1, total + 1))
    _, comp = connected_components(graph, directed=False)
    comp = comp[1:]
    big = np.iinfo(np.int64).max
    first = np.full(comp.max() + 1, big)
    np.minimum.at(first, comp, np.asarray(firsts, dtype=np.int64)[1:])
    used = np.flatnonzero(first != big)
    rank = np.zeros(comp.max() + 1, dtype=np.uint32)
    rank[used[np.argsort(first[used], kind="stable")]] = np.arange(1, used.size + 1)
    mapping = np.zeros(total + 1, dtype=np.uint32)
    mapping[1:] = rank[comp]
    return mapping, int(used.size)


def stitch_labels(counts: list[int], faces: dict[int, np.ndarray]) -> tuple[np.ndarray, int]:
    """Global relabelling of per-block labels of z-blocks.

    Args:
        counts: objects per block (local ids ``1 .. counts[b]``).
        faces: ``{b: (N, 2) pairs}`` of local ids touching between block ``b`` and
            ``b + 1`` (:func:`face_pairs`).

    Returns:
        ``(mapping, n)``: ``mapping[offset_b + local]`` is the final id (``mapping[0] =
        0``) where ``offset_b = sum(counts[:b])``; final ids ``1 .. n`` are numbered by
        the smallest global id of each merged set (scan order of the first voxel).
    """
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    total = int(offsets[-1])
    glob = [p + np.array([offsets[b], offsets[b + 1]]) for b, p in faces.items() if p.size]
    pairs = np.concatenate(glob) if glob else np.zeros((0, 2), np.int64)
    return stitch_global(total, pairs, np.arange(total + 1))


def _shift_moments(m: np.ndarray, y0: int, x0: int) -> np.ndarray:
    """:func:`mitoseg.objects.object_moments` of a box at ``(y0, x0)`` in global y, x
    (exact: every moment is a sum of integers)."""
    n, sz, sy, sx = m[:, 0], m[:, 1], m[:, 2], m[:, 3]
    out = m.copy()
    out[:, 2], out[:, 3] = sy + n * y0, sx + n * x0
    out[:, 5] = m[:, 5] + 2 * y0 * sy + n * y0 * y0
    out[:, 6] = m[:, 6] + 2 * x0 * sx + n * x0 * x0
    out[:, 7] = m[:, 7] + y0 * sz
    out[:, 8] = m[:, 8] + x0 * sz
    out[:, 9] = m[:, 9] + x0 * sy + y0 * sx + n * x0 * y0
    out[:, [11, 14]] += y0
    out[:, [12, 15]] += x0
    return out


def _relabel_task(
    spec: JobSpec, b: int, offset: int, count: int, mapping: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Final ids of block ``b`` (local ids ``1 .. count``, global ``offset + local``) into
    ``labels/instances``; returns the final ids and moments of its parts (a final object
    may have several parts in one block, merged through another block)."""
    from mitoseg.inference.objects import object_moments

    z0, z1, y0, y1, x0, x1 = spec.region(b)
    root = ngff.open_output(spec.target)
    local = np.asarray(root[ngff.LOCAL_ARRAY][z0:z1, y0:y1, x0:x1])
    lut = np.zeros(count + 1, dtype=np.uint32)
    lut[1:] = mapping[offset + 1 : offset + 1 + count]
    ngff.write_levels(root["labels/instances"], lut[local], z0, True, y0, x0)
    ids, m = object_moments(local, _volume(spec).read_region(z0, z1, y0, y1, x0, x1), z0)
    return lut[ids].astype(np.int64), _shift_moments(m, y0, x0)


def _plugin_loads(name: str, dask_worker: Any = None) -> int:
    """Times the model was loaded on this worker (run on every worker by ``client.run``)."""
    plugin = dask_worker.plugins.get(name) if dask_worker is not None else None
    return int(getattr(plugin, "loads", 0))


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


def _gather(
    client: Any, futures: list[Any], description: str, progress: bool, ordered: bool = False
) -> list[Any]:
    """Results of ``futures`` as they complete (in submission order with ``ordered``);
    a failure cancels the rest."""
    from distributed import as_completed

    from mitoseg.progress import progress_iter

    results: dict[int, Any] = {}
    position = {fut.key: i for i, fut in enumerate(futures)}
    try:
        for fut in progress_iter(as_completed(futures), len(futures), description, progress):
            results[position[fut.key]] = fut.result()
    except BaseException:
        client.cancel(futures)
        raise
    return [results[i] for i in sorted(results)] if ordered else list(results.values())


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
    for part in _gather(client, futures, "normalisation", progress):
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


#: Worker environment variables Dask's nanny sets by default that the volume path drops:
#: ``MALLOC_TRIM_THRESHOLD_`` switches off glibc's dynamic mmap threshold, so every
#: temporary over 128 KiB (a tile batch, a slice of probabilities) is mapped, faulted in
#: page by page and unmapped again: twice the page faults and 7-20 % slower prediction
#: (``benchmarks/volume.py``, ``worker_environment``). External ``dask worker`` processes
#: drop it when started with the environment in :data:`EXTERNAL_WORKER_ENV`.
DROPPED_WORKER_ENV = ("MALLOC_TRIM_THRESHOLD_",)

#: What to set for ``dask worker`` to start without :data:`DROPPED_WORKER_ENV`: Dask
#: merges configuration dicts, and a ``None`` value unsets one of the nanny's variables.
EXTERNAL_WORKER_ENV = {
    "DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON": repr(dict.fromkeys(DROPPED_WORKER_ENV))
}


def local_cluster(workers: int) -> Any:
    """The embedded ``LocalCluster``: ``workers`` processes of one thread each, no
    dashboard, started without :data:`DROPPED_WORKER_ENV` (the rest of Dask's
    ``distributed.nanny.pre-spawn-environ``, e.g. ``OMP_NUM_THREADS=1``, is kept)."""
    import dask
    from distributed import LocalCluster

    environ = dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {}
    kept = {k: v for k, v in environ.items() if k not in DROPPED_WORKER_ENV}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": kept}):
        return LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
        )


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
    (:func:`_seam_task`, :func:`kept_regions`), then each unfinished block's mask, its
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
    first = {r[0]: r for r in _gather(client, futures, "regions", progress)}
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
            _seam_task, spec, b, offsets_future, key=f"mitoseg-seam-{fingerprint}-{b}",
            pure=False,
        )
        for b in range(n_blocks)
    ]  # fmt: skip
    seams = _gather(client, seam_futures, "seams", progress, ordered=True)
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
    for b, n, fg, seconds, parts in _gather(client, futures, "blocks", progress):
        if b in first:  # this run made the block's regions too
            _, _, more, more_parts = first[b]
            seconds += more
            parts = {k: parts[k] + more_parts[k] for k in BLOCK_PARTS}
        results.append((b, n, fg, seconds, parts))
    return results, phases


def _connect(workers: int, scheduler: str | None) -> tuple[Any, Callable[[], None]]:
    from distributed import Client

    if scheduler is not None:
        try:
            client = Client(scheduler, timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise ValueError(f"cannot reach the Dask scheduler {scheduler}: {exc}") from None
        return client, client.close
    cluster = local_cluster(workers)
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
            :func:`auto_block_z` for the plan and the volume.
        block_yx: cut each block further into YX tiles of this side (for slices too large
            for one worker): the slices' normalisation is computed first and each tile
            runs the tiles of the global grid it overlaps (:mod:`mitoseg.volume.tiles`),
            so the result equals whole-slice prediction. None: whole slices. Pyramid
            levels are limited to ``1 +`` the power of two in ``block_yx``. A plan with
            hysteresis (``seed_threshold``) keeps or drops whole regions of a slice: its
            regions are stitched across the tiles first (:func:`_hysteresis_blocks`).
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
    from mitoseg.inference.objects import combine_moments, rows_from_moments, write_object_table

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
    start = time.perf_counter()
    vol = open_volume(source, voxel_size_nm)
    vol.close()
    if block_z is None:
        block_z = auto_block_z(plan, vol.shape, block_yx)
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
        probabilities=bool(probabilities),
        block_yx=None if block_yx is None else int(block_yx),
    )
    if status is None:
        root = ngff.create_output(
            target, shape=vol.shape, dtype=vol.dtype, voxel_size_nm=spec.voxel_size_nm,
            block_z=block_z, n_blocks=spec.n_blocks, ngff=ngff_version,
            instances=spec.instance_class is not None,
            probability_channels=plan.out_channels if probabilities else 0,
            job={**job, "blocks": spec.n_blocks, "started": time.time()},
            block_yx=spec.block_yx, regions=_two_pass(spec, plan),
        )  # fmt: skip
    else:
        root = ngff.open_output(target)
    done = _read_done(root, spec.n_blocks)
    todo = [b for b in range(spec.n_blocks) if done[b, 0] == 0]
    close: Callable[[], None] = lambda: None  # noqa: E731
    if client is None:
        client, close = _connect(workers, scheduler)
    try:
        plugin = PredictorPlugin(_model_payload(model), plan_json, plan.calibration_images())
        client.register_plugin(plugin, name=spec.plugin)
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
            results, phases = _gather(client, futures, "blocks", progress), {}
        phases["predict"] = time.perf_counter() - phase
        regions_skipped = int(phases.pop("regions_skipped", 0))
        block_seconds = [r[3] for r in results]
        block_parts = {k: round(sum(r[4][k] for r in results), 3) for k in BLOCK_PARTS}
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
            offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            [offsets_future] = client.scatter([offsets], broadcast=True)
            face_futures = [
                client.submit(
                    _face_task, spec, b, offsets_future,
                    key=f"mitoseg-face-{fingerprint}-{b}", pure=False,
                )
                for b in range(spec.n_blocks)
            ]  # fmt: skip
            phase = time.perf_counter()
            faces = _gather(client, face_futures, "stitching", progress, ordered=True)
            total = int(offsets[-1])
            firsts = np.zeros(total + 1, dtype=np.int64)
            for b, (_, first) in enumerate(faces):
                firsts[offsets[b] + 1 : offsets[b] + 1 + first.size] = first
            pairs = np.concatenate([p for p, _ in faces])
            mapping, n_objects = stitch_global(total, pairs, firsts)
            phases["stitch"] = time.perf_counter() - phase
            phase = time.perf_counter()
            [mapping_future] = client.scatter([mapping], broadcast=True)
            relabel = [
                client.submit(
                    _relabel_task, spec, b, int(offsets[b]), int(counts[b]), mapping_future,
                    key=f"mitoseg-relabel-{fingerprint}-{b}", pure=False,
                )
                for b in range(spec.n_blocks)
            ]  # fmt: skip
            ids, moments = combine_moments(_gather(client, relabel, "instances", progress))
            # slices spanned: an object is 3D-connected, so its slices are its z extent
            moments[:, 17] = moments[:, 13] - moments[:, 10]
            rows = rows_from_moments(ids, moments, spec.voxel_size_nm, vol.shape[0] == 1)
            buf = io.StringIO()
            with tempfile.TemporaryDirectory() as tmp:
                local_csv = write_object_table(Path(tmp) / "objects.csv", rows)
                buf.write(local_csv.read_text())
            table = ngff.write_text(target, "objects.csv", buf.getvalue())
            phases["relabel"] = time.perf_counter() - phase
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
    for name in (ngff.LOCAL_ARRAY, ngff.REGIONS_ARRAY, ngff.REGIONS_DONE_ARRAY):
        if name in root:
            del root[name]
    return {
        "shape": list(vol.shape),
        "blocks": spec.n_blocks,
        "block_z": spec.block_z,
        "skipped": spec.n_blocks - len(todo),
        "regions_skipped": regions_skipped,
        "objects": n_objects,
        "foreground": fg,
        "voxel_size_nm": list(spec.voxel_size_nm) if spec.voxel_size_nm else None,
        "seconds": round(time.perf_counter() - start, 3),
        "target": target,
        "objects_csv": table,
        "model_loads": {str(k): int(v) for k, v in loads.items()},
        "block_voxels": int(np.prod(spec.block_shape)),
        "block_seconds": _stats(block_seconds),
        "block_parts_seconds": block_parts,
        "phase_seconds": {k: round(v, 3) for k, v in phases.items()},
    }


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
