"""Decode, validate and encode the images that cross the HTTP boundary.

Everything here is pure (bytes in, arrays out) and imports neither BentoML nor
TensorFlow, so the guard rails can be unit-tested without a server. Every rejection is
an :class:`UploadError` carrying the HTTP status, a stable machine-readable ``code`` and
a human message naming what was wrong; the service turns it into a JSON 4xx body.

Accepted uploads: TIFF (single or multi-page, classic or BigTIFF) and PNG, recognised by
their magic bytes whatever content type the client declared, 8/16-bit
unsigned integers or finite float32, grayscale or RGB(A) (converted to luma with
:func:`mitoseg.io.to_gray`). Every size limit is checked on the *header* (page count,
shape) before any pixel data is decompressed, so a small compressed file that claims a
huge image never allocates it; :func:`probe_upload` runs those checks alone, so the
service can price a request (:func:`mitoseg.serving.settings.request_cost`) before
decoding it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from mitoseg.config import ServeConfig
from mitoseg.io import DataError, to_gray

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

#: Pixel types accepted in uploads. Float input must be finite.
ACCEPTED_DTYPES = ("uint8", "uint16", "float32")

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class UploadError(DataError):
    """A rejected upload: maps to one HTTP 4xx response.

    Attributes:
        status: HTTP status code (400, 413, 415 or 422).
        code: short stable identifier, e.g. ``"too_many_pages"``.
        message: what was wrong, for humans.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def to_json(self) -> dict[str, str | int]:
        """The JSON error body: ``{"error": code, "message": message, "status": status}``."""
        return {"error": self.code, "message": self.message, "status": self.status}


@dataclass(frozen=True)
class Limits:
    """Upload size limits (see :class:`mitoseg.config.ServeConfig`).

    Attributes:
        max_bytes: largest accepted upload, bytes.
        max_pixels: largest accepted page, pixels (H * W).
        max_pages: most pages in one TIFF.
        max_side: largest accepted height or width, pixels.
    """

    max_bytes: int = 256 * 1024 * 1024
    max_pixels: int = 64 * 1024 * 1024
    max_pages: int = 512
    max_side: int = 32768

    @classmethod
    def from_config(cls, cfg: ServeConfig) -> Limits:
        """Take the limits from a ``serve:`` config section."""
        return cls(
            max_bytes=cfg.max_bytes,
            max_pixels=cfg.max_pixels,
            max_pages=cfg.max_pages,
            max_side=cfg.max_side,
        )


def sniff_format(data: bytes) -> Literal["tiff", "png"]:
    """Identify the container from its magic bytes (the file name is not trusted).

    Raises:
        UploadError: 400 ``empty_upload`` for zero bytes, 415 ``unsupported_format``
            for anything that is not TIFF or PNG.
    """
    if len(data) == 0:
        raise UploadError(400, "empty_upload", "the uploaded file is empty (0 bytes)")
    if data[:4] in _TIFF_MAGIC:
        return "tiff"
    if data[:8] == _PNG_MAGIC:
        return "png"
    raise UploadError(
        415,
        "unsupported_format",
        f"the upload is not a TIFF or PNG image (first bytes {data[:8]!r})",
    )


@dataclass(frozen=True)
class UploadInfo:
    """What an upload holds, read from its headers only (no pixel data decoded).

    Attributes:
        format: ``"tiff"`` or ``"png"``.
        shape: ``(Z, H, W)`` of the decoded stack (RGB(A) pages count once).
        dtype: pixel type name of the first page (``uint8``, ``uint16`` or ``float32``).
    """

    format: Literal["tiff", "png"]
    shape: tuple[int, int, int]
    dtype: str


def probe_upload(data: bytes, limits: Limits, *, max_pages: int | None = None) -> UploadInfo:
    """Check an upload's headers against the limits without decoding its pixels.

    Cheap for any upload, so a request's cost can be checked before the (possibly huge)
    pixel data is decompressed. Same arguments and header checks as
    :func:`decode_upload`, which calls it.

    Raises:
        UploadError: empty, too large, not TIFF/PNG, unreadable header, zero-size,
            unsupported pixel type or layout, too many pages or pixels, or pages of
            different shapes.
    """
    if len(data) > limits.max_bytes:
        raise UploadError(
            413,
            "too_large",
            f"the upload is {len(data)} bytes; the limit is {limits.max_bytes} bytes",
        )
    kind = sniff_format(data)
    if kind == "png":
        h, w, dtype = _png_header(data, limits)
        return UploadInfo("png", (1, h, w), dtype)
    page_limit = limits.max_pages if max_pages is None else min(max_pages, limits.max_pages)
    with _open_tiff(data) as tif:
        pages = _scan_tiff(tif, limits, page_limit)
    h, w = pages[0].hw
    return UploadInfo("tiff", (sum(p.n_planes for p in pages), h, w), pages[0].dtype.name)


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
    info = probe_upload(data, limits, max_pages=max_pages)
    if info.format == "tiff":
        page_limit = limits.max_pages if max_pages is None else min(max_pages, limits.max_pages)
        with _open_tiff(data) as tif:
            stack = _decode_tiff(_scan_tiff(tif, limits, page_limit))
    else:
        stack = _decode_png(data)
    if stack.dtype == np.float32 and not np.isfinite(stack).all():
        raise UploadError(422, "non_finite", "the image contains NaN or infinite values")
    return stack


def _check_dtype(dtype: np.dtype, where: str) -> None:
    if dtype.name not in ACCEPTED_DTYPES:
        raise UploadError(
            422,
            "unsupported_dtype",
            f"{where}: pixel type {dtype.name} is not supported; "
            f"send one of {', '.join(ACCEPTED_DTYPES)}",
        )


def _page_hw(shape: tuple[int, ...], where: str) -> tuple[int, int]:
    """Height and width of one page's shape, ``(H, W)`` or ``(H, W, 3|4)``."""
    if any(int(s) == 0 for s in shape):
        raise UploadError(400, "empty_image", f"{where}: the image has zero size (shape {shape})")
    if len(shape) == 2 or (len(shape) == 3 and shape[-1] in (3, 4)):
        return int(shape[0]), int(shape[1])
    raise UploadError(
        422,
        "unsupported_layout",
        f"{where}: unsupported page shape {tuple(shape)}; "
        "expected (H, W) grayscale or (H, W, 3|4) RGB(A)",
    )


def _check_size(h: int, w: int, limits: Limits, where: str) -> None:
    if h > limits.max_side or w > limits.max_side:
        raise UploadError(
            413,
            "too_large",
            f"{where}: {h}x{w} pixels exceeds the side limit of {limits.max_side}",
        )
    if h * w > limits.max_pixels:
        raise UploadError(
            413,
            "too_large",
            f"{where}: {h}x{w} = {h * w} pixels exceeds the limit of "
            f"{limits.max_pixels} pixels per page",
        )


def _to_gray_page(page: np.ndarray) -> np.ndarray:
    return to_gray(page) if page.ndim == 3 else page


def _open_tiff(data: bytes) -> Any:
    import tifffile

    try:
        return tifffile.TiffFile(io.BytesIO(data))
    except Exception as exc:  # tifffile raises many types for corrupt headers
        raise UploadError(
            400, "corrupt_image", f"cannot read the TIFF header ({type(exc).__name__}: {exc})"
        ) from None


@dataclass(frozen=True)
class _Page:
    page: Any
    where: str
    shape: tuple[int, ...]
    dtype: np.dtype
    planar: bool
    n_planes: int
    hw: tuple[int, int]


def _scan_tiff(tif: Any, limits: Limits, page_limit: int) -> list[_Page]:
    """Validate every page header of an open TIFF (no pixel data is read)."""
    try:
        n_pages = len(tif.pages)
    except Exception as exc:
        raise UploadError(
            400, "corrupt_image", f"cannot read the TIFF pages ({type(exc).__name__}: {exc})"
        ) from None
    if n_pages == 0:
        raise UploadError(400, "empty_image", "the TIFF contains no pages")
    hint = "; use /segment_stack for stacks" if page_limit == 1 else ""
    status = 413 if page_limit == limits.max_pages else 422
    if n_pages > page_limit:
        raise UploadError(
            status,
            "too_many_pages",
            f"the TIFF has {n_pages} pages; at most {page_limit} accepted here{hint}",
        )
    pages: list[_Page] = []
    images = 0
    for i in range(n_pages):
        where = f"page {i}"
        try:
            page = tif.pages[i]
            shape = tuple(int(s) for s in page.shape)
            dtype = np.dtype(page.dtype) if page.dtype is not None else None
            planar = int(getattr(page, "planarconfig", 1)) == 2
        except Exception as exc:
            raise UploadError(
                400, "corrupt_image", f"{where}: cannot read ({type(exc).__name__}: {exc})"
            ) from None
        if dtype is None:
            raise UploadError(422, "unsupported_dtype", f"{where}: unknown pixel type")
        _check_dtype(dtype, where)
        # A separate-plane page (S, H, W) is read as S slices, as mitoseg.io.read_stack
        # does: tifffile writes a (3, H, W) stack that way.
        n_planes = shape[0] if planar and len(shape) == 3 else 1
        hw_shape = shape[1:] if planar and len(shape) == 3 else shape
        h, w = _page_hw(hw_shape, where)
        _check_size(h, w, limits, where)
        if images + n_planes > page_limit:
            raise UploadError(
                status,
                "too_many_pages",
                f"the TIFF holds more than {page_limit} images (page {i} stores "
                f"{n_planes} planes); at most {page_limit} accepted here{hint}",
            )
        if pages and (h, w) != pages[0].hw:
            first = pages[0].hw
            raise UploadError(
                422,
                "inconsistent_pages",
                f"{where}: {h}x{w} differs from page 0 ({first[0]}x{first[1]}); "
                "all pages of a stack must have the same size",
            )
        images += n_planes
        pages.append(_Page(page, where, shape, dtype, planar, n_planes, (h, w)))
    return pages


def _decode_tiff(pages: list[_Page]) -> np.ndarray:
    out: list[np.ndarray] = []
    for p in pages:
        try:
            arr = np.asarray(p.page.asarray())
        except Exception as exc:
            raise UploadError(
                400,
                "corrupt_image",
                f"{p.where}: cannot decode the pixel data, the file may be truncated "
                f"({type(exc).__name__}: {exc})",
            ) from None
        if arr.shape != p.shape:
            raise UploadError(
                400,
                "corrupt_image",
                f"{p.where}: decoded shape {arr.shape} does not match the header {p.shape}",
            )
        if p.planar and arr.ndim == 3:
            out.extend(arr)
        else:
            out.append(_to_gray_page(arr))
    return np.stack(out)


_PNG_MODE_DTYPES = {"1": "uint8", "L": "uint8", "P": "uint8", "LA": "uint8", "PA": "uint8"}
_PNG_MODE_DTYPES.update({"RGB": "uint8", "RGBA": "uint8", "I;16": "uint16", "I": "uint16"})


def _png_header(data: bytes, limits: Limits) -> tuple[int, int, str]:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            mode = im.mode
    except Exception as exc:
        raise UploadError(
            400, "corrupt_image", f"cannot read the PNG header ({type(exc).__name__}: {exc})"
        ) from None
    _page_hw((h, w), "PNG")
    _check_size(h, w, limits, "PNG")
    return h, w, _PNG_MODE_DTYPES.get(mode, mode)


def _decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data))
    except Exception as exc:
        raise UploadError(
            400, "corrupt_image", f"cannot read the PNG header ({type(exc).__name__}: {exc})"
        ) from None
    with im:
        mode = im.mode
        try:
            if mode in ("1", "P", "PA", "LA"):
                im = im.convert("RGBA" if mode in ("P", "PA") else "L")
            im.load()
            arr = np.asarray(im)
        except Exception as exc:
            raise UploadError(
                400,
                "corrupt_image",
                f"PNG: cannot decode the pixel data, the file may be truncated "
                f"({type(exc).__name__}: {exc})",
            ) from None
    if arr.dtype in (np.int32, np.int64) and arr.ndim == 2:
        # PIL reads 16-bit grayscale PNG as mode "I" (int32); PNG cannot exceed 16 bits.
        if arr.min() < 0 or arr.max() > 65535:
            raise UploadError(422, "unsupported_dtype", "PNG: pixel values outside 0..65535")
        arr = arr.astype(np.uint16)
    _check_dtype(arr.dtype, "PNG")
    _page_hw(arr.shape, "PNG")
    return _to_gray_page(arr)[None]


def encode_png(mask: np.ndarray) -> bytes:
    """Encode one ``(H, W)`` uint8 or uint16 mask as a lossless PNG.

    Raises:
        ValueError: not 2D, or another dtype.
    """
    from PIL import Image

    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"encode_png: expected an (H, W) mask, got shape {arr.shape}")
    if arr.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"encode_png: expected uint8 or uint16, got {arr.dtype}")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)  # speed over size
    return buf.getvalue()


def encode_tiff(stack: np.ndarray) -> bytes:
    """Encode ``(Z, H, W)`` or ``(H, W)`` uint8/uint16 as a zlib multi-page TIFF.

    Raises:
        ValueError: not 2D/3D, or another dtype.
    """
    import tifffile

    arr = np.asarray(stack)
    if arr.ndim not in (2, 3):
        raise ValueError(f"encode_tiff: expected (Z, H, W) or (H, W), got shape {arr.shape}")
    if arr.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"encode_tiff: expected uint8 or uint16, got {arr.dtype}")
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, compression="zlib", photometric="minisblack")
    return buf.getvalue()
