"""Pixel conversions shared by the image decoder and the napari plugin (numpy only)."""

from __future__ import annotations

import numpy as np

__all__ = ["to_gray"]


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """Convert ``(H, W, 3|4)`` RGB(A) to ``(H, W)`` luma (ITU-R 601), keeping the dtype.

    Args:
        rgb: ``(H, W, 3)`` or ``(H, W, 4)`` integer or float array; alpha is ignored.

    Returns:
        ``(H, W)`` array of ``rgb``'s dtype; integers are rounded and clipped to the
        dtype's range.
    """
    weights = np.array([0.299, 0.587, 0.114], dtype=np.float64)
    gray = rgb[..., :3].astype(np.float64) @ weights
    if np.issubdtype(rgb.dtype, np.integer):
        return np.clip(np.rint(gray), 0, np.iinfo(rgb.dtype).max).astype(rgb.dtype)
    return gray.astype(rgb.dtype)
