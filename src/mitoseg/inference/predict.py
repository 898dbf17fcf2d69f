"""Tiled whole-image inference: one implementation for evaluate, ``mitoseg predict``, the
BentoML service and the volume path.

Why one module of about 670 lines: it is the one inference implementation (tiling,
blending, 2.5D context, z-averaging, decision) that every consumer calls; together it
stays one pure function family over arrays.

:func:`predict_tiled` is a *pure* function of an image array and a batch-predict callable:
no model object, file or global state is touched, so it can be mapped over chunks with
Dask. The image is reflect-padded by a halo; an image whose padded size fits one tile runs
as a single (possibly rectangular) forward pass, a larger one is cut into overlapping
tiles whose outputs are blended with a separable squared-sine window (floored at
:data:`WINDOW_FLOOR` so that every pixel has a positive weight), normalised by the sum of
weights. Optional test-time augmentation (TTA) averages the 8 dihedral transforms
(4 rotations x optional horizontal flip), each inverse-transformed back.

How a given model is run (tile size, halo, normalisation, threshold, engine) is not
decided here: :func:`segment_stack`, :func:`iter_stack_probabilities` and
:func:`predict_slice` take the model's :class:`~mitoseg.inference.plan.InferencePlan`.

Tile size constraint: the UNet halves H and W ``depth`` times, so a tile side must be a
multiple of ``2**depth`` (``divisor``, recorded in the plan).

This module imports no tensorflow: a Keras model is run through
:func:`mitoseg.inference.runtime.predictor_for_plan`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from mitoseg.checks import check_array, check_stack
from mitoseg.inference.normalize import normalize_for_plan
from mitoseg.inference.plan import InferencePlan, context_window

__all__ = [
    "WINDOW_FLOOR",
    "PredictBatch",
    "as_predict_batch",
    "check_tiling",
    "context_window",
    "decide_mask",
    "iter_stack_probabilities",
    "keep_seeded_regions",
    "mask_to_image",
    "predict_batch_tta",
    "predict_slice",
    "predict_tiled",
    "probabilities_to_mask",
    "segment_stack",
    "tile_layout",
    "tile_positions",
    "window_2d",
    "z_mean",
]

#: ``(B, T, T, C_in) float32 -> (B, T, T, C) float32`` probabilities.
PredictBatch = Callable[[np.ndarray], np.ndarray]

#: Minimum blending weight: tile borders still count a little, so the image border (which
#: only tile borders may cover) always has a defined, positive weight.
WINDOW_FLOOR = 1e-3


def window_2d(tile_size: int, floor: float = WINDOW_FLOOR, width: int | None = None) -> np.ndarray:
    """Separable squared-sine blending window.

    Args:
        tile_size: tile height ``T`` (and width, unless ``width`` is given).
        floor: minimum weight (``> 0``).
        width: tile width for rectangular tiles.

    Returns:
        ``(T, W)`` float32 weights in ``[floor, 1]``, symmetric, peaking at the centre.
    """

    def sine(n: int) -> np.ndarray:
        i = np.arange(n, dtype=np.float64)
        return np.sin(np.pi * (i + 0.5) / n) ** 2

    w = tile_size if width is None else width
    return np.maximum(np.outer(sine(tile_size), sine(w)), floor).astype(np.float32)


def tile_positions(length: int, tile_size: int, step: int) -> list[int]:
    """Start offsets of tiles covering ``[0, length)`` (``length >= tile_size``).

    Tiles start every ``step`` pixels; the last one is snapped to ``length - tile_size``.

    Returns:
        Sorted distinct start offsets; the first is 0 and the last ``length - tile_size``.
    """
    if length < tile_size:
        raise ValueError(f"tile_positions: length {length} is smaller than tile_size {tile_size}")
    last = length - tile_size
    starts = list(range(0, last + 1, step))
    if starts[-1] != last:
        starts.append(last)
    return starts


def check_tiling(tile_size: int, overlap: float, batch_size: int, divisor: int = 16) -> None:
    """Validate tiling arguments (see :func:`predict_tiled`).

    Raises:
        ValueError: ``divisor`` not a positive integer, ``tile_size`` not a multiple of
            ``divisor``, ``overlap`` outside ``[0, 1)`` or ``batch_size < 1``.
    """
    if not isinstance(divisor, (int, np.integer)) or divisor < 1:
        raise ValueError(f"divisor must be a positive integer, got {divisor!r}")
    if (
        not isinstance(tile_size, (int, np.integer))
        or isinstance(tile_size, bool)
        or tile_size < divisor
    ):
        raise ValueError(f"tile_size must be an integer >= {divisor}, got {tile_size!r}")
    if tile_size % divisor:
        raise ValueError(
            f"tile_size must be a multiple of {divisor} (the UNet halves H and W depth times, "
            f"so tiles need a side divisible by 2**depth), got {tile_size}"
        )
    if not 0.0 <= float(overlap) < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if (
        not isinstance(batch_size, (int, np.integer))
        or isinstance(batch_size, bool)
        or batch_size < 1
    ):
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def _pad(image: np.ndarray, before: tuple[int, int], after: tuple[int, int]) -> np.ndarray:
    # numpy's reflect mode repeats the reflection for pads longer than the axis, but needs
    # at least 2 samples along a padded axis; a 1-pixel axis is edge-padded instead.
    for axis in (0, 1):
        if before[axis] or after[axis]:
            pads = [(0, 0)] * image.ndim
            pads[axis] = (before[axis], after[axis])
            mode = "reflect" if image.shape[axis] >= 2 else "edge"
            image = np.pad(image, pads, mode=mode)
    return image


def _dihedral(x: np.ndarray, k: int) -> np.ndarray:
    """Transform ``k`` (0..7) of the dihedral group on axes (1, 2) of ``(B, T, T, C)``."""
    if k >= 4:
        x = x[:, :, ::-1]
    return np.rot90(x, k % 4, axes=(1, 2))


def _inverse_dihedral(x: np.ndarray, k: int) -> np.ndarray:
    x = np.rot90(x, -(k % 4), axes=(1, 2))
    if k >= 4:
        x = x[:, :, ::-1]
    return x


def _call(predict_batch: PredictBatch, batch: np.ndarray) -> np.ndarray:
    out = np.asarray(predict_batch(np.ascontiguousarray(batch, dtype=np.float32)))
    b, th, tw = batch.shape[:3]
    if out.ndim != 4 or out.shape[:3] != (b, th, tw):
        raise ValueError(
            f"predict_batch returned shape {tuple(out.shape)} for an input batch of shape "
            f"{tuple(batch.shape)}; expected ({b}, {th}, {tw}, C)"
        )
    return out.astype(np.float32, copy=False)


def predict_batch_tta(predict_batch: PredictBatch, batch: np.ndarray, tta: bool) -> np.ndarray:
    """One forward pass of ``batch`` ``(B, T, T, C_in)``, or with ``tta`` the mean over its
    8 flips/rotations (each mapped back), summed in a fixed order so that every caller
    (whole slices, YX blocks of :mod:`mitoseg.volume.tiles`) gets the same floats.

    Returns:
        ``(B, T, T, C)`` float32 probabilities.
    """
    pred: np.ndarray | None = None
    for k in range(8) if tta else range(1):
        out = _call(predict_batch, _dihedral(batch, k) if k else batch)
        out = _inverse_dihedral(out, k) if k else out
        pred = out.astype(np.float32) if pred is None else pred + out
    assert pred is not None
    if tta:
        pred /= 8.0
    return pred


def _round_up(value: int, divisor: int) -> int:
    return -(-value // divisor) * divisor


def tile_layout(
    length: int, tile_size: int, halo: int, divisor: int, border: int | None = None
) -> tuple[int, int, int, list[int]]:
    """Tile side, padding and tile starts along one axis (see :func:`predict_tiled`).

    Args:
        length: image length along the axis (>= 1).
        tile_size: largest tile side (a multiple of ``divisor``).
        halo: context pixels on each side of the kept part of a tile.
        divisor: tile sides are multiples of it.
        border: reflect padding at the image borders (default ``halo``).

    Returns:
        ``(side, before, after, starts)``: the tile side on this axis, the padding added
        before and after the image, and the tile start offsets in the padded axis.
    """
    pad = halo if border is None else border
    need = length + 2 * pad
    side = min(int(tile_size), _round_up(need, divisor))
    extra = max(0, side - need)
    before, after = pad + extra // 2, pad + extra - extra // 2
    starts = tile_positions(length + before + after, side, max(1, side - 2 * halo))
    return side, before, after, starts


def predict_tiled(
    image: np.ndarray,
    predict_batch: PredictBatch,
    *,
    tile_size: int = 256,
    overlap: float = 0.5,
    batch_size: int = 8,
    tta: bool = False,
    divisor: int = 16,
    halo: int | None = None,
    border: int | None = None,
) -> np.ndarray:
    """Predict class probabilities of a whole 2D image with overlapping, blended tiles.

    Each axis is reflect-padded by ``border`` pixels (default ``halo``: image borders sit
    away from tile borders; 0 leaves them at the tile border, as in training crops). Along
    an axis where the padded image fits into ``tile_size``, one tile covers it, its side
    rounded up to a multiple of ``divisor`` (so an image that fits runs as a single,
    possibly rectangular, forward pass); otherwise tiles of ``tile_size`` start every
    ``tile_size - 2 * halo`` pixels, the last one snapped to the end. Each output pixel is
    the mean of the tile predictions covering it, weighted by a separable squared-sine
    window.

    Args:
        image: ``(H, W)`` or ``(H, W, C_in)`` float32 in ``[0, 1]`` (already normalised),
            any ``H, W >= 1``; ``C_in`` channels for a 2.5D network (see
            :func:`context_window`).
        predict_batch: maps ``(B, TH, TW, C_in)`` float32 to ``(B, TH, TW, C)`` float32
            probabilities (``B <= batch_size``; ``TH, TW <= tile_size``, multiples of
            ``divisor``; all tiles of one image have the same shape).
        tile_size: largest tile side; a multiple of ``divisor``.
        overlap: when ``halo`` is None, the halo is ``(tile_size - step) // 2`` with
            ``step = max(1, round(tile_size * (1 - overlap)))``; in ``[0, 1)``.
        batch_size: tiles per ``predict_batch`` call.
        tta: average over the 8 flips/rotations of every tile (8x the compute).
        divisor: ``2**depth`` of the network; tile sides are multiples of it.
        halo: context pixels kept around each tile's centre part (``2 * halo <
            tile_size``); overrides ``overlap``.
        border: reflect padding at the image borders, pixels (default ``halo``).

    Returns:
        ``(H, W, C)`` float32 blended probabilities. Deterministic for a deterministic
        ``predict_batch``.

    Raises:
        ValueError: image not ``(H, W)``/``(H, W, C_in)``, empty or non-finite; invalid
            ``tile_size``, ``overlap``, ``halo``, ``batch_size`` or ``divisor``;
            ``predict_batch`` returned a wrong shape.
    """
    check_tiling(tile_size, overlap, batch_size, divisor)
    t = int(tile_size)
    if halo is None:
        halo = (t - max(1, round(t * (1.0 - float(overlap))))) // 2
    elif isinstance(halo, bool) or not isinstance(halo, (int, np.integer)) or halo < 0:
        raise ValueError(f"halo must be an integer >= 0, got {halo!r}")
    elif 2 * halo >= t:
        raise ValueError(f"halo must be below tile_size / 2 = {t / 2:g}, got {halo}")
    if border is not None and (
        isinstance(border, bool) or not isinstance(border, (int, np.integer)) or border < 0
    ):
        raise ValueError(f"border must be an integer >= 0, got {border!r}")
    image = check_array(image, "predict_tiled", ndim=(2, 3), axes={3: "(H, W, C)"}, nonempty=True)
    image = image.astype(np.float32, copy=False)
    if not np.isfinite(image).all():
        raise ValueError("predict_tiled: image contains NaN or infinite values")
    h, w = image.shape[:2]
    th, top, bottom, ys = tile_layout(h, t, int(halo), divisor, border)
    tw, left, right, xs = tile_layout(w, t, int(halo), divisor, border)
    padded = _pad(image, (top, left), (bottom, right))
    ph, pw = padded.shape[:2]
    if padded.ndim == 2:
        padded = padded[..., None]
    starts = [(y, x) for y in ys for x in xs]
    weights = window_2d(th, width=tw)
    acc: np.ndarray | None = None
    norm = np.zeros((ph, pw), dtype=np.float32)
    single = len(starts) == 1
    for b0 in range(0, len(starts), batch_size):
        chunk = starts[b0 : b0 + batch_size]
        batch = np.stack([padded[y : y + th, x : x + tw] for y, x in chunk])
        pred = predict_batch_tta(predict_batch, batch, tta)
        if single:  # one tile: no blending needed, the window cancels exactly
            return np.ascontiguousarray(pred[0, top : top + h, left : left + w])
        if acc is None:
            acc = np.zeros((ph, pw, pred.shape[-1]), dtype=np.float32)
        elif pred.shape[-1] != acc.shape[-1]:
            raise ValueError(
                f"predict_batch returned {pred.shape[-1]} channels after {acc.shape[-1]} "
                "for earlier tiles"
            )
        for (y, x), p in zip(chunk, pred, strict=True):
            acc[y : y + th, x : x + tw] += p * weights[..., None]
            norm[y : y + th, x : x + tw] += weights
    assert acc is not None
    out = acc / norm[..., None]
    return np.ascontiguousarray(out[top : top + h, left : left + w])


def probabilities_to_mask(probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Turn probabilities into a class-index mask.

    Args:
        probs: ``(..., C)`` float probabilities; ``C == 1`` is a sigmoid foreground
            probability, ``C > 1`` a softmax over classes.
        threshold: foreground threshold for ``C == 1`` (``probs >= threshold`` is class 1);
            ignored for ``C > 1`` (argmax).

    Returns:
        ``(...)`` uint8 class indexes (shape of ``probs`` without the last axis).

    Raises:
        ValueError: ``probs`` has fewer than 2 dims, more than 256 channels, or the
            threshold is outside ``[0, 1]``.
    """
    probs = np.asarray(probs)
    if probs.ndim < 2:
        raise ValueError(
            f"probabilities_to_mask: expected (..., C) probabilities, got shape {probs.shape}"
        )
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"probabilities_to_mask: threshold must be in [0, 1], got {threshold}")
    c = probs.shape[-1]
    if c == 1:
        return (probs[..., 0] >= threshold).astype(np.uint8)
    if c > 256:
        raise ValueError(f"probabilities_to_mask: {c} classes do not fit a uint8 mask")
    return np.argmax(probs, axis=-1).astype(np.uint8)


def keep_seeded_regions(mask: np.ndarray, probs: np.ndarray, seed_threshold: float) -> np.ndarray:
    """Hysteresis: keep the 8-connected regions of ``mask`` that contain a pixel whose
    probability reaches ``seed_threshold`` (as :func:`skimage.filters.apply_hysteresis_threshold`
    does, here with :func:`scipy.ndimage.label`, a core dependency).

    Args:
        mask: ``(H, W)`` bool or 0/1 foreground (``probs >= threshold``).
        probs: ``(H, W)`` float foreground probabilities.
        seed_threshold: probability a region must reach somewhere to be kept.

    Returns:
        ``(H, W)`` uint8 0/1.

    Raises:
        ValueError: not two ``(H, W)`` arrays of one shape, or ``seed_threshold`` outside
            ``[0, 1]``.
    """
    mask, probs = np.asarray(mask), np.asarray(probs)
    if mask.ndim != 2 or probs.shape != mask.shape:
        raise ValueError(
            f"keep_seeded_regions: expected (H, W) mask and probabilities of one shape, got "
            f"{mask.shape} and {probs.shape}"
        )
    if not 0.0 <= float(seed_threshold) <= 1.0:
        raise ValueError(
            f"keep_seeded_regions: seed_threshold must be in [0, 1], got {seed_threshold}"
        )
    from scipy import ndimage

    labels, n = ndimage.label(mask != 0, structure=np.ones((3, 3), bool))
    if n == 0:
        return np.zeros(mask.shape, np.uint8)
    seeded = np.zeros(n + 1, bool)
    seeded[labels[(probs >= seed_threshold) & (labels > 0)]] = True
    return seeded[labels].astype(np.uint8)


def decide_mask(probs: np.ndarray, plan: InferencePlan) -> np.ndarray:
    """One slice's class-index mask from its probabilities, as ``plan`` decides: the
    threshold (binary) or argmax (multiclass), then hysteresis when the plan has a
    ``seed_threshold``. Every consumer (evaluate, predict, the service, volumes) calls it.

    Args:
        probs: ``(H, W, C)`` float32 probabilities of one slice.
        plan: the model's inference plan.

    Returns:
        ``(H, W)`` uint8 class indexes.
    """
    mask = probabilities_to_mask(probs, plan.decision)
    if plan.seed_threshold is None or probs.shape[-1] != 1:
        return mask
    return keep_seeded_regions(mask, probs[..., 0], plan.seed_threshold)


def mask_to_image(mask: np.ndarray, n_classes: int) -> np.ndarray:
    """Class-index mask -> image to save: binary ``0/255``, multiclass class index.

    Args:
        mask: ``(...)`` integer class indexes in ``0 .. n_classes-1``.
        n_classes: classes including background (2 = binary).

    Returns:
        uint8 array of the same shape.

    Raises:
        ValueError: ``n_classes`` outside ``2 .. 256`` or mask values out of range.
    """
    mask = np.asarray(mask)
    if not 2 <= n_classes <= 256:
        raise ValueError(f"mask_to_image: n_classes must be in 2..256, got {n_classes}")
    if mask.size and (int(mask.min()) < 0 or int(mask.max()) >= n_classes):
        raise ValueError(
            f"mask_to_image: mask values [{int(mask.min())}, {int(mask.max())}] outside "
            f"0..{n_classes - 1}"
        )
    if n_classes == 2:
        return (mask != 0).astype(np.uint8) * np.uint8(255)
    return mask.astype(np.uint8)


def as_predict_batch(model_or_fn: Any) -> PredictBatch:
    """Wrap a Keras model (anything with ``predict_on_batch``) as a :data:`PredictBatch`.

    A plain callable is returned unchanged.

    Raises:
        TypeError: neither a model with ``predict_on_batch`` nor a callable.
    """
    if hasattr(model_or_fn, "predict_on_batch"):
        model = model_or_fn

        def predict_batch(batch: np.ndarray) -> np.ndarray:
            return np.asarray(model.predict_on_batch(batch), dtype=np.float32)

        return predict_batch
    if callable(model_or_fn):
        return model_or_fn
    raise TypeError(
        f"expected a Keras model or a callable batch predictor, got {type(model_or_fn).__name__}"
    )


def _as_stack(stack: np.ndarray) -> np.ndarray:
    stack = check_stack(stack, "stack", nonempty=True)
    if not (np.issubdtype(stack.dtype, np.integer) or np.issubdtype(stack.dtype, np.floating)):
        raise ValueError(f"stack: expected an integer or float image stack, got {stack.dtype}")
    return stack


def _predictor(model_or_fn: Any, plan: InferencePlan) -> PredictBatch:
    """A model goes through the plan's engine; a callable is used as it is."""
    if hasattr(model_or_fn, "predict_on_batch"):
        from mitoseg.inference.runtime import predictor_for_plan

        return predictor_for_plan(model_or_fn, plan)
    return as_predict_batch(model_or_fn)


def _blank_probabilities(shape: tuple[int, ...], plan: InferencePlan) -> np.ndarray:
    probs = np.zeros((*shape, plan.out_channels), dtype=np.float32)
    if plan.out_channels > 1:
        probs[..., 0] = 1.0
    return probs


def predict_slice(
    image: np.ndarray,
    predict_batch: PredictBatch,
    plan: InferencePlan,
    context: Sequence[np.ndarray | None] | None = None,
) -> np.ndarray:
    """Probabilities of one raw slice, run exactly as ``plan`` says.

    The slice is normalised by ``plan.normalization``; a blank slice (see
    :class:`mitoseg.inference.normalize.Normalization`) is background everywhere without a
    forward pass.

    Args:
        image: ``(H, W)`` raw intensities (uint8, uint16 or float).
        predict_batch: the plan's engine (:func:`mitoseg.inference.runtime.predictor_for_plan`).
        plan: the model's inference plan.
        context: for a 2.5D plan (``plan.z_context = k > 0``), the ``2k + 1`` normalised
            ``(H, W)`` float32 slices of :func:`context_window` (``None`` for a blank
            one, given to the network as zeros); None: the slice is its own context.

    Returns:
        ``(H, W, C)`` float32 probabilities, ``C = plan.out_channels``.

    Raises:
        ValueError: ``context`` of the wrong length or slice shape.
    """
    if context is not None and len(context) == plan.in_channels:
        x = context[plan.z_context]  # the slice itself, already normalised by the caller
    else:
        x = normalize_for_plan(image, plan.normalization)
    if x is None:
        return _blank_probabilities(np.shape(image), plan)
    if plan.z_context == 0 and context is None:
        return predict_tiled(x, predict_batch, **plan.tiling_kwargs())
    if context is None:
        context = [x] * plan.in_channels
    if len(context) != plan.in_channels:
        raise ValueError(
            f"predict_slice: the plan (z_context {plan.z_context}) needs {plan.in_channels} "
            f"context slices, got {len(context)}"
        )
    zeros = np.zeros(x.shape, dtype=np.float32)
    channels = [zeros if c is None else np.asarray(c, dtype=np.float32) for c in context]
    if any(c.shape != x.shape for c in channels):
        raise ValueError(
            f"predict_slice: context slices {[c.shape for c in channels]} differ from the "
            f"slice shape {x.shape}"
        )
    return predict_tiled(np.stack(channels, axis=-1), predict_batch, **plan.tiling_kwargs())


def iter_stack_probabilities(
    model_or_fn: Any,
    stack: np.ndarray,
    plan: InferencePlan,
    *,
    start: int = 0,
    stop: int | None = None,
    progress: bool = False,
    description: str = "predicting",
) -> Iterator[np.ndarray]:
    """Yield the ``(H, W, C)`` float32 probabilities of each slice of a stack (or of
    slices ``start .. stop - 1`` of it).

    A 2.5D plan (``plan.z_context = k > 0``) gives the network slices ``z - k .. z + k``
    of this stack as channels (:func:`context_window`), and ``plan.z_average = r`` yields
    the mean probabilities of slices ``z - r .. z + r``: a block cut from a larger volume
    must carry ``plan.z_halo = k + r`` extra slices on each side (and crop them off the
    result) to match predicting the whole volume. ``start`` and ``stop`` say which
    slices such a block wants: only ``start - r .. stop + r - 1`` are predicted, the
    others are read as context alone, so a block costs its own slices plus ``2 r``.

    Args:
        model_or_fn: Keras model (run on the plan's engine) or :data:`PredictBatch`.
        stack: ``(Z, H, W)`` or ``(H, W)`` raw intensities (uint8, uint16 or float).
        plan: tiling, normalisation and engine (:class:`mitoseg.inference.plan.InferencePlan`).
        start: first slice to yield.
        stop: one past the last slice to yield (None: ``Z``).
        progress: show a progress bar over the predicted slices.
        description: progress bar label.

    Raises:
        ValueError: bad stack shape/dtype, tiling arguments, or ``start`` / ``stop``
            outside ``0 <= start < stop <= Z``.
    """

    check_tiling(plan.tile_size, 0.0, plan.batch_size, plan.divisor)
    stack = _as_stack(stack)
    depth, r = stack.shape[0], plan.z_average
    stop = depth if stop is None else stop
    if not 0 <= start < stop <= depth:
        raise ValueError(
            f"iter_stack_probabilities: need 0 <= start < stop <= {depth} (the stack's "
            f"slices), got start={start}, stop={stop}"
        )
    lo, hi = max(0, start - r), min(depth, stop + r)  # the slices z-averaging reads
    predict_batch = _predictor(model_or_fn, plan)
    slices = _slice_probabilities(stack, predict_batch, plan, lo, hi, progress, description)
    if r == 0:
        yield from slices
        return
    # mean over z - r .. z + r (clamped): slice z is ready once slice z + r is predicted
    window: dict[int, np.ndarray] = {}
    ready = start
    for z, probs in enumerate(slices, start=lo):
        window[z] = probs
        while ready < stop and min(ready + r, depth - 1) <= z:
            yield z_mean(window, ready, depth, r)
            for i in [i for i in window if i < ready + 1 - r]:
                del window[i]
            ready += 1


def z_mean(slices: Any, z: int, depth: int, r: int) -> np.ndarray:
    """The z-averaged probabilities of slice ``z``: the mean over slices ``z - r .. z + r``
    (:func:`context_window`: clamped at the stack's ends, the end slice counted again).

    The one z-averaging rule of whole stacks (:func:`iter_stack_probabilities`) and of
    volume blocks (:mod:`mitoseg.volume.job`).

    Args:
        slices: indexable by slice number (a mapping or an array over ``0 .. depth-1``)
            giving ``(H, W, C)`` float32 probabilities.
        z: the slice.
        depth: slices in the stack.
        r: the plan's ``z_average`` radius.

    Returns:
        ``(H, W, C)`` float32.
    """
    idx = context_window(z, depth, r)
    return (np.sum([slices[i] for i in idx], axis=0) / np.float32(len(idx))).astype(np.float32)


def _slice_probabilities(
    stack: np.ndarray,
    predict_batch: PredictBatch,
    plan: InferencePlan,
    lo: int,
    hi: int,
    progress: bool,
    description: str,
) -> Iterator[np.ndarray]:
    """Probabilities of slices ``lo .. hi - 1`` before z-averaging (2.5D context from
    ``stack``)."""
    from mitoseg.progress import progress_iter

    depth, k = stack.shape[0], plan.z_context
    normalised: dict[int, np.ndarray | None] = {}  # the sliding window of normalised slices
    for z in progress_iter(range(lo, hi), hi - lo, description, progress):
        if k == 0:
            yield predict_slice(stack[z], predict_batch, plan)
            continue
        window = context_window(z, depth, k)
        for i in [i for i in normalised if i < window[0]]:
            del normalised[i]
        for i in window:
            if i not in normalised:
                normalised[i] = normalize_for_plan(stack[i], plan.normalization)
        context = [normalised[i] for i in window]
        yield predict_slice(stack[z], predict_batch, plan, context)


def segment_stack(
    model_or_fn: Any,
    stack: np.ndarray,
    plan: InferencePlan,
    *,
    progress: bool = False,
) -> np.ndarray:
    """Segment every slice of a stack as ``plan`` says (normalise, tile, blend, decide).

    The single implementation behind the evaluate stage, ``mitoseg predict``, the
    service and the volume path.

    Args:
        model_or_fn: Keras model (input ``(N, H, W, 1)``, output ``(N, H, W, C)``), run on
            the plan's engine, or a :data:`PredictBatch` callable.
        stack: ``(Z, H, W)`` or ``(H, W)`` uint8/uint16 (or float) raw intensities.
        plan: the model's :class:`~mitoseg.inference.plan.InferencePlan` (threshold for sigmoid
            outputs, argmax for softmax).
        progress: show a progress bar over slices.

    Returns:
        ``(Z, H, W)`` uint8 class indexes (``Z = 1`` for a 2D input).

    Raises:
        ValueError: bad stack or tiling arguments.
    """
    stack = _as_stack(stack)
    out = np.zeros(stack.shape, dtype=np.uint8)
    probs = iter_stack_probabilities(model_or_fn, stack, plan, progress=progress)
    for z, p in enumerate(probs):
        out[z] = decide_mask(p, plan)
    return out
