"""Lazy chunked volume input: OME-Zarr (NGFF 0.4 / 0.5), plain Zarr arrays, TIFF stacks.

:func:`open_volume` returns a :class:`Volume` that reads slabs of slices on demand
(:meth:`Volume.read`); nothing is loaded at open. Locations are local paths or ``s3://``
URIs (fsspec / s3fs); the S3 endpoint comes from ``AWS_ENDPOINT_URL_S3`` or
``AWS_ENDPOINT_URL`` and the credentials from the usual AWS variables
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
``AWS_DEFAULT_REGION`` / ``AWS_REGION``), as for the DVC remote.

The voxel size (nm, ``z, y, x``) is read from the OME-Zarr metadata by the one NGFF reader
(:func:`mitoseg.volume.ngff_meta.read_multiscale`: an axis with a scale but no unit keeps
its scale in :attr:`Volume.scale` and is reported) or the TIFF / ImageJ calibration
(:func:`mitoseg.io.read_voxel_size`); an explicit value wins.

TIFF stacks are read through tifffile's Zarr store (no full read). zarr 3.0.x is used
because zarr >= 3.1 needs numpy 2 and patchify pins numpy < 2; tifffile's store lacks
two methods zarr 3.0's ``Store`` declares abstract, added by :class:`_TiffStore`.

This module imports zarr / tifffile only inside functions (``mitoseg --help`` stays fast).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mitoseg.io import DataError, check_voxel_size
from mitoseg.volume.ngff_meta import PhysicalScale, read_multiscale

__all__ = [
    "Volume",
    "is_s3",
    "is_volume_uri",
    "open_store",
    "open_volume",
    "s3_storage_options",
]

_TIFF_SUFFIXES = (".tif", ".tiff")


def is_s3(uri: str) -> bool:
    """True for an ``s3://`` URI."""
    return uri.startswith("s3://")


def is_volume_uri(uri: str) -> bool:
    """True when ``uri`` names a Zarr / OME-Zarr store (blockwise path of ``predict``).

    ``s3://`` URIs, names ending in ``.zarr`` and local folders holding ``zarr.json``,
    ``.zgroup`` or ``.zarray`` are stores; anything else is a file.
    """
    text = uri.rstrip("/")
    if is_s3(text) or text.endswith(".zarr"):
        return True
    p = Path(text)
    return p.is_dir() and any((p / n).is_file() for n in ("zarr.json", ".zgroup", ".zarray"))


def s3_storage_options() -> dict[str, Any]:
    """fsspec / s3fs options from the environment (endpoint; credentials via botocore)."""
    opts: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_url"] = endpoint
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        opts["key"], opts["secret"] = key, secret
        if os.environ.get("AWS_SESSION_TOKEN"):
            opts["token"] = os.environ["AWS_SESSION_TOKEN"]
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        opts["client_kwargs"] = {"region_name": region}
    return opts


def open_store(uri: str, read_only: bool = True) -> Any:
    """A zarr store for a local folder or an ``s3://`` URI.

    Raises:
        DataError: a local store to read that does not exist.
    """
    from zarr.storage import FsspecStore, LocalStore

    uri = uri.rstrip("/")
    if is_s3(uri):
        return FsspecStore.from_url(uri, storage_options=s3_storage_options(), read_only=read_only)
    if read_only and not Path(uri).exists():
        raise DataError(f"{uri}: not found")
    return LocalStore(uri, read_only=read_only)


@dataclass
class Volume:
    """A lazily read ``(Z, Y, X)`` volume.

    Attributes:
        uri: where it lives (path or ``s3://`` URI).
        kind: ``ome-zarr``, ``zarr`` or ``tiff``.
        shape: ``(Z, Y, X)``.
        dtype: voxel dtype.
        chunks: storage chunk shape ``(z, y, x)``.
        voxel_size_nm: ``(z, y, x)`` nm, or None when unknown.
        ngff_version: ``0.4`` / ``0.5`` for OME-Zarr, else None.
        scale: the physical scale (nm; an OME-Zarr axis without a unit keeps its scale
            as it is, and ``voxel_size_nm`` is then None), or None when unknown.
    """

    uri: str
    kind: str
    shape: tuple[int, int, int]
    dtype: np.dtype
    chunks: tuple[int, int, int]
    voxel_size_nm: tuple[float, float, float] | None
    ngff_version: str | None = None
    scale: PhysicalScale | None = None
    _array: Any = field(default=None, repr=False)
    _lead: tuple[int, ...] = field(default=(), repr=False)
    _close: Any = field(default=None, repr=False)

    def read(self, z0: int, z1: int) -> np.ndarray:
        """Slices ``z0 .. z1 - 1`` as a ``(z1 - z0, Y, X)`` array.

        Raises:
            ValueError: an empty or out-of-range slab.
            DataError: a chunk that cannot be read or decoded (names the volume).
        """
        if not 0 <= z0 < z1 <= self.shape[0]:
            raise ValueError(f"{self.uri}: slices {z0}..{z1} outside 0..{self.shape[0]}")
        try:
            return np.asarray(self._array[(*self._lead, slice(z0, z1))])
        except Exception as exc:  # zarr / codecs / fsspec raise many types
            raise DataError(
                f"{self.uri}: cannot read slices {z0}..{z1 - 1} ({type(exc).__name__}: {exc})"
            ) from None

    def read_region(self, z0: int, z1: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Voxels ``z0 .. z1-1, y0 .. y1-1, x0 .. x1-1`` as a ``(z, y, x)`` array.

        Raises:
            ValueError: an empty or out-of-range region.
            DataError: a chunk that cannot be read or decoded (names the volume).
        """
        _, h, w = self.shape
        if not (0 <= z0 < z1 <= self.shape[0] and 0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w):
            raise ValueError(
                f"{self.uri}: region {z0}..{z1}, {y0}..{y1}, {x0}..{x1} outside {self.shape}"
            )
        try:
            return np.asarray(
                self._array[(*self._lead, slice(z0, z1), slice(y0, y1), slice(x0, x1))]
            )
        except Exception as exc:  # zarr / codecs / fsspec raise many types
            raise DataError(
                f"{self.uri}: cannot read slices {z0}..{z1 - 1}, rows {y0}..{y1 - 1}, columns "
                f"{x0}..{x1 - 1} ({type(exc).__name__}: {exc})"
            ) from None

    def close(self) -> None:
        """Release an open TIFF file (no-op for Zarr)."""
        if self._close is not None:
            self._close()
            self._close = None


def _tiff_store_class() -> type:
    from tifffile.zarr import ZarrTiffStore

    class _TiffStore(ZarrTiffStore):  # type: ignore[misc, valid-type]
        supports_partial_writes = False

        async def set_partial_values(self, key_start_values: Any) -> None:
            # zarr 3.0 declares this abstract; the TIFF is only ever opened for reading
            raise PermissionError("a TIFF stack is opened read-only; it cannot be written")

    return _TiffStore


def _open_tiff(path: str, voxel_size: tuple[float, float, float] | None) -> Volume:
    import tifffile
    import zarr

    from mitoseg.io import read_voxel_size

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    try:
        tif = tifffile.TiffFile(p)
    except Exception as exc:  # tifffile raises many types for corrupt files
        raise DataError(f"{p}: cannot read TIFF ({type(exc).__name__}: {exc})") from None
    try:
        series = tif.series[0]
        arr = zarr.open(_tiff_store_class()(series, level=0), mode="r")
        vs = voxel_size if voxel_size is not None else read_voxel_size(p)
    except DataError:
        tif.close()
        raise
    except Exception as exc:
        tif.close()
        raise DataError(f"{p}: cannot open TIFF lazily ({type(exc).__name__}: {exc})") from None
    scale = None if vs is None else PhysicalScale.from_voxel_size_nm(vs)
    return _as_volume(str(p), "tiff", arr, scale, None, tif.close)


def _as_volume(
    uri: str,
    kind: str,
    arr: Any,
    scale: PhysicalScale | None,
    ngff: str | None,
    close: Any = None,
) -> Volume:
    shape = tuple(int(s) for s in arr.shape)
    if len(shape) == 2:
        raise DataError(f"{uri}: expected a 3D (Z, Y, X) volume, got a 2D array {shape}")
    lead = shape[:-3]
    if len(shape) < 3 or any(s != 1 for s in lead):
        raise DataError(f"{uri}: expected a 3D (Z, Y, X) volume, got shape {shape}")
    if 0 in shape:
        raise DataError(f"{uri}: volume is empty (shape {shape})")
    dtype = np.dtype(arr.dtype)
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise DataError(f"{uri}: expected integer or float voxels, got {dtype}")
    chunks = tuple(int(c) for c in arr.chunks)[-3:]
    return Volume(
        uri=uri,
        kind=kind,
        shape=shape[-3:],  # type: ignore[arg-type]
        dtype=dtype,
        chunks=chunks,  # type: ignore[arg-type]
        voxel_size_nm=None if scale is None else scale.voxel_size_nm,
        ngff_version=ngff,
        scale=scale,
        _array=arr,
        _lead=(0,) * len(lead),
        _close=close,
    )


def open_volume(uri: str, voxel_size_nm: Any | None = None) -> Volume:
    """Open a volume lazily.

    Args:
        uri: OME-Zarr / Zarr store (path or ``s3://``) or a TIFF stack (path).
        voxel_size_nm: ``(z, y, x)`` nm overriding the metadata, or None.

    Returns:
        :class:`Volume` (first resolution level for OME-Zarr).

    Raises:
        DataError: not found, not a store, a group that is no OME-Zarr image, a missing
            array, not 3D (leading singleton axes such as ``t`` or ``c`` are accepted),
            or non-numeric voxels; the message names the location.
    """
    import zarr

    vs = None if voxel_size_nm is None else check_voxel_size(voxel_size_nm, f"{uri} voxel size")
    text = uri.rstrip("/")
    if not is_s3(text) and Path(text).suffix.lower() in _TIFF_SUFFIXES:
        return _open_tiff(text, vs)
    if not is_s3(text) and Path(text).is_file():
        raise DataError(f"{text}: not a Zarr store or TIFF stack")
    store = open_store(text, read_only=True)
    try:
        node = zarr.open(store=store, mode="r")
    except FileNotFoundError:
        raise DataError(f"{text}: not a Zarr store (no zarr.json / .zgroup / .zarray)") from None
    except Exception as exc:  # zarr raises many types for broken metadata
        raise DataError(f"{text}: cannot open Zarr store ({type(exc).__name__}: {exc})") from None
    if isinstance(node, zarr.Array):
        scale = None if vs is None else PhysicalScale.from_voxel_size_nm(vs)
        return _as_volume(text, "zarr", node, scale, None)
    ms = read_multiscale(node, text)
    if ms is None:
        arrays = sorted(node.array_keys())
        raise DataError(
            f"{text}: a Zarr group without OME-Zarr multiscales metadata; open one of its "
            f"arrays instead ({', '.join(f'{text}/{a}' for a in arrays) or 'it has none'})"
        )
    path = ms.paths[0]
    try:
        arr = node[path]
    except KeyError:
        raise DataError(f"{text}: OME-Zarr dataset {path!r} is missing") from None
    if [n for n in ms.names if n in ("z", "y", "x")] != ["z", "y", "x"]:
        raise DataError(f"{text}: expected axes z, y, x in the OME-Zarr multiscale, got {ms.names}")
    scale = PhysicalScale.from_voxel_size_nm(vs) if vs is not None else ms.physical()
    return _as_volume(text, "ome-zarr", arr, scale, ms.version)
