"""One label per mitochondrion: instance labels, per-object measurements, instance metrics.

Pure numpy/scipy (no tensorflow), used by ``mitoseg predict --instances``, the volume
path (:mod:`mitoseg.volume`) and the evaluate stage.

* :func:`instance_labels`: 3D connected components of a ``(Z, H, W)`` mask (a 2D
  ``(H, W)`` mask is one slice), ``uint32`` ids ``1 .. n`` numbered in scan order, with
  objects below ``min_size`` voxels dropped. Connectivity is ``1`` (faces, 6-neighbours in
  3D), ``2`` (faces and edges, 18) or ``3`` (all 26 neighbours, the default); within one
  slice, connectivity ``3`` and ``2`` are the 8-connectivity of
  :func:`mitoseg.metrics.label_objects`.
* :func:`measure_objects` / :func:`write_object_table`: one row per object
  (:data:`OBJECT_COLUMNS`): voxels, physical volume (nm^3, for stacks) or area (nm^2, for
  one slice) when the voxel size is known, centroid and bounding box (voxel indexes
  ``z, y, x``; bbox ends exclusive), slices spanned, mean intensity and elongation (square
  root of the largest over the smallest non-zero eigenvalue of the covariance of the
  object's voxel coordinates, scaled by the voxel size when known; 1 for a sphere, 1.0 for
  a single voxel).
* :func:`instance_scores`: MitoEM-style object matching of two label volumes at IoU 0.5
  and 0.75: precision, recall, F1 and AP (``TP / (TP + FP + FN)`` at that IoU, the
  matching-based "AP" of the MitoEM challenge and of ``stardist.matching`` / cellpose's
  ``average_precision``; ``0 / 0`` is 1.0). Matching is one-to-one and greedy by IoU
  (:func:`mitoseg.metrics.match_objects`).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mitoseg.checks import check_array, check_stack
from mitoseg.io import atomic_path
from mitoseg.metrics import match_objects, safe_ratio

__all__ = [
    "INSTANCE_IOUS",
    "MOMENT_COLUMNS",
    "OBJECT_COLUMNS",
    "combine_moments",
    "first_voxels",
    "instance_labels",
    "instance_scores",
    "measure_objects",
    "object_moments",
    "relabel_sequential",
    "rows_from_moments",
    "write_object_table",
]

#: IoU thresholds of the instance metrics (``AP-50``, ``AP-75``).
INSTANCE_IOUS: tuple[float, ...] = (0.5, 0.75)

#: Columns of the per-object table, in order.
OBJECT_COLUMNS: tuple[str, ...] = (
    "id",
    "voxels",
    "volume_nm3",
    "area_nm2",
    "centroid_z",
    "centroid_y",
    "centroid_x",
    "bbox_z0",
    "bbox_y0",
    "bbox_x0",
    "bbox_z1",
    "bbox_y1",
    "bbox_x1",
    "slices",
    "mean_intensity",
    "elongation",
)


def _check_voxel_size(voxel_size: Sequence[float] | None) -> tuple[float, float, float] | None:
    if voxel_size is None:
        return None
    vs = tuple(float(v) for v in voxel_size)
    if len(vs) != 3 or not all(np.isfinite(v) and v > 0 for v in vs):
        raise ValueError(
            f"voxel_size must be 3 positive numbers (z, y, x) in nm, got {list(voxel_size)}"
        )
    return vs  # type: ignore[return-value]


def relabel_sequential(labels: np.ndarray, min_size: int = 0) -> tuple[np.ndarray, int]:
    """Renumber the non-zero labels of an array ``1 .. n`` in order of first appearance
    (C order), dropping labels with fewer than ``min_size`` voxels.

    Args:
        labels: integer label array of any shape (0 = background).
        min_size: labels with fewer voxels become 0.

    Returns:
        ``(labels uint32 same shape, n)``.

    Raises:
        ValueError: non-integer labels or ``min_size < 0``.
    """
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"relabel_sequential: expected integer labels, got {labels.dtype}")
    if min_size < 0:
        raise ValueError(f"relabel_sequential: min_size must be >= 0, got {min_size}")
    flat = labels.ravel()
    values, first, inverse, counts = np.unique(
        flat, return_index=True, return_inverse=True, return_counts=True
    )
    keep = (values != 0) & (counts >= min_size)
    order = np.argsort(first[keep], kind="stable")
    new_ids = np.zeros(values.size, dtype=np.uint32)
    kept_idx = np.flatnonzero(keep)[order]
    new_ids[kept_idx] = np.arange(1, kept_idx.size + 1, dtype=np.uint32)
    return new_ids[inverse].reshape(labels.shape), int(kept_idx.size)


def instance_labels(
    mask: np.ndarray, min_size: int = 0, connectivity: int = 3
) -> tuple[np.ndarray, int]:
    """Instance labels (3D connected components) of the foreground of a mask.

    Args:
        mask: ``(Z, H, W)`` or ``(H, W)`` class indexes or booleans; foreground is
            ``mask != 0``.
        min_size: objects with fewer voxels are dropped (become 0).
        connectivity: ``1`` (6-), ``2`` (18-) or ``3`` (26-neighbourhood in 3D).

    Returns:
        ``(labels, n)``: uint32 labels of the mask's shape, ids ``1 .. n`` in scan order.

    Raises:
        ValueError: wrong rank, ``min_size < 0`` or ``connectivity`` not 1, 2 or 3.
    """
    from scipy import ndimage

    arr = check_array(mask, "instance_labels", ndim=(2, 3))
    if min_size < 0:
        raise ValueError(f"instance_labels: min_size must be >= 0, got {min_size}")
    if connectivity not in (1, 2, 3):
        raise ValueError(f"instance_labels: connectivity must be 1, 2 or 3, got {connectivity}")
    structure = ndimage.generate_binary_structure(arr.ndim, min(connectivity, arr.ndim))
    labels, n = ndimage.label(arr != 0, structure=structure, output=np.uint32)
    if n and min_size > 0:
        return relabel_sequential(labels, min_size)
    return labels.astype(np.uint32, copy=False), int(n)


#: Columns of :func:`object_moments` (per object): voxel count, coordinate sums, sums of
#: coordinate products, bbox, intensity sum and the number of slices holding it.
MOMENT_COLUMNS: tuple[str, ...] = (
    "n", "sz", "sy", "sx", "szz", "syy", "sxx", "szy", "szx", "syx",
    "z0", "y0", "x0", "z1", "y1", "x1", "isum", "slices",
)  # fmt: skip


def object_moments(
    labels: np.ndarray, image: np.ndarray | None = None, z_offset: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Additive per-object moments of a label block.

    Combined over blocks by :func:`combine_moments` and turned into table rows by
    :func:`rows_from_moments`, so a table measured block by block equals the one of the
    whole volume.

    Args:
        labels: ``(Z, H, W)`` non-negative integer labels.
        image: raw intensities of the same shape, or None (intensity sums 0).
        z_offset: global index of the block's first slice.

    Returns:
        ``(ids (N,) int64, moments (N, len(MOMENT_COLUMNS)) float64)``; bbox columns are
        inclusive ``z0 y0 x0`` and exclusive ``z1 y1 x1`` (global voxel indexes).
    """
    z, y, x = np.nonzero(labels)
    if z.size == 0:
        return np.zeros(0, np.int64), np.zeros((0, len(MOMENT_COLUMNS)))
    ids_all = labels[z, y, x].astype(np.int64)
    ids, inv = _dense_ids(ids_all)
    m = np.zeros((ids.size, len(MOMENT_COLUMNS)), dtype=np.float64)
    zf = z.astype(np.float64) + z_offset
    yf, xf = y.astype(np.float64), x.astype(np.float64)
    cols = (np.ones_like(zf), zf, yf, xf, zf * zf, yf * yf, xf * xf, zf * yf, zf * xf, yf * xf)
    for j, v in enumerate(cols):
        m[:, j] = np.bincount(inv, weights=v, minlength=ids.size)
    for j, v in enumerate((zf, yf, xf)):
        lo = np.full(ids.size, np.inf)
        hi = np.full(ids.size, -np.inf)
        np.minimum.at(lo, inv, v)
        np.maximum.at(hi, inv, v)
        m[:, 10 + j], m[:, 13 + j] = lo, hi + 1
    if image is not None:
        m[:, 16] = np.bincount(inv, weights=image[z, y, x].astype(np.float64), minlength=ids.size)
    depth = labels.shape[0] + 1
    keys = inv.astype(np.int64) * depth + z
    if ids.size * depth <= _DENSE_LIMIT:  # (object, slice) pairs as a table: no sort
        held = np.bincount(keys, minlength=ids.size * depth) > 0
        m[:, 17] = held.reshape(ids.size, depth).sum(axis=1)
    else:
        m[:, 17] = np.bincount(np.unique(keys) // depth, minlength=ids.size)
    return ids, m


#: Largest id (or object x slice table) counted densely with ``np.bincount`` instead of
#: sorted with ``np.unique``: linear time, at most this many counters.
_DENSE_LIMIT = 1 << 24


def _dense_ids(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(values, return_inverse=True)`` of non-negative int64 ids, without a
    sort when the largest id is at most :data:`_DENSE_LIMIT` (or the value count)."""
    top = int(values.max())
    if top > max(_DENSE_LIMIT, values.size):
        return np.unique(values, return_inverse=True)
    present = np.bincount(values, minlength=top + 1) > 0
    lut = np.cumsum(present) - 1
    return np.flatnonzero(present).astype(values.dtype), lut[values]


def first_voxels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each label's first voxel in scan (C) order.

    Args:
        labels: non-negative integer labels of any shape.

    Returns:
        ``(ids (N,) int64 > 0 ascending, flat (N,) int64)``: ``flat[i]`` is the flat index
        (``np.ravel_multi_index`` over ``labels.shape``) of the first voxel of ``ids[i]``;
        equal to ``np.unique(labels.ravel(), return_index=True)`` without 0. Linear time
        when the ids are numbered in scan order (:func:`instance_labels`), else a sort.
    """
    flat = np.asarray(labels).ravel()
    where = np.flatnonzero(flat)
    if where.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    values = flat[where].astype(np.int64)
    running = np.maximum.accumulate(values)
    n = int(running[-1])
    pos = np.searchsorted(running, np.arange(1, n + 1))
    if np.array_equal(values[pos], np.arange(1, n + 1)):  # 1 .. n, each first in scan order
        return np.arange(1, n + 1, dtype=np.int64), where[pos].astype(np.int64)
    ids, first = np.unique(flat, return_index=True)
    keep = ids > 0
    return ids[keep].astype(np.int64), first[keep].astype(np.int64)


def combine_moments(
    parts: Sequence[tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray]:
    """Merge :func:`object_moments` of disjoint blocks (sums add, bboxes widen)."""
    parts = [p for p in parts if p[0].size]
    if not parts:
        return np.zeros(0, np.int64), np.zeros((0, len(MOMENT_COLUMNS)))
    ids_all = np.concatenate([p[0] for p in parts])
    m_all = np.concatenate([p[1] for p in parts])
    ids, inv = np.unique(ids_all, return_inverse=True)
    out = np.zeros((ids.size, m_all.shape[1]))
    for j in range(m_all.shape[1]):
        if 10 <= j < 13:
            out[:, j] = np.inf
            np.minimum.at(out[:, j], inv, m_all[:, j])
        elif 13 <= j < 16:
            out[:, j] = -np.inf
            np.maximum.at(out[:, j], inv, m_all[:, j])
        else:
            out[:, j] = np.bincount(inv, weights=m_all[:, j], minlength=ids.size)
    return ids, out


def rows_from_moments(
    ids: np.ndarray,
    moments: np.ndarray,
    voxel_size: Sequence[float] | None = None,
    single_slice: bool = False,
    with_intensity: bool = True,
) -> list[dict[str, Any]]:
    """Table rows (:data:`OBJECT_COLUMNS`) from per-object moments, sorted by id."""
    vs = _check_voxel_size(voxel_size)
    scale = np.asarray(vs if vs is not None else (1.0, 1.0, 1.0), dtype=np.float64)
    rows: list[dict[str, Any]] = []
    for obj, m in sorted(zip(ids.tolist(), moments, strict=True), key=lambda t: t[0]):
        n = m[0]
        mean = m[1:4] / n
        second = np.array([[m[4], m[7], m[8]], [m[7], m[5], m[9]], [m[8], m[9], m[6]]])
        cov = (second - n * np.outer(mean, mean)) / (n - 1) if n > 1 else None
        rows.append(
            {
                "id": int(obj),
                "voxels": int(n),
                "volume_nm3": float(n * scale.prod()) if vs and not single_slice else None,
                "area_nm2": float(n * scale[1] * scale[2]) if vs and single_slice else None,
                "centroid_z": float(mean[0]),
                "centroid_y": float(mean[1]),
                "centroid_x": float(mean[2]),
                "bbox_z0": int(m[10]),
                "bbox_y0": int(m[11]),
                "bbox_x0": int(m[12]),
                "bbox_z1": int(m[13]),
                "bbox_y1": int(m[14]),
                "bbox_x1": int(m[15]),
                "slices": int(m[17]),
                "mean_intensity": float(m[16] / n) if with_intensity else None,
                "elongation": _elongation(cov, scale),
            }
        )
    return rows


def measure_objects(
    labels: np.ndarray,
    image: np.ndarray | None = None,
    voxel_size: Sequence[float] | None = None,
) -> list[dict[str, Any]]:
    """One measurement row per object of a label volume (see :data:`OBJECT_COLUMNS`).

    Args:
        labels: ``(Z, H, W)`` or ``(H, W)`` non-negative integer labels (0 = background).
        image: raw intensities of the same shape for ``mean_intensity``, or None.
        voxel_size: ``(z, y, x)`` nm per voxel, or None (physical columns empty).

    Returns:
        Rows sorted by id. ``volume_nm3`` is set for stacks (``Z > 1``), ``area_nm2`` for a
        single slice, both None without a voxel size; ``mean_intensity`` is None without
        an image.

    Raises:
        ValueError: wrong rank, non-integer or negative labels, image shape mismatch or a
            bad voxel size.
    """
    lab = check_stack(labels, "measure_objects")
    if not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"measure_objects: labels must be integers, got {lab.dtype}")
    if lab.size and int(lab.min()) < 0:
        raise ValueError("measure_objects: labels must be >= 0")
    _check_voxel_size(voxel_size)
    img = None
    if image is not None:
        img = check_stack(image, "measure_objects")
        if img.shape != lab.shape:
            raise ValueError(
                f"measure_objects: image shape {img.shape} != labels shape {lab.shape}"
            )
    ids, moments = object_moments(lab, img)
    return rows_from_moments(ids, moments, voxel_size, lab.shape[0] == 1, img is not None)


def _elongation(cov: np.ndarray | None, scale: np.ndarray) -> float:
    """sqrt(largest / smallest non-zero eigenvalue of the scaled covariance); 1.0 for a
    single voxel or a degenerate object."""
    if cov is None:
        return 1.0
    eig = np.linalg.eigvalsh(cov * np.outer(scale, scale))
    top = float(eig.max())
    eig = eig[eig > 1e-9 * max(top, 1e-300)]
    if eig.size == 0:
        return 1.0
    return float(np.sqrt(eig.max() / eig.min()))


def write_object_table(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write measurement rows as CSV (:data:`OBJECT_COLUMNS`), atomically.

    Floats are rounded to 6 significant decimals; None is written as an empty cell.

    Returns:
        The CSV path.
    """
    path = Path(path)
    with atomic_path(path, suffix=".csv.tmp") as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(OBJECT_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {
                    k: ("" if v is None else round(v, 6) if isinstance(v, float) else v)
                    for k, v in row.items()
                }
            )
    return path


def instance_scores(
    truth_labels: np.ndarray,
    pred_labels: np.ndarray,
    ious: Sequence[float] = INSTANCE_IOUS,
) -> dict[str, Any]:
    """Object-level precision, recall, F1 and AP of predicted instances against the truth.

    Args:
        truth_labels: ``(Z, H, W)`` or ``(H, W)`` non-negative integer instance labels.
        pred_labels: same shape.
        ious: IoU thresholds in ``(0, 1]``.

    Returns:
        ``{"n_true", "n_pred", "mean_matched_iou", "iou_50": {...}, "iou_75": {...}}``,
        one entry per threshold (key ``iou_<100 * t>``) with ``tp, fp, fn, precision,
        recall, f1, ap``; ``mean_matched_iou`` is the mean IoU of the matches at the
        lowest threshold (1.0 when nothing is matched and nothing was to match).

    Raises:
        ValueError: shape mismatch, non-integer or negative labels, or a threshold
            outside ``(0, 1]``.
    """
    t = check_stack(truth_labels, "instance_scores")
    p = check_stack(pred_labels, "instance_scores")
    if t.shape != p.shape:
        raise ValueError(f"instance_scores: truth shape {t.shape} != prediction shape {p.shape}")
    for name, arr in (("truth", t), ("prediction", p)):
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"instance_scores: {name} labels must be integers, got {arr.dtype}")
        if arr.size and int(arr.min()) < 0:
            raise ValueError(f"instance_scores: {name} labels must be >= 0")
    bad = [v for v in ious if not 0 < float(v) <= 1]
    if bad:
        raise ValueError(f"instance_scores: IoU thresholds must be in (0, 1], got {bad}")
    t, n_true = relabel_sequential(t)
    p, n_pred = relabel_sequential(p)
    thresholds = sorted(float(v) for v in ious)
    out: dict[str, Any] = {"n_true": n_true, "n_pred": n_pred}
    lowest: list[tuple[int, int, float]] = []
    for i, thr in enumerate(thresholds):
        matches = match_objects(t, n_true, p, n_pred, thr)
        if i == 0:
            lowest = matches
        tp = len(matches)
        fp, fn = n_pred - tp, n_true - tp
        out[f"iou_{round(thr * 100)}"] = {
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "precision": safe_ratio(tp, tp + fp),
            "recall": safe_ratio(tp, tp + fn),
            "f1": safe_ratio(2 * tp, 2 * tp + fp + fn),
            "ap": safe_ratio(tp, tp + fp + fn),
        }
    out["mean_matched_iou"] = (
        float(np.mean([m[2] for m in lowest])) if lowest else safe_ratio(0, n_true + n_pred)
    )
    return out
