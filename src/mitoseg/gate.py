"""Score a registered model on the current test data (the register gate's re-evaluation).

When the champion was scored on other test data than a new model (new test labels, a
new volume), the two numbers are not compared: :func:`score_on_test` re-evaluates the
champion on the current test split, exactly as the evaluate stage scores a new model
(its own inference plan: engine, tiling, threshold, z-averaging), and
:func:`mitoseg.tracking.register_model` compares that number instead.
"""

from __future__ import annotations

import math
from pathlib import Path

from mitoseg.config import BaseConfig
from mitoseg.data.layout import read_split, split_paths
from mitoseg.io import DataError

__all__ = ["score_on_test"]


def score_on_test(
    model_uri: str, raw_dir: str | Path, base: BaseConfig, metric: str, *, progress: bool = False
) -> float:
    """A model's ``metric`` on the test split of a canonical raw directory.

    Args:
        model_uri: ``models:/<name>/<version>``, ``models:/<name>@<alias>``, ``runs:/...``
            or a ``.keras`` path (:func:`mitoseg.tracking.load_model_and_plan`; a model
            without a stored plan runs with the default plan).
        raw_dir: canonical directory; ``test/images.tif`` and ``test/masks.tif`` are read.
        base: class table and ``ignore_value`` mapping the raw test masks.
        metric: a key of the evaluation metrics (``iou``, ``dice``, ``mean_iou``).

    Returns:
        The metric over the labelled test pixels.

    Raises:
        DataError: missing test stacks, mask values outside the class table, a model
            whose output does not fit the class table, or an unknown / non-finite metric.
        ModelNotFoundError: the model URI does not resolve.
    """
    from mitoseg import tracking
    from mitoseg.evaluate import masks_to_indices
    from mitoseg.planner import evaluate_split

    images, masks = read_split(raw_dir, "test", require_masks=True)
    assert masks is not None  # read_split(require_masks=True) raises otherwise
    idx = masks_to_indices(masks, base.value_to_index(), str(split_paths(raw_dir, "test")[1]))
    model, plan = tracking.load_model_and_plan(model_uri)
    try:
        result = evaluate_split(model, plan, images, idx, progress=progress)
    except ValueError as exc:
        raise DataError(f"{model_uri} on {raw_dir}/test: {exc}") from None
    value = result.metrics.get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{model_uri} on {raw_dir}/test: metric {metric!r} is {value!r}")
    return float(value)
