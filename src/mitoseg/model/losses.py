"""Segmentation losses and foreground metrics (Keras 3, backend-agnostic ``keras.ops``).

Conventions shared by every loss and metric here:

* ``y_true``: ``(N, H, W, 1)`` class indices (any numeric dtype; 0 = background;
  :data:`~mitoseg.labels.IGNORE_INDEX` = unlabelled: such pixels weigh 0 in every loss and
  metric, and a batch without a labelled pixel has loss 0).
* ``y_pred``: ``(N, H, W, 1)`` sigmoid foreground probability when ``n_classes == 2``,
  else ``(N, H, W, n_classes)`` softmax probabilities (see ``build_unet``).

All classes are registered as Keras serializables (package ``mitoseg``) so a compiled model
saved with them reloads once this module is imported. Importing this module imports keras.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from mitoseg.labels import IGNORE_INDEX

__all__ = [
    "LOSSES",
    "ForegroundDice",
    "ForegroundIoU",
    "PixelAccuracy",
    "SegmentationLoss",
    "get_loss",
    "get_metrics",
]

#: Loss names accepted by :func:`get_loss` (``TrainConfig.loss``).
LOSSES = ("bce", "dice", "bce_dice", "weighted_bce")
_EPS = 1e-7
_SMOOTH = 1.0


def _check_n_classes(where: str, n_classes: int) -> None:
    if n_classes < 2:
        raise ValueError(f"{where}: n_classes must be >= 2, got {n_classes}")


def _targets(y_true: Any, n_classes: int) -> tuple[Any, Any]:
    """Class indices ``(N, H, W, 1)`` -> (float32 targets shaped like the predictions,
    float32 ``(N, H, W, 1)`` weight: 1 on labelled pixels, 0 on ignored ones)."""
    idx = ops.cast(y_true, "int32")
    valid = ops.cast(idx != IGNORE_INDEX, "float32")
    if n_classes == 2:
        return ops.cast(idx == 1, "float32"), valid
    idx = ops.where(idx == IGNORE_INDEX, 0, idx)
    return ops.one_hot(ops.squeeze(idx, axis=-1), n_classes, dtype="float32"), valid


def _cross_entropy(t: Any, p: Any, valid: Any, n_classes: int, foreground_weight: float) -> Any:
    """Mean per-pixel (class-weighted) cross-entropy over the labelled pixels; background
    weight 1."""
    p = ops.clip(p, _EPS, 1.0 - _EPS)
    if n_classes == 2:
        per_pixel = -(foreground_weight * t * ops.log(p) + (1.0 - t) * ops.log(1.0 - p))
    else:
        weights = ops.convert_to_tensor(
            [1.0] + [float(foreground_weight)] * (n_classes - 1), dtype="float32"
        )
        per_pixel = -ops.sum(weights * t * ops.log(p), axis=-1, keepdims=True)
    return ops.sum(per_pixel * valid) / ops.maximum(ops.sum(valid), 1.0)


def _soft_dice_loss(t: Any, p: Any, valid: Any, n_classes: int) -> Any:
    """1 - mean over foreground classes of the batch soft Dice (smoothing 1) over the
    labelled pixels (0 when no pixel is labelled)."""
    if n_classes > 2:
        t, p = t[..., 1:], p[..., 1:]
    t, p = t * valid, p * valid
    axes = (0, 1, 2)
    inter = ops.sum(t * p, axis=axes)
    denom = ops.sum(t, axis=axes) + ops.sum(p, axis=axes)
    dice = (2.0 * inter + _SMOOTH) / (denom + _SMOOTH)
    return 1.0 - ops.mean(dice)


@keras.saving.register_keras_serializable(package="mitoseg")
class SegmentationLoss(keras.losses.Loss):
    """Binary / multiclass segmentation loss.

    Kinds: ``bce`` (binary or categorical cross-entropy), ``weighted_bce`` (foreground
    pixels / classes weighted by ``foreground_weight``, background 1), ``dice`` (1 - soft
    Dice over the batch, mean over foreground classes), ``bce_dice`` (sum of both).

    Args:
        kind: one of :data:`LOSSES`.
        n_classes: classes including background (>= 2).
        foreground_weight: weight of foreground pixels in ``weighted_bce`` (> 0).
        name: loss name (default: ``kind``).
        reduction: Keras reduction (the value returned by ``call`` is already a scalar).
        dtype: Keras loss dtype.
    """

    def __init__(
        self,
        kind: str = "bce_dice",
        n_classes: int = 2,
        foreground_weight: float = 1.0,
        name: str | None = None,
        reduction: str = "sum_over_batch_size",
        dtype: Any = None,
    ) -> None:
        if kind not in LOSSES:
            raise ValueError(f"get_loss: unknown loss {kind!r}; choose one of {sorted(LOSSES)}")
        _check_n_classes("get_loss", n_classes)
        if not foreground_weight > 0:
            raise ValueError(f"get_loss: foreground_weight must be > 0, got {foreground_weight}")
        super().__init__(name=name or kind, reduction=reduction, dtype=dtype)
        self.kind = kind
        self.n_classes = int(n_classes)
        self.foreground_weight = float(foreground_weight)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        """Scalar loss for a batch (see module docstring for shapes)."""
        t, valid = _targets(y_true, self.n_classes)
        p = ops.cast(y_pred, "float32")
        weight = self.foreground_weight if self.kind == "weighted_bce" else 1.0
        if self.kind == "dice":
            return _soft_dice_loss(t, p, valid, self.n_classes)
        ce = _cross_entropy(t, p, valid, self.n_classes, weight)
        if self.kind == "bce_dice":
            return ce + _soft_dice_loss(t, p, valid, self.n_classes)
        return ce

    def get_config(self) -> dict[str, Any]:
        """Serializable configuration."""
        config = super().get_config()
        config.update(
            kind=self.kind, n_classes=self.n_classes, foreground_weight=self.foreground_weight
        )
        return config


def get_loss(name: str, n_classes: int, foreground_weight: float = 1.0) -> SegmentationLoss:
    """The training loss named in ``TrainConfig.loss``.

    Args:
        name: ``bce``, ``dice``, ``bce_dice`` or ``weighted_bce``.
        n_classes: classes including background (>= 2).
        foreground_weight: foreground weight of ``weighted_bce`` (ignored otherwise).

    Returns:
        A Keras loss mapping ``(y_true (N,H,W,1) class index, y_pred (N,H,W,C))`` to a
        scalar.

    Raises:
        ValueError: unknown name, ``n_classes < 2`` or ``foreground_weight <= 0``.
    """
    return SegmentationLoss(name, n_classes, foreground_weight)


class _ForegroundOverlap(keras.metrics.Metric):
    """Accumulates per-foreground-class intersection and sums over all batches."""

    def __init__(self, n_classes: int = 2, threshold: float = 0.5, **kwargs: Any) -> None:
        _check_n_classes(type(self).__name__, n_classes)
        super().__init__(**kwargs)
        self.n_classes = int(n_classes)
        self.threshold = float(threshold)
        k = 1 if n_classes == 2 else n_classes - 1
        self.intersection = self.add_variable((k,), initializer="zeros", name="intersection")
        self.pred_sum = self.add_variable((k,), initializer="zeros", name="pred_sum")
        self.true_sum = self.add_variable((k,), initializer="zeros", name="true_sum")

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        """Add a batch: ``y_true (N,H,W,1)`` indices, ``y_pred (N,H,W,C)`` probabilities."""
        y_pred = ops.cast(y_pred, "float32")
        true, valid = _targets(y_true, self.n_classes)
        if self.n_classes == 2:
            pred = ops.cast(y_pred >= self.threshold, "float32") * valid
        else:
            idx = ops.argmax(y_pred, axis=-1)
            pred = ops.one_hot(idx, self.n_classes, dtype="float32")[..., 1:] * valid
            true = true[..., 1:]
        axes = tuple(range(len(pred.shape) - 1))
        self.intersection.assign_add(ops.sum(pred * true, axis=axes))
        self.pred_sum.assign_add(ops.sum(pred, axis=axes))
        self.true_sum.assign_add(ops.sum(true, axis=axes))

    #: Dice (``2I / (P + T)``) when true, IoU (``I / (P + T - I)``) when false.
    _dice = False

    def result(self) -> Any:
        """Mean score over foreground classes present in prediction or truth (1 if none)."""
        total = self.pred_sum + self.true_sum
        if self._dice:
            num, denom = 2.0 * self.intersection, total
        else:
            num, denom = self.intersection, total - self.intersection
        valid = ops.cast(denom > 0, "float32")
        score = num / ops.maximum(denom, 1.0)
        n_valid = ops.sum(valid)
        mean = ops.sum(score * valid) / ops.maximum(n_valid, 1.0)
        return ops.where(n_valid > 0, mean, 1.0)

    def reset_state(self) -> None:
        """Zero the accumulators."""
        for var in (self.intersection, self.pred_sum, self.true_sum):
            var.assign(ops.zeros_like(var))

    def get_config(self) -> dict[str, Any]:
        """Serializable configuration."""
        return {**super().get_config(), "n_classes": self.n_classes, "threshold": self.threshold}


@keras.saving.register_keras_serializable(package="mitoseg")
class ForegroundIoU(_ForegroundOverlap):
    """Foreground IoU ``|P & T| / |P | T|`` accumulated over batches (metric ``iou``).

    Binary: prediction = probability >= ``threshold`` (0.5). Multiclass: argmax, IoU per
    foreground class, mean over classes that occur in prediction or truth. 1.0 when no
    foreground is present anywhere.
    """

    def __init__(self, n_classes: int = 2, threshold: float = 0.5, name: str = "iou", **kw: Any):
        super().__init__(n_classes=n_classes, threshold=threshold, name=name, **kw)


@keras.saving.register_keras_serializable(package="mitoseg")
class ForegroundDice(_ForegroundOverlap):
    """Foreground Dice ``2|P & T| / (|P| + |T|)`` accumulated over batches (metric ``dice``).

    Same thresholding / class averaging as :class:`ForegroundIoU`.
    """

    _dice = True

    def __init__(self, n_classes: int = 2, threshold: float = 0.5, name: str = "dice", **kw: Any):
        super().__init__(n_classes=n_classes, threshold=threshold, name=name, **kw)


@keras.saving.register_keras_serializable(package="mitoseg")
class PixelAccuracy(keras.metrics.Metric):
    """Share of the labelled pixels classified right, over all batches (metric
    ``accuracy``): binary probability ``>= threshold`` (0.5), multiclass argmax.
    Unlabelled pixels (``IGNORE_INDEX``) are left out; 1.0 before any labelled pixel."""

    def __init__(
        self, n_classes: int = 2, threshold: float = 0.5, name: str = "accuracy", **kwargs: Any
    ) -> None:
        _check_n_classes("PixelAccuracy", n_classes)
        super().__init__(name=name, **kwargs)
        self.n_classes = int(n_classes)
        self.threshold = float(threshold)
        self.correct = self.add_variable((), initializer="zeros", name="correct")
        self.total = self.add_variable((), initializer="zeros", name="total")

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        """Add a batch: ``y_true (N,H,W,1)`` indices, ``y_pred (N,H,W,C)`` probabilities."""
        idx = ops.cast(y_true, "int32")
        valid = ops.cast(idx != IGNORE_INDEX, "float32")
        y_pred = ops.cast(y_pred, "float32")
        if self.n_classes == 2:
            pred = ops.cast(y_pred >= self.threshold, "int32")
        else:
            pred = ops.expand_dims(ops.cast(ops.argmax(y_pred, axis=-1), "int32"), -1)
        right = ops.cast(pred == idx, "float32") * valid
        self.correct.assign_add(ops.sum(right))
        self.total.assign_add(ops.sum(valid))

    def result(self) -> Any:
        """Correct / labelled pixels (1.0 when none was labelled)."""
        return ops.where(self.total > 0, self.correct / ops.maximum(self.total, 1.0), 1.0)

    def reset_state(self) -> None:
        """Zero the accumulators."""
        for var in (self.correct, self.total):
            var.assign(ops.zeros_like(var))

    def get_config(self) -> dict[str, Any]:
        """Serializable configuration."""
        return {**super().get_config(), "n_classes": self.n_classes, "threshold": self.threshold}


def get_metrics(n_classes: int) -> list[keras.metrics.Metric]:
    """The compiled training metrics: ``[iou, dice]`` (foreground, see the classes)."""
    return [ForegroundIoU(n_classes), ForegroundDice(n_classes)]
