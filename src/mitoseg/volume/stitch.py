"""What crosses block faces in a volume job: hysteresis regions within a slice (YX
blocks) and instance labels in 3D, merged with a graph's connected components (scipy).

* Hysteresis on YX blocks (pass 2 of :func:`mitoseg.volume.job._hysteresis_blocks`):
  :func:`seam_task` finds the 2D regions touching across a block's upper y and x faces
  in each slice, :func:`kept_regions` keeps every merged region with a seed.
* Instances (phases 2 and 3 of :mod:`mitoseg.volume.job`): :func:`face_task` finds the
  labels touching across a block's upper z, y and x faces (26-connected) and their first
  voxels, :func:`stitch_global` numbers the merged objects in scan order, and
  :func:`relabel_task` writes a block's final ids and returns its objects' moments;
  :func:`stitch_instances` runs both phases on the cluster and writes ``objects.csv``.
"""

from __future__ import annotations

import io
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from mitoseg.volume import ngff
from mitoseg.volume.cluster import gather
from mitoseg.volume.spec import JobSpec
from mitoseg.volume.worker import worker_volume

__all__ = [
    "face_task",
    "kept_regions",
    "plane_pairs",
    "relabel_task",
    "seam_task",
    "stitch_global",
    "stitch_instances",
]


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


def seam_task(spec: JobSpec, b: int, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def plane_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
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


def face_task(spec: JobSpec, b: int, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
        pairs.append(plane_pairs(np.squeeze(a, axis), np.squeeze(other, axis)))
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
        :func:`mitoseg.inference.objects.instance_labels` of the whole mask.
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


def _shift_moments(m: np.ndarray, y0: int, x0: int) -> np.ndarray:
    """:func:`mitoseg.inference.objects.object_moments` of a box at ``(y0, x0)`` in global y, x
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


def relabel_task(
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
    ids, m = object_moments(local, worker_volume(spec).read_region(z0, z1, y0, y1, x0, x1), z0)
    return lut[ids].astype(np.int64), _shift_moments(m, y0, x0)


def stitch_instances(
    client: Any,
    spec: JobSpec,
    done: np.ndarray,
    fingerprint: str,
    progress: bool,
    phases: dict[str, float],
) -> tuple[int, str]:
    """Phases 2 and 3: stitch the blocks' instance labels (:func:`face_task`,
    :func:`stitch_global`), write the final ids (:func:`relabel_task`) and
    ``objects.csv``; adds ``stitch`` and ``relabel`` to ``phases``.

    Returns:
        The object count and the table's location.
    """
    from mitoseg.inference.objects import combine_moments, rows_from_moments, write_object_table

    counts = (done[:, 0] - 1).tolist()
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    [offsets_future] = client.scatter([offsets], broadcast=True)
    face_futures = [
        client.submit(
            face_task, spec, b, offsets_future,
            key=f"mitoseg-face-{fingerprint}-{b}", pure=False,
        )
        for b in range(spec.n_blocks)
    ]  # fmt: skip
    phase = time.perf_counter()
    faces = gather(client, face_futures, "stitching", progress, ordered=True)
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
            relabel_task, spec, b, int(offsets[b]), int(counts[b]), mapping_future,
            key=f"mitoseg-relabel-{fingerprint}-{b}", pure=False,
        )
        for b in range(spec.n_blocks)
    ]  # fmt: skip
    ids, moments = combine_moments(gather(client, relabel, "instances", progress))
    # slices spanned: an object is 3D-connected, so its slices are its z extent
    moments[:, 17] = moments[:, 13] - moments[:, 10]
    rows = rows_from_moments(ids, moments, spec.voxel_size_nm, spec.shape[0] == 1)
    buf = io.StringIO()
    with tempfile.TemporaryDirectory() as tmp:
        local_csv = write_object_table(Path(tmp) / "objects.csv", rows)
        buf.write(local_csv.read_text())
    table = ngff.write_text(spec.target, "objects.csv", buf.getvalue())
    phases["relabel"] = time.perf_counter() - phase
    return n_objects, table
