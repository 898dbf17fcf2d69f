"""Shared argument checks for arrays (one message format for every ndim / dtype check).

Light: numpy only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["check_array", "check_stack"]

#: How each rank is spelled in messages (``axes=`` overrides it per call).
_AXES = {2: "(H, W)", 3: "(Z, H, W)", 4: "(N, H, W, C)"}


def check_array(
    value: Any,
    where: str,
    *,
    ndim: int | tuple[int, ...],
    axes: Mapping[int, str] | None = None,
    sizes: Mapping[int, int] | None = None,
    dtypes: tuple[str, ...] | None = None,
    nonempty: bool = False,
) -> np.ndarray:
    """``value`` as an array after checking its rank, axis sizes, dtype and size.

    Args:
        value: array-like.
        where: prefix of the message, e.g. the function name (``"encode_png"``).
        ndim: accepted rank(s).
        axes: how a rank is spelled in the message when it is not the default
            ``(H, W)`` / ``(Z, H, W)`` / ``(N, H, W, C)``, e.g. ``{3: "(H, W, C)"}``.
        sizes: required lengths of single axes (negative indexes count from the end),
            e.g. ``{-1: 3}`` for three channels; each axis must exist at every rank of
            ``ndim``.
        dtypes: accepted dtype names (``("uint8", "uint16")``); None accepts any.
        nonempty: reject arrays with a zero-length axis.

    Returns:
        ``np.asarray(value)`` (no copy when it already is an array).

    Raises:
        ValueError: ``<where>: expected (Z, H, W) or (H, W), got shape (5,)`` (wrong rank,
            or an axis of ``sizes`` of another length),
            ``<where>: expected uint8 or uint16, got float32`` or
            ``<where>: expected a non-empty array, got shape (0, 4)``.
    """
    arr = np.asarray(value)
    ranks = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if arr.ndim not in ranks or any(arr.shape[a] != n for a, n in (sizes or {}).items()):
        spelling = {**_AXES, **(axes or {})}
        wanted = " or ".join(spelling.get(r, f"{r}-D") for r in sorted(ranks, reverse=True))
        raise ValueError(f"{where}: expected {wanted}, got shape {arr.shape}")
    if dtypes is not None and arr.dtype.name not in dtypes:
        raise ValueError(f"{where}: expected {' or '.join(dtypes)}, got {arr.dtype}")
    if nonempty and arr.size == 0:
        raise ValueError(f"{where}: expected a non-empty array, got shape {arr.shape}")
    return arr


def check_stack(
    value: Any,
    where: str,
    *,
    dtypes: tuple[str, ...] | None = None,
    nonempty: bool = False,
) -> np.ndarray:
    """``value`` as a ``(Z, H, W)`` stack; an ``(H, W)`` image becomes a one-slice stack.

    Args:
        value: ``(Z, H, W)`` or ``(H, W)`` array-like.
        where: prefix of the message.
        dtypes: accepted dtype names; None accepts any.
        nonempty: reject a stack with a zero-length axis (no slices, or empty slices).

    Returns:
        ``(Z, H, W)`` array (a view of ``value`` where possible).

    Raises:
        ValueError: the messages of :func:`check_array`, e.g.
            ``<where>: expected (Z, H, W) or (H, W), got shape (5,)``.
    """
    arr = check_array(value, where, ndim=(2, 3), dtypes=dtypes, nonempty=nonempty)
    return arr[None] if arr.ndim == 2 else arr
