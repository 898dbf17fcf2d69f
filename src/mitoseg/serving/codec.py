"""Decode, validate and encode the images that cross the HTTP boundary.

Decoding is :mod:`mitoseg.decode`, the same decoder :func:`mitoseg.io.read_stack` uses
for files, run here with the upload policy: TIFF or PNG only, the size
:class:`Limits` of the ``serve:`` config, and pixel types ``uint8``, ``uint16`` or finite
``float32``. Every rejection is an :class:`UploadError` (:class:`mitoseg.decode.ImageError`)
carrying the HTTP status, a stable machine-readable ``code`` and a message naming what was
wrong; the service turns it into a JSON 4xx body. Everything here is pure (bytes in,
arrays out) and imports neither BentoML nor TensorFlow. :func:`probe_upload` checks the
headers alone, so the service can price a request
(:func:`mitoseg.serving.settings.request_cost`) before decoding it.
"""

from __future__ import annotations

import io

import numpy as np

from mitoseg.checks import check_array
from mitoseg.decode import (
    ACCEPTED_DTYPES,
    UPLOAD_FORMATS,
    Limits,
    decode_image,
    probe_image,
    sniff_format,
)
from mitoseg.decode import ImageError as UploadError
from mitoseg.decode import ImageInfo as UploadInfo

__all__ = [
    "ACCEPTED_DTYPES",
    "Limits",
    "UploadError",
    "UploadInfo",
    "decode_upload",
    "encode_png",
    "encode_tiff",
    "probe_upload",
    "sniff_format",
]


def probe_upload(data: bytes, limits: Limits, *, max_pages: int | None = None) -> UploadInfo:
    """Check an upload's headers against the limits without decoding its pixels.

    Same arguments and header checks as :func:`decode_upload`, which calls it.

    Raises:
        UploadError: empty, too large, not TIFF/PNG, unreadable header, zero-size,
            unsupported pixel type or layout, too many pages or pixels, or pages of
            different shapes.
    """
    return probe_image(data, limits, max_pages=max_pages, formats=UPLOAD_FORMATS)


def decode_upload(data: bytes, limits: Limits, *, max_pages: int | None = None) -> np.ndarray:
    """Decode and validate an uploaded image or stack.

    Args:
        data: the raw file bytes.
        limits: size limits.
        max_pages: a stricter page limit for this endpoint (``1`` for single-image
            endpoints); ``None`` uses ``limits.max_pages``.

    Returns:
        ``(Z, H, W)`` array, dtype uint8, uint16 or float32 (finite). RGB(A) pages are
        converted to grayscale keeping their dtype.

    Raises:
        UploadError: empty, too large, not TIFF/PNG, truncated or corrupt, zero-size,
            unsupported pixel type or layout, non-finite values, too many pages or
            pixels, or pages of different shapes.
    """
    return decode_image(data, limits, max_pages=max_pages, formats=UPLOAD_FORMATS)


def encode_png(mask: np.ndarray) -> bytes:
    """Encode one ``(H, W)`` uint8 or uint16 mask as a lossless PNG.

    Raises:
        ValueError: not 2D, or another dtype.
    """
    from PIL import Image

    arr = check_array(mask, "encode_png", ndim=2, dtypes=("uint8", "uint16"))
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)  # speed over size
    return buf.getvalue()


def encode_tiff(stack: np.ndarray) -> bytes:
    """Encode ``(Z, H, W)`` or ``(H, W)`` uint8/uint16 as a zlib multi-page TIFF.

    Raises:
        ValueError: not 2D/3D, or another dtype.
    """
    import tifffile

    arr = check_array(stack, "encode_tiff", ndim=(2, 3), dtypes=("uint8", "uint16"))
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, compression="zlib", photometric="minisblack")
    return buf.getvalue()
