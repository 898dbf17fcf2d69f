"""npe2 reader: mitoseg outputs as napari layers (no napari or Qt import).

TIFF (``.tif``/``.tiff``):

* uint32 / int32 / int64 stacks and files named ``*instances*`` / ``*labels*`` are
  instance labels -> one ``labels`` layer;
* uint8 stacks holding only ``0`` and one other value (``mitoseg predict`` masks, 0/255,
  or 0/1) or named ``*mask*`` -> a ``labels`` layer of class indexes (``255 -> 1``);
* anything else is an EM image -> an ``image`` layer.

OME-Zarr (a ``.zarr`` directory with NGFF 0.4 or 0.5 ``multiscales`` metadata, as the
volume path writes it): the image (every pyramid level, lazily) as an ``image`` layer and
each entry of its ``labels/`` group as a ``labels`` layer.

``suggestions.json`` (``mitoseg suggest``): the top tiles as a ``shapes`` layer
(:mod:`mitoseg.napari._suggestions`).

Every layer gets the voxel size in nm (``z, y, x``, or ``y, x``) as ``scale`` and ``nm``
as ``units``; ``metadata`` holds ``voxel_size_nm`` (None when the file has no
calibration: the scale is then 1) and the source path. TIFF calibration is read by
:func:`mitoseg.io.read_voxel_size`; OME-Zarr metadata by the volume path's NGFF reader
(:func:`mitoseg.volume.ngff_meta.read_multiscale`, through ome-zarr): an axis with a
scale but no unit keeps that scale (no ``units``; ``metadata["ngff_scale"]``), and an
unknown unit is an error naming the axis.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mitoseg.io import DataError
from mitoseg.napari._suggestions import SUGGESTIONS_FILE, read_suggestions

__all__ = ["get_reader", "read_ome_zarr", "read_tiff"]

#: A napari layer data tuple: ``(data, layer kwargs, layer type)``.
LayerData = tuple[Any, dict[str, Any], str]
ReaderFunction = Callable[[str | Sequence[str]], list[LayerData]]

_TIFF_SUFFIXES = (".tif", ".tiff")
_LABEL_WORDS = ("instance", "label")
_MASK_WORDS = ("mask",)


def _is_ome_zarr(path: Path) -> bool:
    return path.is_dir() and ((path / "zarr.json").is_file() or (path / ".zattrs").is_file())


def get_reader(path: str | Sequence[str]) -> ReaderFunction | None:
    """npe2 ``reader`` command: a reader function when ``path`` is a mitoseg output.

    Args:
        path: one path or a list of paths (all must be readable here).

    Returns:
        :func:`read_layers`, or None for files this plugin does not read.
    """
    paths = [path] if isinstance(path, str | Path) else list(path)
    if not paths:
        return None
    for p in map(Path, paths):
        if p.suffix.lower() in _TIFF_SUFFIXES or p.name == SUGGESTIONS_FILE:
            continue
        if _is_ome_zarr(p):
            continue
        return None
    return read_layers


def read_layers(path: str | Sequence[str]) -> list[LayerData]:
    """Read one or more mitoseg outputs (TIFF, OME-Zarr or ``suggestions.json``) into
    layer data tuples."""
    paths = [path] if isinstance(path, str | Path) else list(path)
    layers: list[LayerData] = []
    for p in map(Path, paths):
        if p.name == SUGGESTIONS_FILE:
            layers.extend(read_suggestions(p))
        elif p.suffix.lower() in _TIFF_SUFFIXES:
            layers.extend(read_tiff(p))
        else:
            layers.extend(read_ome_zarr(p))
    return layers


def _scale(voxel_size_nm: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    if voxel_size_nm is None:
        return (1.0,) * ndim
    return tuple(float(v) for v in voxel_size_nm)[-ndim:]


def _kwargs(
    name: str, voxel_size_nm: Sequence[float] | None, ndim: int, source: Path, **extra: Any
) -> dict[str, Any]:
    vs = None if voxel_size_nm is None else [float(v) for v in voxel_size_nm]
    kwargs: dict[str, Any] = {
        "name": name,
        "scale": _scale(vs, ndim),
        "metadata": {"voxel_size_nm": vs, "source": str(source)},
        **extra,
    }
    if vs is not None:
        kwargs["units"] = ("nm",) * ndim
    return kwargs


def _ngff_kwargs(
    name: str, sizes: Sizes | None, ndim: int, source: Path, **extra: Any
) -> dict[str, Any]:
    """:func:`_kwargs` for an OME-Zarr multiscale: nm when every spatial axis has a unit;
    else its scale as it is, without units, and ``metadata["ngff_scale"]``."""
    if sizes is None or None not in sizes[1]:
        return _kwargs(name, None if sizes is None else sizes[0], ndim, source, **extra)
    kwargs = _kwargs(name, None, ndim, source, **extra)
    kwargs["scale"] = tuple(float(v) for v in sizes[0])[-ndim:]
    kwargs["metadata"]["ngff_scale"] = {"scale": list(sizes[0]), "units": list(sizes[1])}
    return kwargs


def _tiff_kind(stem: str, arr: np.ndarray) -> str:
    """``labels`` (instances), ``mask`` (class indexes) or ``image``."""
    name = stem.lower()
    if arr.dtype in (np.uint32, np.int32, np.int64, np.uint64) or any(
        w in name for w in _LABEL_WORDS
    ):
        return "labels"
    if arr.dtype == np.uint8:
        if any(w in name for w in _MASK_WORDS):
            return "mask"
        values = np.unique(arr[:: max(1, arr.shape[0] // 8)] if arr.ndim == 3 else arr)
        if values.size <= 2 and int(values[0]) == 0 and arr.any():
            return "mask" if np.unique(arr).size <= 2 else "image"
    return "image"


def read_tiff(path: str | Path) -> list[LayerData]:
    """One TIFF written by mitoseg (image, mask or instance labels) as one layer.

    Returns:
        ``[(data, kwargs, "image" | "labels")]``: ``data`` ``(Z, H, W)`` (or ``(H, W)``);
        masks as uint8 class indexes (0/255 becomes 0/1), instance labels unchanged.

    Raises:
        DataError: unreadable file.
    """
    import tifffile

    from mitoseg.io import read_voxel_size

    p = Path(path)
    vs = read_voxel_size(p)  # checks the file first
    try:
        arr = tifffile.imread(p)
    except Exception as exc:  # tifffile raises many types for corrupt files
        raise DataError(f"{p}: cannot read the TIFF ({exc})") from None
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    kind = _tiff_kind(p.stem, arr)
    if kind == "image":
        return [(arr, _kwargs(p.stem, vs, arr.ndim, p), "image")]
    if kind == "mask":
        classes = (arr > 0).astype(np.uint8) if int(arr.max()) == 255 else arr
        return [(classes, _kwargs(p.stem, vs, arr.ndim, p, opacity=0.5), "labels")]
    return [(arr, _kwargs(p.stem, vs, arr.ndim, p, opacity=0.6), "labels")]


#: Level 0 size of the spatial axes and their units (``nanometer``, or None: no unit).
Sizes = tuple[list[float], list[str | None]]


def _multiscale(group_dir: Path, what: str) -> tuple[list[Any], Sizes | None, list[str]]:
    """Open the pyramid levels of an NGFF multiscale group lazily, its metadata read by
    :func:`mitoseg.volume.ngff_meta.read_multiscale` (the volume path's reader).

    Returns:
        ``(levels, size of the spatial axes of level 0 or None, axis names)``: nm where
        an axis has a unit, its scale as it is where it has none (reported).

    Raises:
        DataError: no ``multiscales`` metadata, invalid metadata, or an unknown unit.
    """
    import zarr

    from mitoseg.volume.ngff_meta import read_multiscale

    group = zarr.open_group(str(group_dir), mode="r")
    ms = read_multiscale(group, f"{group_dir}: {what}")
    if ms is None:
        raise DataError(f"{group_dir}: {what} has no OME-Zarr 'multiscales' metadata")
    levels = [group[path] for path in ms.paths]
    names = ms.names
    spatial = [i for i, a in enumerate(ms.axes) if a.get("type", "space") == "space"]
    sizes = ms.sizes(spatial)
    if len(spatial) != levels[0].ndim:
        import dask.array as da

        index = tuple(slice(None) if i in spatial else 0 for i in range(levels[0].ndim))
        levels = [da.from_zarr(level)[index] for level in levels]
        names = [names[i] for i in spatial]
    return levels, sizes, names


def read_ome_zarr(path: str | Path) -> list[LayerData]:
    """An OME-Zarr store: the image and each of its ``labels/`` as layers.

    Returns:
        ``[(levels, kwargs, "image"), (levels, kwargs, "labels"), ...]``: each ``data`` is
        the list of pyramid levels (a single array when there is one level).

    Raises:
        DataError: not an OME-Zarr image, or a label listed but missing.
    """
    p = Path(path)
    levels, voxel, _ = _multiscale(p, "image")
    ndim = levels[0].ndim
    name = p.name.removesuffix(".zarr").removesuffix(".ome")

    def data(lv: list[Any]) -> Any:
        return lv if len(lv) > 1 else lv[0]

    layers: list[LayerData] = [
        (data(levels), _ngff_kwargs(name, voxel, ndim, p, multiscale=len(levels) > 1), "image")
    ]
    labels_dir = p / "labels"
    names: list[Any] = []
    if labels_dir.is_dir():
        import zarr

        from mitoseg.volume.ngff_meta import ome_attrs

        names = ome_attrs(zarr.open_group(str(labels_dir), mode="r")).get("labels", [])
    for label in names:
        ldir = labels_dir / str(label)
        if not ldir.is_dir():
            raise DataError(f"{p}: labels/{label} is listed in labels/ but missing")
        lv, lvox, _ = _multiscale(ldir, f"labels/{label}")
        kwargs = _ngff_kwargs(
            str(label), lvox if lvox is not None else voxel, lv[0].ndim, ldir,
            multiscale=len(lv) > 1, opacity=0.6,
        )  # fmt: skip
        layers.append((data(lv), kwargs, "labels"))
    return layers
