"""Shared argument checks for arrays (one message format for every ndim / dtype check).

Light: numpy only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["check_array"]

#: How each rank is spelled in messages.
_AXES = {2: "(H, W)", 3: "(Z, H, W)", 4: "(N, H, W, C)"}


def check_array(
    value: Any,
    where: str,
    *,
    ndim: int | tuple[int, ...],
    dtypes: tuple[str, ...] | None = None,
    nonempty: bool = False,
) -> np.ndarray:
    """``value`` as an array after checking its rank, dtype and size.

    Args:
        value: array-like.
        where: prefix of the message, e.g. the function name (``"encode_png"``).
        ndim: accepted rank(s).
        dtypes: accepted dtype names (``("uint8", "uint16")``); None accepts any.
        nonempty: reject arrays with a zero-length axis.

    Returns:
        ``np.asarray(value)`` (no copy when it already is an array).

    Raises:
        ValueError: ``<where>: expected (Z, H, W) or (H, W), got shape (5,)``,
            ``<where>: expected uint8 or uint16, got float32`` or
            ``<where>: expected a non-empty array, got shape (0, 4)``.
    """
    arr = np.asarray(value)
    ranks = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if arr.ndim not in ranks:
        wanted = " or ".join(_AXES.get(r, f"{r}-D") for r in sorted(ranks, reverse=True))
        raise ValueError(f"{where}: expected {wanted}, got shape {arr.shape}")
    if dtypes is not None and arr.dtype.name not in dtypes:
        raise ValueError(f"{where}: expected {' or '.join(dtypes)}, got {arr.dtype}")
    if nonempty and arr.size == 0:
        raise ValueError(f"{where}: expected a non-empty array, got shape {arr.shape}")
    return arr
