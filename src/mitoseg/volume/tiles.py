"""YX tiles of slices: predict a block smaller than a slice exactly as whole-slice predict.

Two things make a slice the natural unit of :func:`mitoseg.inference.predict.predict_slice`:
the per-slice normalisation (percentiles of the *whole* slice) and the tile grid of
:func:`mitoseg.inference.predict.predict_tiled` (laid out over the whole padded slice, tiles
blended with a window). A block that covers only ``y0 .. y1, x0 .. x1`` of its slices
reproduces both:

* :func:`slice_normalization`: the slice's percentiles, computed first, without the
  whole slice in memory for 8- and 16-bit volumes (a histogram over row bands gives the
  exact order statistics; numpy's linear interpolation between them is replicated
  operation by operation, so the values equal ``np.percentile``'s bit for bit). Float
  and 32-bit volumes read the slice once for it (:func:`mitoseg.inference.normalize.robust_range`).
* :func:`predict_region`: the tiles of the **global** grid that overlap the region,
  each cut from the reflect-padded slice by index (the same padding as
  :func:`~mitoseg.inference.predict.predict_tiled`), run in the global grid's batches (a
  whole batch is run when one of its tiles is needed, so every forward pass sees the
  same batch as whole-slice predict, whatever the engine does with batch size), and
  blended into the region in the global tile order with the same window. Every pixel
  is the same sum of the same terms in the same order: the result is an identical
  array.

The cost: tiles overlapping the region's border are computed by both neighbours, plus
the rest of a batch holding a needed tile (at most ``batch_size - 1`` tiles at each end
of a run of needed tiles).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from mitoseg.inference.normalize import Normalization, dtype_range
from mitoseg.inference.plan import InferencePlan, context_window

__all__ = [
    "percentiles_from_counts",
    "predict_region",
    "slice_normalization",
]

#: Voxels per row band read for a slice's histogram.
BAND_VOXELS = 1 << 24

#: Reads ``(z0, z1, y0, y1, x0, x1)`` -> ``(z1 - z0, y1 - y0, x1 - x0)`` raw voxels.
ReadRegion = Callable[[int, int, int, int, int, int], np.ndarray]


def percentiles_from_counts(
    counts: np.ndarray, offset: int, percentiles: Sequence[float]
) -> tuple[float, ...]:
    """``np.percentile(values.astype(float32), percentiles)`` from a value histogram.

    Args:
        counts: ``(V,)`` int64, ``counts[i]`` voxels of value ``offset + i``; sum >= 1.
        offset: the value of bin 0.
        percentiles: in ``[0, 100]``.

    Returns:
        One float per percentile, equal to numpy's (``method="linear"``) bit for bit.
    """
    n = int(counts.sum())
    cum = np.cumsum(counts)
    q = np.true_divide(np.asarray(percentiles, dtype=np.float64), 100)
    virtual = (n - 1) * q
    previous = np.floor(virtual)
    following = previous + 1
    above = virtual >= n - 1
    previous[above] = n - 1  # numpy: index -1, the largest value
    following[above] = n - 1
    below = virtual < 0
    previous[below] = 0
    following[below] = 0
    gamma = np.asarray(virtual - np.where(above, -1.0, previous), dtype=virtual.dtype)
    gamma[below] = virtual[below]  # virtual - 0
    order = np.searchsorted(cum, np.stack([previous, following]).astype(np.int64), side="right")
    a = (order[0] + offset).astype(np.float32)
    b = (order[1] + offset).astype(np.float32)
    diff = np.subtract(b, a)
    out = np.asanyarray(np.add(a, diff * gamma))
    np.subtract(
        b, diff * (1 - gamma), out=out, where=gamma >= 0.5, casting="unsafe", dtype=out.dtype.type
    )
    return tuple(float(v) for v in out)


def slice_normalization(
    read: ReadRegion,
    z: int,
    shape: tuple[int, int],
    dtype: np.dtype,
    norm: Normalization,
    band_voxels: int = BAND_VOXELS,
) -> tuple[float, float] | None:
    """``(lo, hi)`` of slice ``z`` as
    :func:`mitoseg.inference.normalize.normalize_for_plan` computes them, or None for a
    blank slice.

    Args:
        read: region reader of the volume (:data:`ReadRegion`).
        z: the slice.
        shape: ``(Y, X)`` of a slice.
        dtype: voxel dtype.
        norm: the plan's normalisation.
        band_voxels: voxels per row band read (8/16-bit volumes).

    Raises:
        ValueError: non-finite voxels (float volumes).
    """
    from mitoseg.inference.normalize import robust_range

    h, w = shape
    dtype = np.dtype(dtype)
    pcts = (norm.low_pct, norm.high_pct)
    if dtype.kind in "ui" and dtype.itemsize <= 2:
        info = np.iinfo(dtype)
        bins = int(info.max) - int(info.min) + 1
        counts = np.zeros(bins, dtype=np.int64)
        rows = max(1, band_voxels // w)
        for y in range(0, h, rows):
            band = read(z, z + 1, y, min(h, y + rows), 0, w)
            counts += np.bincount(band.ravel().astype(np.int64) - int(info.min), minlength=bins)
        lo, hi = percentiles_from_counts(counts, int(info.min), pcts)
    else:
        _, lo, hi = robust_range(read(z, z + 1, 0, h, 0, w)[0], *pcts)
    if hi - lo <= norm.blank_range * dtype_range(dtype):
        return None
    return lo, hi


def _axis(length: int, plan: InferencePlan) -> tuple[int, int, list[int], np.ndarray]:
    """Tile side, padding before, tile starts (padded axis) and the image index of every
    padded position (the reflect / edge padding of ``predict_tiled``)."""
    from mitoseg.inference.predict import tile_layout

    side, before, after, starts = tile_layout(
        length, plan.tile_size, plan.halo, plan.divisor, plan.border
    )
    mode = "reflect" if length >= 2 else "edge"
    return side, before, starts, np.pad(np.arange(length), (before, after), mode=mode)


def predict_region(
    read: ReadRegion,
    predict_batch: Callable[[np.ndarray], np.ndarray],
    plan: InferencePlan,
    shape: tuple[int, int],
    zs: tuple[int, int],
    region: tuple[int, int, int, int],
    ranges: Sequence[tuple[float, float] | None],
    predict: tuple[int, int] | None = None,
) -> np.ndarray:
    """Per-slice probabilities of a region, identical to whole-slice prediction.

    The slices ``zs = (r0, r1)`` are a stack as :func:`mitoseg.inference.
    iter_stack_probabilities` sees it (a 2.5D plan takes its context from them,
    clamped at their ends); z-averaging is left to the caller.

    Args:
        read: region reader of the volume (:data:`ReadRegion`).
        predict_batch: the plan's engine.
        plan: the inference plan.
        shape: ``(Y, X)`` of a whole slice.
        zs: ``(r0, r1)`` slices of the stack.
        region: ``(y0, y1, x0, x1)``, the part of each slice to return.
        ranges: ``r1 - r0`` results of :func:`slice_normalization` (None: blank).
        predict: ``(i0, i1)``, the stack's slices (``r0 + i0 .. r0 + i1 - 1``) to
            predict; the others are context alone, left as blank slices are (None: all).

    Returns:
        ``(r1 - r0, y1 - y0, x1 - x0, C)`` float32 probabilities (before z-averaging).
    """
    from mitoseg.inference.normalize import scale_unit
    from mitoseg.inference.predict import predict_batch_tta, window_2d

    r0, r1 = zs
    y0, y1, x0, x1 = region
    depth, k, c_out = r1 - r0, plan.z_context, plan.out_channels
    if len(ranges) != depth:
        raise ValueError(f"predict_region: {len(ranges)} slice ranges for {depth} slices")
    i0, i1 = (0, depth) if predict is None else predict
    if not 0 <= i0 < i1 <= depth:
        raise ValueError(f"predict_region: predict={predict} outside the {depth} slices")
    th, top, ys, iy = _axis(shape[0], plan)
    tw, left, xs, ix = _axis(shape[1], plan)
    py0, py1, px0, px1 = y0 + top, y1 + top, x0 + left, x1 + left
    starts = [(y, x) for y in ys for x in xs]
    single = len(starts) == 1
    out = np.zeros((depth, y1 - y0, x1 - x0, c_out), dtype=np.float32)
    if c_out > 1:
        out[..., 0] = 1.0  # blank slices: background everywhere
    acc = np.zeros_like(out) if not single else None
    norm = np.zeros((y1 - y0, x1 - x0), dtype=np.float32)
    weights = window_2d(th, width=tw)
    live = [i for i in range(i0, i1) if ranges[i] is not None]

    def overlaps(y: int, x: int) -> bool:
        return y < py1 and y + th > py0 and x < px1 and x + tw > px0

    for b0 in range(0, len(starts), plan.batch_size):
        chunk = starts[b0 : b0 + plan.batch_size]
        if not any(overlaps(y, x) for y, x in chunk):
            continue
        windows = []
        for y, x in chunk:  # (depth, th, tw) normalised tiles; None for blank slices
            rows, cols = iy[y : y + th], ix[x : x + tw]
            raw = read(r0, r1, int(rows.min()), int(rows.max()) + 1, int(cols.min()),
                       int(cols.max()) + 1)  # fmt: skip
            raw = raw[:, rows - rows.min()][:, :, cols - cols.min()].astype(np.float32)
            windows.append(
                [None if r is None else scale_unit(raw[i], r[0], r[1]) for i, r in
                 enumerate(ranges)]
            )  # fmt: skip
        for i in live:
            idx = context_window(i, depth, k) if k else [i]
            tiles = []
            for win in windows:
                zeros = np.zeros((th, tw), dtype=np.float32)
                tiles.append(np.stack([zeros if win[j] is None else win[j] for j in idx], -1))
            batch = np.stack(tiles)
            pred = predict_batch_tta(predict_batch, batch, plan.tta)
            if single:
                out[i] = pred[0, py0:py1, px0:px1]
                continue
            assert acc is not None
            for (y, x), p in zip(chunk, pred, strict=True):
                if overlaps(y, x):
                    a, c = _overlap(y, th, py0, py1), _overlap(x, tw, px0, px1)
                    acc[i, a[0] : a[1], c[0] : c[1]] += (p * weights[..., None])[
                        a[2] : a[3], c[2] : c[3]
                    ]
        if not single:
            for y, x in chunk:
                if overlaps(y, x):
                    a, c = _overlap(y, th, py0, py1), _overlap(x, tw, px0, px1)
                    norm[a[0] : a[1], c[0] : c[1]] += weights[a[2] : a[3], c[2] : c[3]]
    if not single and live:
        assert acc is not None
        out[live] = acc[live] / norm[..., None]
    return out


def _overlap(start: int, side: int, lo: int, hi: int) -> tuple[int, int, int, int]:
    """Where a tile ``start .. start + side`` meets ``lo .. hi``: ``(region from, region
    to, tile from, tile to)``."""
    a, b = max(start, lo), min(start + side, hi)
    return a - lo, b - lo, a - start, b - start
