"""Object statistics and mask value mapping returned by the service (pure numpy/scipy)."""

from __future__ import annotations

from typing import Any

import numpy as np

from mitoseg.metrics import label_objects

__all__ = ["class_values", "foreground_index", "mask_stats", "to_mask_values"]


def class_values(classes: dict[str, int | list[int]]) -> list[int]:
    """Raw mask value written for each class index (the first value of each class).

    Args:
        classes: the ``base.classes`` table, name -> value(s), background first.

    Returns:
        ``[value of class 0, value of class 1, ...]``, e.g. ``[0, 255]`` for binary.
    """
    return [int(v[0] if isinstance(v, list) else v) for v in classes.values()]


def foreground_index(class_names: list[str]) -> int:
    """Class index counted as mitochondria: the class named ``mitochondria`` (any case),
    else class 1."""
    for i, name in enumerate(class_names):
        if name.lower() in ("mitochondria", "mitochondrion", "mito"):
            return i
    return 1


def to_mask_values(class_mask: np.ndarray, values: list[int]) -> np.ndarray:
    """Map a class-index mask to the dataset's raw mask values.

    Args:
        class_mask: ``(...)`` uint8 class indices ``0 .. C-1``.
        values: raw value of each class index (see :func:`class_values`).

    Returns:
        Same shape, uint8 when every value fits in 8 bits, else uint16.

    Raises:
        ValueError: a class index has no value.
    """
    lut_dtype = np.uint8 if max(values) <= 255 else np.uint16
    top = int(class_mask.max()) if class_mask.size else 0
    if top >= len(values):
        raise ValueError(f"to_mask_values: class index {top} has no mask value ({values})")
    lut = np.asarray(values, dtype=lut_dtype)
    return lut[class_mask]


def mask_stats(
    class_mask: np.ndarray, foreground: int = 1, min_object_size: int = 0
) -> dict[str, Any]:
    """Count and measure the objects of one class in a 2D mask.

    Objects are 8-connected components (:func:`mitoseg.metrics.label_objects`);
    components smaller than ``min_object_size`` pixels are not counted.

    Args:
        class_mask: ``(H, W)`` uint8 class indices.
        foreground: class index to measure.
        min_object_size: smallest counted object, pixels.

    Returns:
        ``{"height", "width", "count", "area_fraction", "foreground_pixels",
        "objects": [{"id", "area", "centroid": [y, x], "bbox": [y0, x0, y1, x1]}]}``;
        ``area_fraction`` is the fraction of the image covered by the foreground class
        (all of it, small objects included); centroids are in pixel coordinates.

    Raises:
        ValueError: not a 2D mask.
    """
    if class_mask.ndim != 2:
        raise ValueError(f"mask_stats: expected an (H, W) mask, got shape {class_mask.shape}")
    fg = class_mask == foreground
    h, w = fg.shape
    labels, n = label_objects(fg.astype(np.uint8), min_object_size)
    objects: list[dict[str, Any]] = []
    if n:
        idx = labels.ravel()
        areas = np.bincount(idx, minlength=n + 1)
        ys, xs = np.indices(labels.shape)
        cy = np.bincount(idx, weights=ys.ravel(), minlength=n + 1)
        cx = np.bincount(idx, weights=xs.ravel(), minlength=n + 1)
        from scipy import ndimage

        slices = ndimage.find_objects(labels)
        for k in range(1, n + 1):
            sl = slices[k - 1]
            objects.append(
                {
                    "id": k,
                    "area": int(areas[k]),
                    "centroid": [round(cy[k] / areas[k], 3), round(cx[k] / areas[k], 3)],
                    "bbox": [sl[0].start, sl[1].start, sl[0].stop, sl[1].stop],
                }
            )
    fg_pixels = int(fg.sum())
    return {
        "height": int(h),
        "width": int(w),
        "count": int(n),
        "area_fraction": fg_pixels / float(h * w),
        "foreground_pixels": fg_pixels,
        "objects": objects,
    }
