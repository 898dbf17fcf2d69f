"""The canonical raw-data layout written by ``mitoseg data fetch``.

::

    DIR/dataset.json        provenance: source, mask kind, per-split shapes, licence
    DIR/train/images.tif    (Z, H, W) uint8|uint16 multi-page TIFF
    DIR/train/masks.tif     (Z, H, W) binary 0/255 or raw label values
    DIR/test/images.tif
    DIR/test/masks.tif      optional (unlabelled test data)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mitoseg.io import DataError, read_stack

__all__ = ["DATASET_FILE", "IMAGES", "MASKS", "SPLITS", "read_split", "split_info", "split_paths"]

SPLITS: tuple[str, ...] = ("train", "test")
IMAGES = "images.tif"
MASKS = "masks.tif"
DATASET_FILE = "dataset.json"


def split_paths(root: str | Path, split: str) -> tuple[Path, Path]:
    """Return ``(images_path, masks_path)`` of ``split`` under ``root``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    base = Path(root) / split
    return base / IMAGES, base / MASKS


def read_split(
    root: str | Path, split: str, *, require_masks: bool = True
) -> tuple[np.ndarray, np.ndarray | None]:
    """Read one split as ``(images (Z, H, W), masks (Z, H, W) | None)``.

    Raises:
        DataError: images missing, masks missing while required, or shapes differ.
    """
    img_path, mask_path = split_paths(root, split)
    images = read_stack(img_path)
    if not mask_path.exists():
        if require_masks:
            raise DataError(f"{mask_path}: mask stack not found for split {split!r}")
        return images, None
    masks = read_stack(mask_path)
    if masks.shape != images.shape:
        raise DataError(
            f"{mask_path}: mask stack shape {masks.shape} does not match image stack "
            f"{img_path} shape {images.shape}"
        )
    return images, masks


def split_info(folder: Path, images: np.ndarray, masks: np.ndarray | None) -> dict[str, Any]:
    """The ``dataset.json`` entry of a split written to ``folder``: ``n_slices, height,
    width, dtype, mask_dtype`` (None without masks) and the ``sha256`` of its files.

    Args:
        folder: the split's folder holding ``images.tif`` (and ``masks.tif``).
        images: ``(Z, Y, X)`` the images written.
        masks: ``(Z, Y, X)`` the masks written, or None.
    """
    from mitoseg.data.sources_remote import sha256_file

    sums = {IMAGES: sha256_file(folder / IMAGES)}
    if masks is not None:
        sums[MASKS] = sha256_file(folder / MASKS)
    z, h, w = images.shape
    return {
        "n_slices": int(z),
        "height": int(h),
        "width": int(w),
        "dtype": str(images.dtype),
        "mask_dtype": str(masks.dtype) if masks is not None else None,
        "sha256": sums,
    }
