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
) -> str:
    """Write ``(Z, Y, X)`` ``data`` as a one-level OME-Zarr image (NGFF ``version``, 0.4 on
    Zarr v2 or 0.5 on Zarr v3) with axes in nanometres and the given storage chunks.

    Returns:
        The store's path as a string.
    """
    import zarr
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_image

    fmt, zarr_format = (FormatV04(), 2) if version == "0.4" else (FormatV05(), 3)
    group = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    write_image(
        data, group, axes="zyx", fmt=fmt, scale_factors=(),
        scale=dict(zip("zyx", voxel_size_nm, strict=True)),
        axes_units=dict.fromkeys("zyx", "nanometer"), storage_options={"chunks": chunks},
    )  # fmt: skip
    return str(path)
