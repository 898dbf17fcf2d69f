"""One image decoder for files (:func:`mitoseg.io.read_stack`) and HTTP uploads
(:func:`mitoseg.serving.codec.decode_upload`): the same bytes give the same array and
the same error.

TIFF (single or multi-page, classic or BigTIFF), PNG and (files only) JPEG, recognised by
their magic bytes, never by the file name or declared content type. Pages are read one
by one from their headers: ``(H, W)`` grayscale, ``(H, W, 3|4)`` RGB(A) (converted to luma
with :func:`mitoseg.pixels.to_gray`, keeping the dtype) or a separate-plane ``(S, H, W)`` page
(read as ``S`` slices); every page must have the same size. Every check an upload needs
(:class:`Limits`: bytes, pages, pixels, side; the accepted pixel types) runs on the
headers before any pixel data is decompressed, so :func:`probe_image` can price a
request without decoding it. Files are read with no limits and any numeric pixel type.

Every rejection is an :class:`ImageError` (a :class:`mitoseg.errors.DataError`) with the HTTP
status the service answers, a stable ``code`` and a message naming the page; the file
reader prefixes the path. Pure: numpy, tifffile and Pillow (imported inside functions).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from mitoseg.errors import DataError
from mitoseg.pixels import to_gray

__all__ = [
    "ACCEPTED_DTYPES",
    "FILE_FORMATS",
    "UPLOAD_FORMATS",
    "ImageError",
    "ImageInfo",
    "Limits",
    "decode_image",
    "probe_image",
    "sniff_format",
]

Format = Literal["tiff", "png", "jpeg"]
#: What uploads may be, and what files may be.
UPLOAD_FORMATS: tuple[Format, ...] = ("tiff", "png")
FILE_FORMATS: tuple[Format, ...] = ("tiff", "png", "jpeg")


#: Pixel types accepted in uploads. Float input must be finite.
ACCEPTED_DTYPES = ("uint8", "uint16", "float32")

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"


class ImageError(DataError):
    """An image that cannot be decoded or is not accepted: one HTTP 4xx response.

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


class LimitSettings(Protocol):
    """What :meth:`Limits.from_config` reads (a :class:`mitoseg.config.ServeConfig`)."""

    max_bytes: int
    max_pixels: int
    max_pages: int
    max_side: int


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
    def unlimited(cls) -> Limits:
        """No size limits (files on disk)."""
        big = 1 << 62
        return cls(max_bytes=big, max_pixels=big, max_pages=big, max_side=big)

    @classmethod
    def from_config(cls, cfg: LimitSettings) -> Limits:
        """Take the limits from a ``serve:`` config section."""
        return cls(
            max_bytes=cfg.max_bytes,
            max_pixels=cfg.max_pixels,
            max_pages=cfg.max_pages,
            max_side=cfg.max_side,
        )


def sniff_format(head: bytes, formats: tuple[Format, ...] = UPLOAD_FORMATS) -> Format:
    """Identify the container from its first bytes (the file name is not trusted).

    Args:
        head: the first 8 (or more) bytes.
        formats: the formats accepted here.

    Raises:
        ImageError: 400 ``empty_upload`` for zero bytes, 415 ``unsupported_format``
            for anything else than ``formats``.
    """
    upload = formats == UPLOAD_FORMATS  # uploads keep the service's wording
    if len(head) == 0:
        what = "the uploaded file" if upload else "the file"
        raise ImageError(400, "empty_upload", f"{what} is empty (0 bytes)")
    kind: Format | None = None
    if head[:4] in _TIFF_MAGIC:
        kind = "tiff"
    elif head[:8] == _PNG_MAGIC:
        kind = "png"
    elif head[:3] == _JPEG_MAGIC:
        kind = "jpeg"
    if kind is None or kind not in formats:
        *rest, last = (f.upper() for f in formats)
        names = f"{', '.join(rest)} or {last}" if rest else last
        raise ImageError(
            415,
            "unsupported_format",
            f"the {'upload' if upload else 'file'} is not a {names} image "
            f"(first bytes {head[:8]!r})",
        )
    return kind


@dataclass(frozen=True)
class ImageInfo:
    """What an image holds, read from its headers only (no pixel data decoded).

    Attributes:
        format: ``"tiff"``, ``"png"`` or ``"jpeg"``.
        shape: ``(Z, H, W)`` of the decoded stack (RGB(A) pages count once).
        dtype: pixel type name of the first page (e.g. ``uint8``).
    """

    format: Format
    shape: tuple[int, int, int]
    dtype: str


Source = bytes | Path


def _head(source: Source) -> tuple[bytes, int]:
    if isinstance(source, Path):
        with source.open("rb") as fh:
            return fh.read(8), source.stat().st_size
    return bytes(source[:8]), len(source)


def probe_image(
    source: Source,
    limits: Limits,
    *,
    max_pages: int | None = None,
    dtypes: tuple[str, ...] | None = ACCEPTED_DTYPES,
    formats: tuple[Format, ...] = UPLOAD_FORMATS,
) -> ImageInfo:
    """Check an image's headers against the limits without decoding its pixels.

    Args:
        source: the encoded bytes, or a file.
        limits: size limits (:meth:`Limits.unlimited` for files).
        max_pages: a stricter page limit (``1`` for single-image endpoints).
        dtypes: accepted pixel type names; None accepts any numeric type.
        formats: accepted containers.

    Raises:
        ImageError: empty, too large, unknown container, unreadable header, zero-size,
            unsupported pixel type or layout, too many pages or pixels, or pages of
            different shapes.
    """
    head, size = _head(source)
    if size > limits.max_bytes:
        raise ImageError(
            413,
            "too_large",
            f"the upload is {size} bytes; the limit is {limits.max_bytes} bytes",
        )
    kind = sniff_format(head, formats)
    if kind != "tiff":
        h, w, dtype = _pil_header(source, limits, kind)
        return ImageInfo(kind, (1, h, w), dtype)
    page_limit = limits.max_pages if max_pages is None else min(max_pages, limits.max_pages)
    with _open_tiff(source) as tif:
        pages = _scan_tiff(tif, limits, page_limit, dtypes)
    h, w = pages[0].hw
    return ImageInfo("tiff", (sum(p.n_planes for p in pages), h, w), pages[0].dtype.name)


def decode_image(
    source: Source,
    limits: Limits,
    *,
    max_pages: int | None = None,
    dtypes: tuple[str, ...] | None = ACCEPTED_DTYPES,
    formats: tuple[Format, ...] = UPLOAD_FORMATS,
    finite: bool = True,
) -> np.ndarray:
    """Decode and validate an image or stack (arguments as :func:`probe_image`).

    Args:
        finite: reject float pixels that are NaN or infinite (uploads); files are read
            as they are so that ``mitoseg validate`` can name the bad slices.

    Returns:
        ``(Z, H, W)`` array in the image's dtype; RGB(A) pages converted to grayscale
        keeping their dtype.

    Raises:
        ImageError: as :func:`probe_image`; truncated or corrupt pixel data; NaN or
            infinite values (with ``finite``).
    """
    info = probe_image(source, limits, max_pages=max_pages, dtypes=dtypes, formats=formats)
    if info.format == "tiff":
        page_limit = limits.max_pages if max_pages is None else min(max_pages, limits.max_pages)
        with _open_tiff(source) as tif:
            stack = _decode_tiff(_scan_tiff(tif, limits, page_limit, dtypes), info.shape)
    else:
        stack = _decode_pil(source, info.format, dtypes)
    if finite and stack.dtype.kind == "f" and not np.isfinite(stack).all():
        raise ImageError(422, "non_finite", "the image contains NaN or infinite values")
    return stack


def _check_dtype(dtype: np.dtype, where: str, dtypes: tuple[str, ...] | None) -> None:
    ok = dtype.kind in "biuf" if dtypes is None else dtype.name in dtypes
    if not ok:
        send = "a numeric type" if dtypes is None else f"one of {', '.join(dtypes)}"
        raise ImageError(
            422,
            "unsupported_dtype",
            f"{where}: pixel type {dtype.name} is not supported; send {send}",
        )


def _page_hw(shape: tuple[int, ...], where: str) -> tuple[int, int]:
    """Height and width of one page's shape, ``(H, W)`` or ``(H, W, 3|4)``."""
    if any(int(s) == 0 for s in shape):
        raise ImageError(400, "empty_image", f"{where}: the image has zero size (shape {shape})")
    if len(shape) == 2 or (len(shape) == 3 and shape[-1] in (3, 4)):
        return int(shape[0]), int(shape[1])
    raise ImageError(
        422,
        "unsupported_layout",
        f"{where}: unsupported page shape {tuple(shape)}; "
        "expected (H, W) grayscale or (H, W, 3|4) RGB(A)",
    )


def _check_size(h: int, w: int, limits: Limits, where: str) -> None:
    if h > limits.max_side or w > limits.max_side:
        raise ImageError(
            413,
            "too_large",
            f"{where}: {h}x{w} pixels exceeds the side limit of {limits.max_side}",
        )
    if h * w > limits.max_pixels:
        raise ImageError(
            413,
            "too_large",
            f"{where}: {h}x{w} = {h * w} pixels exceeds the limit of "
            f"{limits.max_pixels} pixels per page",
        )


def _to_gray_page(page: np.ndarray) -> np.ndarray:
    return to_gray(page) if page.ndim == 3 else page


def _open_tiff(source: Source) -> Any:
    import tifffile

    try:
        return tifffile.TiffFile(source if isinstance(source, Path) else io.BytesIO(source))
    except Exception as exc:  # tifffile raises many types for corrupt headers
        raise ImageError(
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


def _scan_tiff(
    tif: Any, limits: Limits, page_limit: int, dtypes: tuple[str, ...] | None
) -> list[_Page]:
    """Validate every page header of an open TIFF (no pixel data is read)."""
    try:
        n_pages = len(tif.pages)
    except Exception as exc:
        raise ImageError(
            400, "corrupt_image", f"cannot read the TIFF pages ({type(exc).__name__}: {exc})"
        ) from None
    if n_pages == 0:
        raise ImageError(400, "empty_image", "the TIFF contains no pages")
    _check_axes(tif)
    hint = "; use /segment_stack for stacks" if page_limit == 1 else ""
    status = 413 if page_limit == limits.max_pages else 422
    if n_pages > page_limit:
        raise ImageError(
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
            raise ImageError(
                400, "corrupt_image", f"{where}: cannot read ({type(exc).__name__}: {exc})"
            ) from None
        if dtype is None:
            raise ImageError(422, "unsupported_dtype", f"{where}: unknown pixel type")
        _check_dtype(dtype, where, dtypes)
        # A separate-plane page (S, H, W) is read as S slices: tifffile writes a
        # (3, H, W) stack that way.
        n_planes = shape[0] if planar and len(shape) == 3 else 1
        hw_shape = shape[1:] if planar and len(shape) == 3 else shape
        h, w = _page_hw(hw_shape, where)
        _check_size(h, w, limits, where)
        if images + n_planes > page_limit:
            raise ImageError(
                status,
                "too_many_pages",
                f"the TIFF holds more than {page_limit} images (page {i} stores "
                f"{n_planes} planes); at most {page_limit} accepted here{hint}",
            )
        if pages and (h, w) != pages[0].hw:
            first = pages[0].hw
            raise ImageError(
                422,
                "inconsistent_pages",
                f"{where}: {h}x{w} differs from page 0 ({first[0]}x{first[1]}); "
                "all pages of a stack must have the same size",
            )
        images += n_planes
        pages.append(_Page(page, where, shape, dtype, planar, n_planes, (h, w)))
    return pages


#: Axes of a TIFF series that index the slices of a (Z, Y, X) stack: depth, a generic
#: page sequence (``I``) or an unnamed dimension (``Q``, tifffile's shaped files).
STACK_AXES = frozenset("ZIQ")
#: Axes within one slice: rows, columns, samples (RGB).
_PLANE_AXES = frozenset("YXS")
_AXIS_NAMES = {"C": "channel", "T": "time", "Z": "depth", "I": "sequence", "Q": "unnamed",
               "E": "lambda", "R": "tile", "H": "lifetime", "A": "angle", "P": "phase",
               "L": "exposure", "V": "event", "M": "mosaic"}  # fmt: skip


def _check_axes(tif: Any) -> None:
    """Refuse a hyperstack whose pages are not the slices of one ``(Z, Y, X)`` stack.

    ImageJ and OME-TIFF files (and tifffile's shaped files) name the dimensions their
    pages stand for (tifffile's ``series[0].axes``, e.g. ``TZCYX``). Pages along Z (or an
    unnamed or sequence axis) are slices; a channel, time or other axis with more than
    one entry, or two stacking axes with more than one entry each, would otherwise be
    flattened into slices silently.

    Raises:
        ImageError: 422 ``unsupported_axis`` naming the axis and its size.
    """
    try:
        series = tif.series[0]
        axes, shape = str(series.axes), tuple(int(n) for n in series.shape)
    except Exception:  # no series metadata: the pages are the stack
        return
    if len(axes) != len(shape):
        return
    extra = [(a, n) for a, n in zip(axes, shape, strict=True) if a not in _PLANE_AXES and n > 1]
    what = f"the TIFF is a hyperstack with axes {axes} (shape {' x '.join(map(str, shape))})"
    for axis, n in extra:
        if axis not in STACK_AXES:
            name = _AXIS_NAMES.get(axis, "unknown")
            one = {"C": "one channel", "T": "one time point"}.get(axis, f"one {name} entry")
            hint = (
                "; if these are Z slices, save the TIFF with axes ZYX"
                if axis == "C" and not any(a in STACK_AXES for a, _ in extra)
                else ""
            )
            raise ImageError(
                422,
                "unsupported_axis",
                f"{what}: axis {axis} ({name}) has {n} entries; only a (Z, Y, X) stack is "
                f"segmented: send {one}{hint}",
            )
    if len(extra) > 1:
        dims = ", ".join(f"{a} ({_AXIS_NAMES.get(a, 'unknown')}) = {n}" for a, n in extra)
        raise ImageError(
            422,
            "unsupported_axis",
            f"{what}: more than one axis besides Y and X has several entries ({dims}); "
            "send a (Z, Y, X) stack",
        )


def _decode_tiff(pages: list[_Page], shape: tuple[int, int, int]) -> np.ndarray:
    out = np.empty(shape, dtype=pages[0].dtype)
    z = 0
    for p in pages:
        try:
            arr = np.asarray(p.page.asarray())
        except Exception as exc:
            raise ImageError(
                400,
                "corrupt_image",
                f"{p.where}: cannot decode the pixel data, the file may be truncated "
                f"({type(exc).__name__}: {exc})",
            ) from None
        if arr.shape != p.shape:
            raise ImageError(
                400,
                "corrupt_image",
                f"{p.where}: decoded shape {arr.shape} does not match the header {p.shape}",
            )
        if p.planar and arr.ndim == 3:
            out[z : z + len(arr)] = arr
        else:
            out[z] = _to_gray_page(arr)
        z += p.n_planes
    return out


_PNG_MODE_DTYPES = {"1": "uint8", "L": "uint8", "P": "uint8", "LA": "uint8", "PA": "uint8"}
_PNG_MODE_DTYPES.update({"RGB": "uint8", "RGBA": "uint8", "I;16": "uint16", "I": "uint16"})


def _pil_open(source: Source, label: str) -> Any:
    from PIL import Image

    try:
        return Image.open(source if isinstance(source, Path) else io.BytesIO(source))
    except Exception as exc:
        raise ImageError(
            400, "corrupt_image", f"cannot read the {label} header ({type(exc).__name__}: {exc})"
        ) from None


def _pil_header(source: Source, limits: Limits, kind: Format) -> tuple[int, int, str]:
    label = kind.upper()
    with _pil_open(source, label) as im:
        w, h = im.size
        mode = im.mode
    _page_hw((h, w), label)
    _check_size(h, w, limits, label)
    return h, w, _PNG_MODE_DTYPES.get(mode, mode)


def _decode_pil(source: Source, kind: Format, dtypes: tuple[str, ...] | None) -> np.ndarray:
    label = kind.upper()
    im = _pil_open(source, label)
    with im:
        mode = im.mode
        try:
            if mode in ("1", "P", "PA", "LA"):
                im = im.convert("RGBA" if mode in ("P", "PA") else "L")
            im.load()
            arr = np.asarray(im)
        except Exception as exc:
            raise ImageError(
                400,
                "corrupt_image",
                f"{label}: cannot decode the pixel data, the file may be truncated "
                f"({type(exc).__name__}: {exc})",
            ) from None
    if arr.dtype in (np.int32, np.int64) and arr.ndim == 2:
        # PIL reads 16-bit grayscale PNG as mode "I" (int32); PNG cannot exceed 16 bits.
        if arr.min() < 0 or arr.max() > 65535:
            raise ImageError(422, "unsupported_dtype", f"{label}: pixel values outside 0..65535")
        arr = arr.astype(np.uint16)
    _check_dtype(arr.dtype, label, dtypes)
    _page_hw(arr.shape, label)
    return _to_gray_page(arr)[None]
