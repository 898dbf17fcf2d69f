"""Losses and foreground metrics on tiny hand-computed tensors."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from mitoseg.labels import IGNORE_INDEX
from mitoseg.model.losses import (
    ForegroundDice,
    ForegroundIoU,
    SegmentationLoss,
    get_loss,
    get_metrics,
)

# Binary: 4 pixels, truth [1, 0, 1, 0], probabilities [0.9, 0.2, 0.4, 0.1].
B_TRUE = np.array([1, 0, 1, 0], np.float32).reshape(1, 2, 2, 1)
B_PRED = np.array([0.9, 0.2, 0.4, 0.1], np.float32).reshape(1, 2, 2, 1)
B_BCE = -(math.log(0.9) + math.log(0.8) + math.log(0.4) + math.log(0.9)) / 4
B_WBCE2 = -(2 * math.log(0.9) + math.log(0.8) + 2 * math.log(0.4) + math.log(0.9)) / 4
B_DICE = 1 - (2 * 1.3 + 1) / (2 + 1.6 + 1)  # intersection 1.3, |T| 2, |P| 1.6, smooth 1

# 3 classes: truth [0, 1, 2, 1]; argmax of the rows is [0, 1, 1, 2].
M_TRUE = np.array([0, 1, 2, 1], np.uint8).reshape(1, 2, 2, 1)
M_PRED = np.array(
    [[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.5, 0.3], [0.3, 0.3, 0.4]], np.float32
).reshape(1, 2, 2, 3)
M_CE = -(math.log(0.7) + math.log(0.6) + math.log(0.3) + math.log(0.3)) / 4
M_WCE3 = -(math.log(0.7) + 3 * math.log(0.6) + 3 * math.log(0.3) + 3 * math.log(0.3)) / 4
M_DICE = 1 - ((2 * 0.9 + 1) / (2 + 1.6 + 1) + (2 * 0.3 + 1) / (1 + 1.1 + 1)) / 2


def _loss(name: str, n_classes: int, y_true, y_pred, weight: float = 1.0) -> float:
    return float(keras.ops.convert_to_numpy(get_loss(name, n_classes, weight)(y_true, y_pred)))


@pytest.mark.parametrize(
    ("name", "weight", "expected"),
    [
        ("bce", 1.0, B_BCE),
        ("bce", 5.0, B_BCE),  # weight only affects weighted_bce
        ("weighted_bce", 2.0, B_WBCE2),
        ("dice", 1.0, B_DICE),
        ("bce_dice", 1.0, B_BCE + B_DICE),
    ],
)
def test_binary_losses(name, weight, expected):
    assert _loss(name, 2, B_TRUE, B_PRED, weight) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    ("name", "weight", "expected"),
    [
        ("bce", 1.0, M_CE),
        ("weighted_bce", 3.0, M_WCE3),
        ("dice", 1.0, M_DICE),
        ("bce_dice", 1.0, M_CE + M_DICE),
    ],
)
def test_multiclass_losses(name, weight, expected):
    assert _loss(name, 3, M_TRUE, M_PRED, weight) == pytest.approx(expected, rel=1e-5)


def test_perfect_prediction_has_near_zero_loss():
    y = np.array([1, 0, 0, 1], np.float32).reshape(1, 2, 2, 1)
    assert _loss("bce_dice", 2, y, y) == pytest.approx(0.0, abs=1e-5)


def _metric(metric, batches) -> float:
    for y_true, y_pred in batches:
        metric.update_state(y_true, y_pred)
    return float(keras.ops.convert_to_numpy(metric.result()))


def test_binary_metrics():
    # Thresholded prediction [1, 0, 0, 0] vs truth [1, 0, 1, 0]: I=1, P=1, T=2.
    iou, dice = get_metrics(2)
    assert (iou.name, dice.name) == ("iou", "dice")
    assert _metric(iou, [(B_TRUE, B_PRED)]) == pytest.approx(1 / 2)
    assert _metric(dice, [(B_TRUE, B_PRED)]) == pytest.approx(2 / 3)
    # Threshold is inclusive at 0.5.
    half = np.full((1, 2, 2, 1), 0.5, np.float32)
    assert _metric(ForegroundIoU(2), [(B_TRUE, half)]) == pytest.approx(2 / 4)


def test_multiclass_metrics():
    # class 1: truth {1, 3}, pred {1, 2} -> IoU 1/3, Dice 1/2; class 2: truth {2}, pred {3} -> 0.
    assert _metric(ForegroundIoU(3), [(M_TRUE, M_PRED)]) == pytest.approx((1 / 3 + 0) / 2)
    assert _metric(ForegroundDice(3), [(M_TRUE, M_PRED)]) == pytest.approx((1 / 2 + 0) / 2)


def test_metrics_accumulate_over_batches_and_reset():
    metric = ForegroundIoU(2)
    halves = [(B_TRUE[:, :1], B_PRED[:, :1]), (B_TRUE[:, 1:], B_PRED[:, 1:])]
    # batch 1 alone: truth [1, 0], pred [1, 0] -> IoU 1; batch 2: truth [1, 0], pred [0, 0] -> 0.
    assert _metric(metric, halves) == pytest.approx(1 / 2)  # pooled, not the batch mean
    metric.reset_state()
    assert _metric(metric, halves[1:]) == pytest.approx(0.0)


def test_metrics_empty_foreground_is_perfect_and_absent_class_ignored():
    zeros = np.zeros((1, 2, 2, 1), np.float32)
    assert _metric(ForegroundIoU(2), [(zeros, zeros + 0.1)]) == 1.0
    assert _metric(ForegroundDice(2), [(zeros, zeros + 0.1)]) == 1.0
    # 3 classes, class 2 absent from truth and prediction: mean over class 1 only.
    y_true = np.array([0, 1, 1, 0], np.uint8).reshape(1, 2, 2, 1)
    y_pred = np.eye(3, dtype=np.float32)[[0, 1, 0, 0]].reshape(1, 2, 2, 3)
    assert _metric(ForegroundIoU(3), [(y_true, y_pred)]) == pytest.approx(1 / 2)


def test_compiled_model_reports_named_metrics():
    x = np.random.default_rng(0).random((2, 8, 8, 1), dtype=np.float32)
    y = (x > 0.5).astype(np.uint8)
    inputs = keras.Input((None, None, 1))
    model = keras.Model(inputs, keras.layers.Conv2D(1, 1, activation="sigmoid")(inputs))
    model.compile("adam", loss=get_loss("bce_dice", 2), metrics=get_metrics(2))
    logs = model.evaluate(x, y, verbose=0, return_dict=True)
    assert set(logs) == {"loss", "iou", "dice"}


def test_serialization_roundtrip():
    loss = get_loss("weighted_bce", 4, 2.5)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(restored, SegmentationLoss)
    assert (restored.kind, restored.n_classes, restored.foreground_weight) == (
        "weighted_bce",
        4,
        2.5,
    )
    metric = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(ForegroundDice(5))
    )
    assert isinstance(metric, ForegroundDice) and metric.n_classes == 5 and metric.name == "dice"


def test_errors():
    with pytest.raises(
        ValueError,
        match=r"get_loss: unknown loss 'focal'; choose one of "
        r"\['bce', 'bce_dice', 'dice', 'weighted_bce'\]",
    ):
        get_loss("focal", 2)
    with pytest.raises(ValueError, match="get_loss: n_classes must be >= 2, got 1"):
        get_loss("bce", 1)
    with pytest.raises(ValueError, match="get_loss: foreground_weight must be > 0, got 0"):
        get_loss("weighted_bce", 2, 0)
    with pytest.raises(ValueError, match="ForegroundIoU: n_classes must be >= 2, got 1"):
        ForegroundIoU(1)


# Ignore label: pixel 1 of each example is unlabelled (IGNORE_INDEX); its prediction must
# not matter. Binary labelled pixels: truth [1, 1, 0], probabilities [0.9, 0.4, 0.1].
B_TRUE_IGN = np.array([1, IGNORE_INDEX, 1, 0], np.float32).reshape(1, 2, 2, 1)
B_BCE_IGN = -(math.log(0.9) + math.log(0.4) + math.log(0.9)) / 3
B_WBCE2_IGN = -(2 * math.log(0.9) + 2 * math.log(0.4) + math.log(0.9)) / 3
B_DICE_IGN = 1 - (2 * 1.3 + 1) / (2 + 1.4 + 1)  # I 1.3, |T| 2, |P| 0.9 + 0.4 + 0.1
# 3 classes, labelled pixels 0, 2, 3: truth [0, 2, 1], rows [.7 .2 .1], [.2 .5 .3], [.3 .3 .4].
M_TRUE_IGN = np.array([0, IGNORE_INDEX, 2, 1], np.uint8).reshape(1, 2, 2, 1)
M_CE_IGN = -(math.log(0.7) + math.log(0.3) + math.log(0.3)) / 3
M_WCE3_IGN = -(math.log(0.7) + 3 * math.log(0.3) + 3 * math.log(0.3)) / 3
# class 1: t [0, 0, 1], p [.2, .5, .3] -> I .3, P 1.0; class 2: t [0, 1, 0], p [.1, .3, .4].
M_DICE_IGN = 1 - ((2 * 0.3 + 1) / (1 + 1.0 + 1) + (2 * 0.3 + 1) / (1 + 0.8 + 1)) / 2


@pytest.mark.parametrize(
    ("name", "n_classes", "weight", "y_true", "y_pred", "expected"),
    [
        ("bce", 2, 1.0, B_TRUE_IGN, B_PRED, B_BCE_IGN),
        ("weighted_bce", 2, 2.0, B_TRUE_IGN, B_PRED, B_WBCE2_IGN),
        ("dice", 2, 1.0, B_TRUE_IGN, B_PRED, B_DICE_IGN),
        ("bce_dice", 2, 1.0, B_TRUE_IGN, B_PRED, B_BCE_IGN + B_DICE_IGN),
        ("bce", 3, 1.0, M_TRUE_IGN, M_PRED, M_CE_IGN),
        ("weighted_bce", 3, 3.0, M_TRUE_IGN, M_PRED, M_WCE3_IGN),
        ("dice", 3, 1.0, M_TRUE_IGN, M_PRED, M_DICE_IGN),
        ("bce_dice", 3, 1.0, M_TRUE_IGN, M_PRED, M_CE_IGN + M_DICE_IGN),
    ],
)
def test_losses_give_ignored_pixels_zero_weight(name, n_classes, weight, y_true, y_pred, expected):
    assert _loss(name, n_classes, y_true, y_pred, weight) == pytest.approx(expected, rel=1e-5)
    # any other prediction on the ignored pixel gives the same loss
    other = y_pred.copy()
    other[0, 0, 1] = other[0, 0, 1][::-1] if n_classes > 2 else 0.97
    assert not np.array_equal(other, y_pred)
    assert _loss(name, n_classes, y_true, other, weight) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", ["bce", "weighted_bce", "dice", "bce_dice"])
@pytest.mark.parametrize("n_classes", [2, 3])
def test_loss_of_a_batch_without_labels_is_zero(name, n_classes):
    y_true = np.full((1, 2, 2, 1), IGNORE_INDEX, np.uint8)
    y_pred = B_PRED if n_classes == 2 else M_PRED
    assert _loss(name, n_classes, y_true, y_pred, 2.0) == pytest.approx(0.0, abs=1e-6)


def test_metrics_leave_ignored_pixels_out():
    # binary: thresholded [1, 1, 0, 0] vs truth [1, ign, 1, 0] -> labelled: I 1, P 1, T 2
    pred = np.array([0.9, 0.9, 0.4, 0.1], np.float32).reshape(1, 2, 2, 1)
    assert _metric(ForegroundIoU(2), [(B_TRUE_IGN, pred)]) == pytest.approx(1 / 2)
    assert _metric(ForegroundDice(2), [(B_TRUE_IGN, pred)]) == pytest.approx(2 / 3)
    # 3 classes: argmax [0, 1, 1, 2] vs truth [0, ign, 2, 1]: class 1 truth {3} pred {2},
    # class 2 truth {2} pred {3} -> IoU 0 for both (pixel 1's class-1 vote is left out)
    assert _metric(ForegroundIoU(3), [(M_TRUE_IGN, M_PRED)]) == pytest.approx(0.0)
    # a batch with nothing labelled adds nothing: 1.0 (empty-vs-empty)
    none = np.full((1, 2, 2, 1), IGNORE_INDEX, np.uint8)
    assert _metric(ForegroundIoU(2), [(none, pred)]) == 1.0


def test_pixel_accuracy_counts_labelled_pixels_only():
    from mitoseg.model.losses import PixelAccuracy

    # binary: thresholded [1, 0, 0, 0] vs truth [1, 0, 1, 0]: 3 of 4 right
    assert _metric(PixelAccuracy(2), [(B_TRUE, B_PRED)]) == pytest.approx(3 / 4)
    # [1, 1, 0, 0] vs [1, ign, 1, 0]: labelled pixels 0, 2, 3 -> 2 of 3 right
    pred = np.array([0.9, 0.9, 0.4, 0.1], np.float32).reshape(1, 2, 2, 1)
    assert _metric(PixelAccuracy(2), [(B_TRUE_IGN, pred)]) == pytest.approx(2 / 3)
    # 3 classes: argmax [0, 1, 1, 2] vs [0, 1, 2, 1]: 2 of 4; with pixel 1 unlabelled 1 of 3
    assert _metric(PixelAccuracy(3), [(M_TRUE, M_PRED)]) == pytest.approx(2 / 4)
    assert _metric(PixelAccuracy(3), [(M_TRUE_IGN, M_PRED)]) == pytest.approx(1 / 3)
    none = np.full((1, 2, 2, 1), IGNORE_INDEX, np.uint8)
    assert _metric(PixelAccuracy(2), [(none, pred)]) == 1.0
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(PixelAccuracy(4))
    )
    assert isinstance(restored, PixelAccuracy) and restored.n_classes == 4
    assert restored.name == "accuracy"


@pytest.mark.parametrize("n_classes", [2, 4])
def test_pixel_accuracy_equals_keras_accuracy_on_fully_labelled_data(n_classes):
    from mitoseg.model.losses import PixelAccuracy

    rng = np.random.default_rng(n_classes)
    y_true = rng.integers(0, n_classes, (3, 8, 8, 1)).astype(np.uint8)
    if n_classes == 2:
        y_pred = rng.random((3, 8, 8, 1), dtype=np.float32)
        reference = keras.metrics.BinaryAccuracy(threshold=0.5)
    else:
        y_pred = rng.dirichlet(np.ones(n_classes), (3, 8, 8)).astype(np.float32)
        reference = keras.metrics.SparseCategoricalAccuracy()
    batches = [(y_true[:2], y_pred[:2]), (y_true[2:], y_pred[2:])]
    assert _metric(PixelAccuracy(n_classes), batches) == pytest.approx(_metric(reference, batches))
