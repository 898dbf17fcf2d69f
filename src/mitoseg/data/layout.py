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

import numpy as np

from mitoseg.io import DataError, read_stack

__all__ = ["DATASET_FILE", "IMAGES", "MASKS", "SPLITS", "read_split", "split_paths"]

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
