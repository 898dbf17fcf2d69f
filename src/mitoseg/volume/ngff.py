"""The OME-Zarr output of a volume job (NGFF 0.5 on Zarr v3, or 0.4 on Zarr v2).

Layout of ``OUT.ome.zarr`` (every image a multiscale pyramid, halved in y and x per level
while both sides stay >= :data:`MIN_SIDE`; z is kept, EM sections being anisotropic)::

    OUT.ome.zarr/                 the input image (copied blockwise), levels 0 .. L-1
      labels/mask/                class index per voxel (uint8; binary: 0/1)
      labels/instances/           one uint32 id per mitochondrion (3D, stitched)
      probabilities/              optional (C, Z, Y, X) uint8 probabilities x 255
      objects.csv                 one row per instance (``inference.objects.OBJECT_COLUMNS``)
      mitoseg_done                (n_blocks, 2) int64 completion record (see below)

The root's ``mitoseg`` attribute says how it was made and whether the job completed:
``{"status": "running" | "complete", "job": {...}, "blocks": n, ...}``. Row ``b`` of
``mitoseg_done`` is written by the block's task only after all of that block's data:
``[local objects + 1, foreground voxels]``; ``0`` means not done. While running,
``mitoseg_local`` holds the per-block instance labels before stitching; it is removed when
the job completes. YX blocks of a plan with hysteresis first write each block's 2D regions
of the thresholded mask (``mitoseg_regions``, recorded in ``mitoseg_regions_done``), also
removed at completion.

Image pyramids are 2 x 2 means in y, x (with the matching half-pixel translation); label
pyramids take every second voxel (no translation), as label values must not be averaged.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mitoseg.io import DataError
from mitoseg.volume.ngff_meta import PhysicalScale, write_image_metadata, write_labels_metadata
from mitoseg.volume.store import is_s3, open_store

__all__ = [
    "DONE_ARRAY",
    "LOCAL_ARRAY",
    "MIN_SIDE",
    "NGFF_VERSIONS",
    "REGIONS_ARRAY",
    "REGIONS_DONE_ARRAY",
    "create_output",
    "downsample",
    "open_output",
    "output_status",
    "pyramid_shapes",
    "remove_store",
    "write_levels",
    "write_text",
    "yx_chunk",
    "yx_levels",
]

#: Completion record array at the root.
DONE_ARRAY = "mitoseg_done"
#: Per-block (unstitched) instance labels while the job runs.
LOCAL_ARRAY = "mitoseg_local"
#: YX blocks with hysteresis, while the job runs: each block's 2D regions of the
#: thresholded mask (``id << 1 | seeded``) and their completion record.
REGIONS_ARRAY, REGIONS_DONE_ARRAY = "mitoseg_regions", "mitoseg_regions_done"
#: Pyramid levels are added while both y and x of the next level stay at least this.
MIN_SIDE = 64
#: Maximum pyramid levels.
MAX_LEVELS = 8
#: Supported output NGFF versions and their Zarr format.
NGFF_VERSIONS = {"0.4": 2, "0.5": 3}
#: Chunk side in y and x of the output arrays.
YX_CHUNK = 256


def pyramid_shapes(shape: tuple[int, ...], max_levels: int = MAX_LEVELS) -> list[tuple[int, ...]]:
    """Shapes of the pyramid levels of a ``(..., Z, Y, X)`` array (y, x halved, ceil)."""
    shapes = [tuple(shape)]
    while len(shapes) < max_levels:
        *lead, y, x = shapes[-1]
        ny, nx = math.ceil(y / 2), math.ceil(x / 2)
        if min(ny, nx) < MIN_SIDE:
            break
        shapes.append((*lead, ny, nx))
    return shapes


def downsample(block: np.ndarray, label: bool) -> np.ndarray:
    """One pyramid step of a ``(..., Y, X)`` block: every 2nd voxel (labels) or 2 x 2 mean
    (images; odd edges repeat the last row / column), keeping the dtype."""
    if label:
        return np.ascontiguousarray(block[..., ::2, ::2])
    y, x = block.shape[-2:]
    padded = block
    if y % 2 or x % 2:
        pad = [(0, 0)] * (block.ndim - 2) + [(0, y % 2), (0, x % 2)]
        padded = np.pad(block, pad, mode="edge")
    quarters = (padded[..., 0::2, 0::2], padded[..., 1::2, 0::2],
                padded[..., 0::2, 1::2], padded[..., 1::2, 1::2])  # fmt: skip
    if np.issubdtype(block.dtype, np.integer):
        # integer sum of the four, rounded half to even as np.rint of the mean would be
        wide = np.int32 if block.dtype.itemsize <= 2 else np.int64
        total = sum(q.astype(wide) for q in quarters)
        q, r = total >> 2, total & 3  # total = 4 q + r, r in 0 .. 3 (also when negative)
        return (q + (r > 2) + ((r == 2) & ((q & 1) == 1))).astype(block.dtype)
    mean = 0.25 * sum(q.astype(np.float64) for q in quarters)
    return mean.astype(block.dtype)


def yx_levels(block_yx: int | None) -> int:
    """Most pyramid levels for blocks of ``block_yx`` pixels in y and x: a block must
    start on an even pixel of every level but the last, so ``block_yx`` must be divisible
    by ``2 ** (levels - 1)`` (:data:`MAX_LEVELS` for whole slices)."""
    if block_yx is None:
        return MAX_LEVELS
    twos = (block_yx & -block_yx).bit_length() - 1
    return min(MAX_LEVELS, twos + 1)


def yx_chunk(block_yx: int | None, level: int) -> int:
    """Output chunk side in y and x at a pyramid level: :data:`YX_CHUNK` for whole
    slices; with YX blocks, the largest divisor of the level's block side that is at
    most :data:`YX_CHUNK`, so two blocks never write the same chunk."""
    if block_yx is None:
        return YX_CHUNK
    side = block_yx >> level
    return next(d for d in range(min(YX_CHUNK, side), 0, -1) if side % d == 0)


def _create_pyramid(
    group: Any,
    shape: tuple[int, ...],
    dtype: Any,
    chunk_z: int,
    zarr_format: int,
    block_yx: int | None = None,
) -> list[tuple[int, ...]]:
    shapes = pyramid_shapes(shape, yx_levels(block_yx))
    for level, s in enumerate(shapes):
        c = yx_chunk(block_yx, level)
        chunks = (*([1] * (len(s) - 3)), min(chunk_z, s[-3]), min(c, s[-2]), min(c, s[-1]))
        kwargs: dict[str, Any] = {}
        if zarr_format == 2:
            kwargs["chunk_key_encoding"] = {"name": "v2", "separator": "/"}
        else:
            kwargs["dimension_names"] = (["c"] if len(s) == 4 else []) + ["z", "y", "x"]
        group.create_array(str(level), shape=s, chunks=chunks, dtype=dtype, fill_value=0, **kwargs)
    return shapes


def create_output(
    uri: str,
    *,
    shape: tuple[int, int, int],
    dtype: Any,
    voxel_size_nm: tuple[float, float, float] | None = None,
    block_z: int,
    n_blocks: int,
    ngff: str = "0.5",
    instances: bool = True,
    probability_channels: int = 0,
    job: dict[str, Any] | None = None,
    block_yx: int | None = None,
    regions: bool = False,
    scale: PhysicalScale | None = None,
) -> Any:
    """Create an empty output store (see the module docstring) and return its root group.

    Args:
        uri: the output location (path or ``s3://``); must not exist.
        shape: ``(Z, Y, X)`` of the input.
        dtype: dtype of the input image.
        voxel_size_nm: ``(z, y, x)`` nm, or None (scale 1, no unit; or ``scale``).
        block_z: slices per block, also the chunk depth of every array (blocks never
            share a chunk, so concurrent block writes are safe).
        n_blocks: number of blocks (rows of the completion record).
        ngff: ``0.5`` (Zarr v3) or ``0.4`` (Zarr v2).
        instances: create ``labels/instances`` (and the per-block local labels).
        probability_channels: ``C > 0`` creates ``probabilities`` ``(C, Z, Y, X)`` uint8.
        job: the job description stored in the ``mitoseg`` attribute.
        block_yx: YX side of a block (None: whole slices); sets the chunk sides and
            limits the pyramid levels (:func:`yx_levels`, :func:`yx_chunk`).
        regions: create :data:`REGIONS_ARRAY` and :data:`REGIONS_DONE_ARRAY` (YX blocks
            of a plan with hysteresis).
        scale: the input's physical scale instead of ``voxel_size_nm`` (an axis without
            a unit is written with its scale and no unit).

    Raises:
        ValueError: an unknown NGFF version, or both ``voxel_size_nm`` and ``scale``.
    """
    import zarr

    if ngff not in NGFF_VERSIONS:
        raise ValueError(f"ngff version must be one of {sorted(NGFF_VERSIONS)}, got {ngff!r}")
    if scale is not None and voxel_size_nm is not None:
        raise ValueError("give voxel_size_nm or scale, not both")
    if scale is None and voxel_size_nm is not None:
        scale = PhysicalScale.from_voxel_size_nm(voxel_size_nm)
    fmt = NGFF_VERSIONS[ngff]
    root = zarr.open_group(store=open_store(uri, read_only=False), mode="w", zarr_format=fmt)
    meta = {"scale": scale, "ngff": ngff}
    shapes = _create_pyramid(root, shape, dtype, block_z, fmt, block_yx)
    write_image_metadata(root, name="image", levels=len(shapes), label=False, channels=False,
                         **meta)  # fmt: skip
    labels = root.create_group("labels")
    for name, dt in (("mask", "uint8"), ("instances", "uint32")):
        if name == "instances" and not instances:
            continue
        g = labels.create_group(name)
        lshapes = _create_pyramid(g, shape, dt, block_z, fmt, block_yx)
        write_image_metadata(g, name=name, levels=len(lshapes), label=True, channels=False,
                             **meta)  # fmt: skip
        write_labels_metadata(labels, name, ngff)
    if probability_channels:
        g = root.create_group("probabilities")
        pshapes = _create_pyramid(
            g, (probability_channels, *shape), "uint8", block_z, fmt, block_yx
        )
        write_image_metadata(g, name="probabilities", levels=len(pshapes), label=False,
                             channels=True, **meta)  # fmt: skip
    extra: dict[str, Any] = {}
    if fmt == 2:
        extra["chunk_key_encoding"] = {"name": "v2", "separator": "/"}
    root.create_array(
        DONE_ARRAY, shape=(n_blocks, 2), chunks=(1, 2), dtype="int64", fill_value=0,
        compressors=None, **extra,
    )  # fmt: skip
    c = yx_chunk(block_yx, 0)
    chunks = (block_z, min(c, shape[1]), min(c, shape[2]))
    for name, wanted in ((LOCAL_ARRAY, instances), (REGIONS_ARRAY, regions)):
        if wanted:
            root.create_array(
                name, shape=shape, chunks=chunks, dtype="uint32", fill_value=0, **extra
            )
    if regions:
        root.create_array(
            REGIONS_DONE_ARRAY, shape=(n_blocks, 1), chunks=(1, 1), dtype="int64",
            fill_value=0, compressors=None, **extra,
        )  # fmt: skip
    root.attrs.update({"mitoseg": {"status": "running", **(job or {})}})
    return root


def open_output(uri: str) -> Any:
    """The root group of an existing output, writable."""
    import zarr

    return zarr.open_group(store=open_store(uri, read_only=False), mode="r+")


def output_status(uri: str) -> dict[str, Any] | None:
    """The ``mitoseg`` attribute of an existing output; None when ``uri`` does not exist.

    Raises:
        FileExistsError: ``uri`` exists but is not an output of a volume job.
    """
    import zarr

    if not is_s3(uri):
        from pathlib import Path

        if not Path(uri).exists():
            return None
    try:
        root = zarr.open_group(store=open_store(uri, read_only=True), mode="r")
    except (FileNotFoundError, DataError):
        return None
    except Exception as exc:
        raise FileExistsError(
            f"{uri}: exists and is not a mitoseg volume output ({type(exc).__name__}); "
            "use --force to replace it"
        ) from None
    info = dict(root.attrs).get("mitoseg")
    if not isinstance(info, dict):
        raise FileExistsError(
            f"{uri}: exists and is not a mitoseg volume output; use --force to replace it"
        )
    return info


def remove_store(uri: str) -> None:
    """Delete a store (folder or ``s3://`` prefix) if it exists."""
    if is_s3(uri):
        import s3fs

        from mitoseg.volume.store import s3_storage_options

        fs = s3fs.S3FileSystem(**s3_storage_options())
        if fs.exists(uri):
            fs.rm(uri, recursive=True)
        return
    import shutil
    from pathlib import Path

    p = Path(uri)
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()


def write_levels(
    group: Any, block: np.ndarray, z0: int, label: bool, y0: int = 0, x0: int = 0
) -> None:
    """Write a ``(..., z, y, x)`` block at ``(z0, y0, x0)`` into every pyramid level of a
    multiscale group (arrays ``0 .. L-1``); ``y0`` and ``x0`` are divisible by
    ``2 ** (L - 1)`` (:func:`yx_levels`)."""
    level = 0
    data = block
    while str(level) in group:
        arr = group[str(level)]
        ly, lx = y0 >> level, x0 >> level
        index = (
            *([slice(None)] * (data.ndim - 3)),
            slice(z0, z0 + data.shape[-3]),
            slice(ly, ly + data.shape[-2]),
            slice(lx, lx + data.shape[-1]),
        )
        arr[index] = data
        level += 1
        data = downsample(data, label)


def write_text(uri: str, name: str, text: str) -> str:
    """Write a small text file inside a store (atomically for a local folder).

    Returns:
        The file's path or URI.
    """
    target = f"{uri.rstrip('/')}/{name}"
    if is_s3(uri):
        import s3fs

        from mitoseg.volume.store import s3_storage_options

        fs = s3fs.S3FileSystem(**s3_storage_options())
        with fs.open(target, "w") as fh:
            fh.write(text)
        return target
    from mitoseg.io import atomic_path

    with atomic_path(target) as tmp:
        tmp.write_text(text)
    return target
