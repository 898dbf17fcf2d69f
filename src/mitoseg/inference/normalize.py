"""Intensity normalisation: the one rule that turns a raw slice into network input.

Robust percentile scaling (``low_pct`` -> 0, ``high_pct`` -> 1, clipped), the same for
the training patches (:func:`normalize_slice` with the plan's default percentiles
:data:`LOW_PCT` / :data:`HIGH_PCT`, which :class:`Normalization` defaults to), evaluation,
``mitoseg predict``, the service and volume blocks (:func:`normalize_for_plan`, which also
recognises blank slices; :mod:`mitoseg.volume.tiles` computes a slice's percentiles once
and scales its tiles with :func:`scale_unit`). Pure: numpy and pydantic.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "HIGH_PCT",
    "LOW_PCT",
    "Normalization",
    "dtype_range",
    "normalize_for_plan",
    "normalize_slice",
    "robust_range",
    "scale_unit",
]

#: Percentiles mapped to 0 and 1: the training patches' and every default plan's.
LOW_PCT = 0.5
HIGH_PCT = 99.5


class Normalization(BaseModel):
    """Intensity normalisation of one 2D slice before the network.

    Robust percentile scaling: ``low_pct`` maps to 0, ``high_pct`` to 1, clipped. A slice
    whose robust range ``hi - lo`` is below ``blank_range`` times the dtype's full range
    (255 for uint8, 65535 for uint16, 1.0 for float input) carries no structure: it is
    *blank* and is segmented as background without running the network (a constant or
    near-constant image gives an empty mask).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["percentile"] = "percentile"
    low_pct: float = Field(LOW_PCT, ge=0, lt=100)
    high_pct: float = Field(HIGH_PCT, gt=0, le=100)
    blank_range: float = Field(0.02, ge=0, lt=1)

    @model_validator(mode="after")
    def _check_order(self) -> Normalization:
        if self.low_pct >= self.high_pct:
            raise ValueError(
                f"normalization: low_pct {self.low_pct} must be below high_pct {self.high_pct}"
            )
        return self


def robust_range(
    image: np.ndarray, low_pct: float = LOW_PCT, high_pct: float = HIGH_PCT
) -> tuple[np.ndarray, float, float]:
    """Percentiles ``low_pct`` and ``high_pct`` of one slice.

    Args:
        image: ``(H, W)`` (or any shape) integer or float array.
        low_pct: lower percentile.
        high_pct: upper percentile.

    Returns:
        ``(x, lo, hi)``: the slice as float32 and its two percentiles.

    Raises:
        ValueError: non-finite values, or percentiles out of order.
    """
    if not 0 <= low_pct < high_pct <= 100:
        raise ValueError(
            f"normalize_slice: need 0 <= low_pct < high_pct <= 100, got {low_pct}, {high_pct}"
        )
    x = np.asarray(image, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError("normalize_slice: image contains NaN or infinite values")
    lo, hi = np.percentile(x, [low_pct, high_pct])
    return x, float(lo), float(hi)


def scale_unit(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``clip((x - lo) / (hi - lo), 0, 1)`` as float32; zeros when ``hi <= lo``."""
    if hi <= lo:
        return np.zeros_like(x, dtype=np.float32)
    return np.clip((x - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0).astype(np.float32)


def normalize_slice(
    image: np.ndarray, low_pct: float = LOW_PCT, high_pct: float = HIGH_PCT
) -> np.ndarray:
    """Scale one slice to ``float32`` in ``[0, 1]`` by robust percentiles.

    The same rule is used for training patches, evaluation, ``mitoseg predict`` and the
    service (through :func:`normalize_for_plan`, which also recognises blank slices), so
    8-bit and 16-bit inputs of the same scene give the same network input.

    Args:
        image: ``(H, W)`` (or any shape) integer or float array.
        low_pct: percentile mapped to 0.
        high_pct: percentile mapped to 1.

    Returns:
        Array of the same shape, ``float32`` in ``[0, 1]``. A constant image maps to 0.

    Raises:
        ValueError: non-finite values, or percentiles out of order.
    """
    x, lo, hi = robust_range(image, low_pct, high_pct)
    return scale_unit(x, lo, hi)


def dtype_range(dtype: np.dtype) -> float:
    """The value range of an image dtype: ``max - min(min, 0)`` for integers, 1.0 for
    floats (images in [0, 1]); the blank-slice rule is a fraction of it."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return float(info.max) - float(min(info.min, 0))
    return 1.0


def normalize_for_plan(image: np.ndarray, norm: Normalization) -> np.ndarray | None:
    """Normalise one slice by the plan's rule, or None when the slice is blank.

    Args:
        image: ``(H, W)`` raw intensities (uint8, uint16 or float), finite.
        norm: the plan's :class:`Normalization`.

    Returns:
        ``(H, W)`` float32 in ``[0, 1]``, or ``None`` when the robust intensity range is
        below ``norm.blank_range`` of the dtype range (segment as background).

    Raises:
        ValueError: non-finite values.
    """
    x = np.asarray(image)
    xf, lo, hi = robust_range(x, norm.low_pct, norm.high_pct)
    if hi - lo <= norm.blank_range * dtype_range(x.dtype):
        return None
    return scale_unit(xf, lo, hi)
