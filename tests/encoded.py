"""Encode arrays as the bytes of an upload (TIFF, PNG) for codec and service tests."""

from __future__ import annotations

import io
import warnings

import numpy as np
import tifffile
from PIL import Image


def tiff_bytes(arr: np.ndarray, **kwargs: object) -> bytes:
    """``arr`` as TIFF file bytes (``tifffile.imwrite`` keyword arguments pass through)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tifffile.imwrite(buf, arr, **kwargs)
    return buf.getvalue()


def png_bytes(image: np.ndarray | Image.Image) -> bytes:
    """An array (or a PIL image) as PNG file bytes."""
    img = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
