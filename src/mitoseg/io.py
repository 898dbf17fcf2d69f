"""Image I/O and atomic writes shared by every stage.

All writers go through a temporary file/directory next to the target and an
``os.replace`` at the end, so an interrupted or failed write never leaves a
half-written output and never destroys the previous one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from mitoseg.checks import check_array
from mitoseg.errors import DataError

if TYPE_CHECKING:
    from pydantic import BaseModel

M = TypeVar("M", bound="BaseModel")

__all__ = [
    "DataError",
    "atomic_dir",
    "atomic_path",
    "check_voxel_size",
    "read_image",
    "read_json_model",
    "read_json_object",
    "read_mapping",
    "read_stack",
    "read_voxel_size",
    "write_json",
    "write_stack",
]

#: File suffixes read as single 2D images or TIFF stacks.
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


@contextlib.contextmanager
def atomic_path(target: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; move it over ``target`` on success.

    On an exception the temporary file is removed and ``target`` is left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=target.parent, prefix=f".{target.name}.", suffix=suffix or target.suffix + ".tmp"
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.is_file():
            os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``target``; swap it in on success.

    The previous ``target`` (if any) is only removed after the new one is complete.
    On an exception the temporary directory is deleted and ``target`` is unchanged.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    """Current process umask (read without changing it for longer than a call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_mapping(
    path: str | Path,
    what: str,
    *,
    fmt: str = "json",
    expected: str = "a JSON object",
    empty_ok: bool = False,
    error: type[Exception] = DataError,
) -> dict[str, Any]:
    """Read a JSON or YAML file that must hold a mapping (stage files, params, manifests).

    Args:
        path: the file.
        what: what the file is, for messages (e.g. ``"train info"``).
        fmt: ``"json"`` or ``"yaml"``.
        expected: what the top level must be, for the message.
        empty_ok: an empty YAML file is an empty mapping (else it is not a mapping).
        error: the exception raised (``DataError``; the config module passes its own).

    Raises:
        error: ``<path>: <what> not found``, ``<path>: not valid JSON|YAML: <reason>`` or
            ``<path>: expected <expected>``.
    """
    p = Path(path)
    if not p.is_file():
        raise error(f"{p}: {what} not found")
    text = p.read_text()
    if fmt == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise error(f"{p}: not valid JSON: {exc}") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise error(f"{p}: not valid YAML: {exc}") from None
        if data is None and empty_ok:
            data = {}
    if not isinstance(data, dict):
        raise error(f"{p}: expected {expected}")
    return data


def read_json_object(path: str | Path, what: str) -> dict[str, Any]:
    """Read a JSON file that must hold an object (:func:`read_mapping`).

    Raises:
        DataError: missing file, invalid JSON, or not an object (names the file).
    """
    return read_mapping(path, what)


def read_json_model(path: str | Path, model: type[M], what: str) -> M:
    """Read a JSON object file into a pydantic model.

    Args:
        path: the file.
        model: the pydantic model class.
        what: what the file is, for messages (e.g. ``"stability results"``).

    Raises:
        DataError: missing, not JSON, not an object (:func:`read_json_object`), or not a
            valid ``model``: ``<path>: invalid <what> at <field>: <reason>`` (the first error).
    """
    from pydantic import ValidationError

    data = read_json_object(path, what)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise DataError(f"{path}: invalid {what} at {field}: {first['msg']}") from None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_stack(path: str | Path) -> np.ndarray:
    """Read a TIFF stack or a single 2D image as ``(Z, H, W)``.

    The decoder is :func:`mitoseg.decode.decode_image`, the one the service runs on
    uploads: the same bytes give the same array and the same error (without the
    service's policy: no size limits, any numeric dtype, NaN / inf kept for validation).

    Args:
        path: a (multi-page) TIFF, PNG or JPEG file, recognised by its first bytes.

    Returns:
        ``(Z, H, W)`` array in the file's dtype (uint8 or uint16 typically). RGB(A)
        pages are converted to grayscale (ITU-R 601 luma), keeping the dtype; a
        separate-plane ``(S, H, W)`` page gives ``S`` slices.

    Raises:
        DataError: missing file; :class:`mitoseg.decode.ImageError` (a DataError, with
            the decoder's ``code``) naming the file for an unreadable, truncated or
            unsupported image.
    """
    from mitoseg.decode import FILE_FORMATS, ImageError, Limits, decode_image

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    try:
        return decode_image(p, Limits.unlimited(), dtypes=None, formats=FILE_FORMATS, finite=False)
    except ImageError as exc:
        raise ImageError(exc.status, exc.code, f"{p}: {exc.message}") from None


def read_image(path: str | Path) -> np.ndarray:
    """Read a single 2D image ``(H, W)``; a one-page TIFF stack is accepted."""
    stack = read_stack(path)
    if stack.shape[0] != 1:
        raise DataError(f"{path}: expected one 2D image, found a stack of {stack.shape[0]} pages")
    return stack[0]


#: Length of one unit in nm, for TIFF / ImageJ / OME units (lower case).
_UNIT_NM: dict[str, float] = {
    "nm": 1.0,
    "nanometer": 1.0,
    "um": 1e3,
    "\u00b5m": 1e3,
    "\u03bcm": 1e3,
    "micron": 1e3,
    "micrometer": 1e3,
    "mm": 1e6,
    "millimeter": 1e6,
    "cm": 1e7,
    "centimeter": 1e7,
    "m": 1e9,
    "meter": 1e9,
    "angstrom": 0.1,
}

#: dtypes the ImageJ hyperstack format holds (others get plain TIFF resolution tags).
_IMAGEJ_DTYPES = (np.uint8, np.uint16, np.float32)


def check_voxel_size(voxel_size_nm: Any, where: str = "voxel size") -> tuple[float, float, float]:
    """Validate a ``(z, y, x)`` voxel size in nm.

    Raises:
        ValueError: not three finite positive numbers (the message names ``where``).
    """
    try:
        vs = tuple(float(v) for v in voxel_size_nm)
    except (TypeError, ValueError):
        vs = ()
    if len(vs) != 3 or not all(np.isfinite(v) and v > 0 for v in vs):
        raise ValueError(f"{where}: expected 3 positive numbers Z,Y,X in nm, got {voxel_size_nm!r}")
    return vs  # type: ignore[return-value]


def write_stack(path: str | Path, stack: np.ndarray, voxel_size_nm: Any | None = None) -> None:
    """Write ``(Z, H, W)`` (or ``(H, W)``) as a zlib-compressed multi-page TIFF, atomically.

    Args:
        path: target ``.tif``.
        stack: ``(Z, H, W)`` or ``(H, W)`` array.
        voxel_size_nm: ``(z, y, x)`` nm per voxel, or None. uint8 / uint16 / float32 stacks
            are then written as ImageJ hyperstacks (XResolution / YResolution in pixels
            per micron, ``unit=um`` and ``spacing`` in the description, so Fiji shows the
            physical size); other dtypes (e.g. uint32 labels, which ImageJ files cannot
            hold) get XResolution / YResolution in pixels per centimetre with
            ResolutionUnit CENTIMETER and ``voxel_size_nm`` in tifffile's JSON
            description. :func:`read_voxel_size` reads both back.

    Raises:
        ValueError: wrong rank or a bad voxel size.
    """
    import tifffile

    arr = check_array(stack, "write_stack", ndim=(2, 3))
    kwargs: dict[str, Any] = {}
    if voxel_size_nm is not None:
        z, y, x = check_voxel_size(voxel_size_nm, f"write_stack {path}")
        axes = "ZYX" if arr.ndim == 3 else "YX"
        if arr.dtype in _IMAGEJ_DTYPES:
            kwargs = {
                "imagej": True,
                "resolution": (1e3 / x, 1e3 / y),
                "metadata": {"spacing": z / 1e3, "unit": "um", "axes": axes},
            }
        else:
            kwargs = {
                "resolution": (1e7 / x, 1e7 / y),
                "resolutionunit": "CENTIMETER",
                "metadata": {"axes": axes, "voxel_size_nm": [z, y, x]},
            }
    with atomic_path(path, suffix=".tif") as tmp:
        tifffile.imwrite(tmp, arr, compression="zlib", photometric="minisblack", **kwargs)


def _tag_pixel_size(page: Any, scale_nm: float) -> tuple[float, float] | None:
    """``(y, x)`` pixel size in nm from X/YResolution (pixels per unit of ``scale_nm``)."""
    sizes = []
    for name in ("YResolution", "XResolution"):
        tag = page.tags.get(name)
        if tag is None:
            return None
        num, den = tag.value if isinstance(tag.value, tuple) else (tag.value, 1)
        if not num or not den:
            return None
        sizes.append(scale_nm * float(den) / float(num))
    return sizes[0], sizes[1]


def read_voxel_size(path: str | Path) -> tuple[float, float, float] | None:
    """The ``(z, y, x)`` voxel size in nm stored in a TIFF, or None when it has none.

    Read, in this order: ``voxel_size_nm`` in tifffile's JSON description (written by
    :func:`write_stack`); ImageJ metadata (``unit``, ``spacing``; X/YResolution in pixels
    per unit; ImageJ's default spacing 1 unit when absent); plain X/YResolution with
    ResolutionUnit CENTIMETER (or tifffile's MILLIMETER / MICROMETER) for a single
    page (z set to the x size). Inch units (scanner dpi) and unitless files say nothing
    about the specimen and give None, as do non-TIFF files.

    Raises:
        DataError: missing or unreadable file.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    if p.suffix.lower() not in (".tif", ".tiff"):
        return None
    import tifffile

    try:
        with tifffile.TiffFile(p) as tif:
            for meta in tif.shaped_metadata or ():
                if isinstance(meta, dict) and "voxel_size_nm" in meta:
                    return check_voxel_size(meta["voxel_size_nm"], f"{p} voxel_size_nm")
            page = tif.pages.first
            ij = tif.imagej_metadata
            if ij is not None:
                unit = str(ij.get("unit", "")).replace("\\u00B5", "\u00b5").strip().lower()
                scale = _UNIT_NM.get(unit)
                yx = _tag_pixel_size(page, scale) if scale is not None else None
                if yx is None:
                    return None
                z = float(ij.get("spacing", 1.0)) * scale
                return check_voxel_size((z, *yx), f"{p} ImageJ calibration")
            unit_code = (
                int(page.tags["ResolutionUnit"].value) if "ResolutionUnit" in page.tags else 0
            )
            scale = {3: 1e7, 4: 1e6, 5: 1e3}.get(unit_code)
            if scale is None or len(tif.pages) != 1:
                return None
            yx = _tag_pixel_size(page, scale)
            return None if yx is None else check_voxel_size((yx[1], *yx), f"{p} resolution")
    except DataError:
        raise
    except ValueError as exc:
        raise DataError(str(exc)) from None
    except Exception as exc:  # tifffile raises many types for corrupt files
        raise DataError(f"{p}: cannot read TIFF metadata ({type(exc).__name__}: {exc})") from None
