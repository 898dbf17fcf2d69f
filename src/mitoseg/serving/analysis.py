"""Object statistics returned by the service's ``/stats`` (pure numpy/scipy)."""

from __future__ import annotations

from typing import Any

import numpy as np

from mitoseg.checks import check_array
from mitoseg.metrics import label_objects

__all__ = ["mask_stats"]


def mask_stats(
    class_mask: np.ndarray,
    foreground: int = 1,
    min_object_size: int = 0,
    image: np.ndarray | None = None,
    pixel_size_nm: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """Count and measure the objects of one class in a 2D mask.

    Objects are 8-connected components (:func:`mitoseg.metrics.label_objects`);
    components smaller than ``min_object_size`` pixels are not counted.

    Args:
        class_mask: ``(H, W)`` uint8 class indices.
        foreground: class index to measure.
        min_object_size: smallest counted object, pixels.
        image: ``(H, W)`` raw intensities the mask was predicted from (``mean_intensity``
            of each object), or None.
        pixel_size_nm: ``(y, x)`` nm per pixel (``area_nm2`` of each object), or None.

    Returns:
        ``{"height", "width", "count", "area_fraction", "foreground_pixels",
        "pixel_size_nm", "objects": [{"id", "area", "centroid": [y, x], "bbox": [y0, x0,
        y1, x1], "area_nm2", "mean_intensity", "elongation"}]}``
        (:func:`mitoseg.inference.objects.measure_objects`; ``area_nm2`` / ``mean_intensity`` are
        None without a pixel size / image);
        ``area_fraction`` is the fraction of the image covered by the foreground class
        (all of it, small objects included); centroids are in pixel coordinates.

    Raises:
        ValueError: not a 2D mask.
    """
    class_mask = check_array(class_mask, "mask_stats", ndim=2)
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

        from mitoseg.inference.objects import measure_objects

        slices = ndimage.find_objects(labels)
        voxel = None if pixel_size_nm is None else (1.0, *map(float, pixel_size_nm))
        rows = measure_objects(labels, image, voxel)
        for k in range(1, n + 1):
            sl = slices[k - 1]
            row = rows[k - 1]
            objects.append(
                {
                    "id": k,
                    "area": int(areas[k]),
                    "centroid": [round(cy[k] / areas[k], 3), round(cx[k] / areas[k], 3)],
                    "bbox": [sl[0].start, sl[1].start, sl[0].stop, sl[1].stop],
                    "area_nm2": row["area_nm2"],
                    "mean_intensity": row["mean_intensity"],
                    "elongation": round(float(row["elongation"]), 4),
                }
            )
    fg_pixels = int(fg.sum())
    return {
        "height": int(h),
        "width": int(w),
        "count": int(n),
        "area_fraction": fg_pixels / float(h * w),
        "foreground_pixels": fg_pixels,
        "pixel_size_nm": None if pixel_size_nm is None else [float(v) for v in pixel_size_nm],
        "objects": objects,
    }
