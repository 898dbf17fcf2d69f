"""Test inputs for the volume path: OME-Zarr images written with ome-zarr-py's writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["write_ome_zarr"]


def write_ome_zarr(
    path: Path,
    data: np.ndarray,
    voxel_size_nm: tuple[float, float, float],
    chunks: tuple[int, int, int] = (3, 37, 41),
    version: str = "0.5",
    unit: str | None = "nanometer",
    levels: int = 1,
) -> str:
    """Write ``(Z, Y, X)`` ``data`` as an OME-Zarr image of ``levels`` levels (y, x halved;
    NGFF ``version``, 0.4 on Zarr v2 or 0.5 on Zarr v3) with ``voxel_size_nm`` as the
    scale, every axis in ``unit`` (None: no unit) and the given storage chunks.

    Returns:
        The store's path as a string.
    """
    import zarr
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_image

    fmt, zarr_format = (FormatV04(), 2) if version == "0.4" else (FormatV05(), 3)
    group = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    write_image(
        data, group, axes="zyx", fmt=fmt, scale_factors=(2,) * (levels - 1),
        scale=dict(zip("zyx", voxel_size_nm, strict=True)),
        axes_units=None if unit is None else dict.fromkeys("zyx", unit),
        storage_options={"chunks": chunks},
    )  # fmt: skip
    return str(path)
