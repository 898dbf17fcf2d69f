"""The ignore label: how an unlabelled pixel is spelled in class-index masks.

Raw mask stacks mark unlabelled pixels with ``base.ignore_value`` (a raw value outside the
class table, e.g. 254 when the classes use 0 and 255, or 0 when ``background`` is painted
explicitly). :meth:`mitoseg.config.BaseConfig.value_to_index` maps that raw value to
:data:`IGNORE_INDEX`, so every class-index mask (uint8, after
:func:`mitoseg.evaluate.masks_to_indices` or
:func:`mitoseg.data.patches.map_mask_to_classes`) holds ``0 .. n_classes - 1`` for labelled
pixels and ``IGNORE_INDEX`` for unlabelled ones.

Every consumer honours it the same way (as nnU-Net's ignore label does): unlabelled pixels
weigh 0 in the losses, are left out of every metric and of the threshold search, never
centre a training crop, and patches or slices without a labelled pixel are not used.
Predictions are always dense. Light: numpy only.
"""

from __future__ import annotations

import numpy as np

__all__ = ["IGNORE_INDEX", "has_labels", "labelled"]

#: Class index of an unlabelled pixel in uint8 class-index masks (class tables have at
#: most 255 classes, ``0 .. 254``).
IGNORE_INDEX = 255


def labelled(mask: np.ndarray) -> np.ndarray:
    """Boolean map of the labelled pixels of a class-index mask.

    Args:
        mask: class indexes of any shape (``IGNORE_INDEX`` = unlabelled).

    Returns:
        bool array of ``mask``'s shape, True where the pixel carries a class.
    """
    return np.asarray(mask) != IGNORE_INDEX


def has_labels(mask: np.ndarray, axis: int | tuple[int, ...] | None = None) -> np.ndarray | bool:
    """Whether a class-index mask (or each of its slices/patches) has a labelled pixel.

    Args:
        mask: class indexes, e.g. ``(N, H, W)``.
        axis: axes reduced (``(1, 2)`` gives one answer per patch); None: the whole array.

    Returns:
        bool, or a bool array over the axes that are not reduced.
    """
    out = labelled(mask).any(axis=axis)
    return bool(out) if axis is None else out
