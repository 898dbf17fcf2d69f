"""The ignore label (unlabelled pixels, ``IGNORE_INDEX``) in the config, the pixel and
object metrics, the threshold histogram and the 3D instance metrics; hand-computed masks."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from mitoseg.config import BaseConfig
from mitoseg.evaluate import ProbabilityHistogram, instance_metrics, masks_to_indices
from mitoseg.labels import IGNORE_INDEX, has_labels, labelled
from mitoseg.metrics import (
    confusion_matrix,
    evaluate_masks,
    label_objects,
    labelled_part,
    object_counts,
    scores_from_confusion,
)

X = IGNORE_INDEX


def test_labelled_and_has_labels() -> None:
    m = np.array([[[X, X], [X, X]], [[0, X], [X, 1]]], np.uint8)
    assert labelled(m).tolist() == [
        [[False, False], [False, False]],
        [[True, False], [False, True]],
    ]
    assert has_labels(m) is True
    assert has_labels(m, axis=(1, 2)).tolist() == [False, True]


def test_config_maps_the_ignore_value_to_ignore_index() -> None:
    base = BaseConfig(classes={"background": 0, "mitochondria": 255}, ignore_value=128)
    assert base.value_to_index() == {0: 0, 255: 1, 1: 1, 128: X}
    raw = np.array([[0, 128], [255, 1]], np.uint8)
    assert masks_to_indices(raw, base.value_to_index(), "m.tif").tolist() == [[0, X], [1, 1]]
    # ignore_value 1 replaces the implicit 0/1 foreground of a binary table
    one = BaseConfig(classes={"background": 0, "mitochondria": 255}, ignore_value=1)
    assert one.value_to_index() == {0: 0, 255: 1, 1: X}
    assert BaseConfig().value_to_index() == {0: 0, 255: 1, 1: 1}  # default: no ignore label


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"ignore_value": 255},
            "base.ignore_value 255 is a mask value of base.classes; choose a raw value no "
            "class uses",
        ),
        ({"ignore_value": -1}, "greater than or equal to 0"),
        ({"ignore_value": 70000}, "less than or equal to 65535"),
        (
            {"classes": {f"c{i}": i for i in range(256)}},
            "base.classes has 256 classes; at most 255 are supported (class index 255 marks "
            "unlabelled pixels)",
        ),
    ],
)
def test_config_ignore_value_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        BaseConfig(**kwargs)


# truth      pred        labelled pixels: (0,0) t0 p0, (0,1) t1 p1, (1,0) t1 p0, (1,2) t0 p1
# 0 1 X      0 1 1       -> cm [[1, 1], [1, 1]]: IoU 1/3, precision 1/2, recall 1/2, acc 2/4
# 1 X 0      0 1 1
TRUTH = np.array([[0, 1, X], [1, X, 0]], np.uint8)
PRED = np.array([[0, 1, 1], [0, 1, 1]], np.uint8)


def test_confusion_matrix_leaves_unlabelled_pixels_out() -> None:
    cm = confusion_matrix(TRUTH, PRED, 2)
    assert cm.tolist() == [[1, 1], [1, 1]]
    s = scores_from_confusion(cm)
    assert (s["iou"], s["precision"], s["recall"], s["accuracy"]) == pytest.approx(
        (1 / 3, 1 / 2, 1 / 2, 1 / 2)
    )
    # the prediction on unlabelled pixels does not matter
    other = PRED.copy()
    other[TRUTH == X] = 0
    assert confusion_matrix(TRUTH, other, 2).tolist() == cm.tolist()


@pytest.mark.parametrize(
    ("truth", "pred", "message"),
    [
        (
            np.array([[0, 3]], np.uint8),
            np.array([[0, 1]], np.uint8),
            r"confusion_matrix: truth has values in \[0, 3\], expected 0..1 or 255",
        ),
        (
            np.array([[0, 1]], np.uint8),
            np.array([[0, X]], np.uint8),
            r"confusion_matrix: prediction has values in \[0, 255\], expected 0..1$",
        ),
    ],
)
def test_confusion_matrix_value_errors(truth, pred, message) -> None:
    with pytest.raises(ValueError, match=message):
        confusion_matrix(truth, pred, 2)


def test_unlabelled_pixels_are_never_part_of_a_truth_object() -> None:
    labels, n = label_objects(np.array([[X, X, 0], [0, 1, 0]], np.uint8))
    assert n == 1 and labels.tolist() == [[0, 0, 0], [0, 1, 0]]


# 6 x 6, columns 4-5 unlabelled. Truth object A = rows 0-1, cols 0-1. Predicted objects:
# P1 = A (a match); P2 = rows 0-1, cols 4-5 (only unlabelled pixels: does not count);
# P3 = rows 4-5, cols 2-4 (reaches labelled background: a false positive).
OBJ_TRUTH = np.zeros((6, 6), np.uint8)
OBJ_TRUTH[:, 4:] = X
OBJ_TRUTH[0:2, 0:2] = 1
OBJ_PRED = np.zeros((6, 6), np.uint8)
OBJ_PRED[0:2, 0:2] = 1
OBJ_PRED[0:2, 4:6] = 1
OBJ_PRED[4:6, 2:5] = 1


def test_objects_only_on_unlabelled_pixels_do_not_count() -> None:
    assert object_counts(OBJ_TRUTH, OBJ_PRED) == (1, 2, 1)
    # the same masks without the ignore label: 3 predicted objects
    assert object_counts(np.where(OBJ_TRUTH == X, 0, OBJ_TRUTH), OBJ_PRED) == (1, 3, 1)


def test_object_match_uses_the_labelled_part_of_a_prediction() -> None:
    # truth object rows 0-1 cols 0-1 (4 px); prediction rows 0-1 cols 0-5 (12 px, of which
    # 8 labelled): IoU of the labelled part 4 / 8 = 0.5 matches; 4 / 12 would not
    truth = np.zeros((4, 6), np.uint8)
    truth[:, 4:] = X
    truth[0:2, 0:2] = 1
    pred = np.zeros((4, 6), np.uint8)
    pred[0:2, :] = 1
    assert object_counts(truth, pred) == (1, 1, 1)
    assert object_counts(np.where(truth == X, 0, truth), pred) == (1, 1, 0)


def test_labelled_part_renumbers_the_objects_left() -> None:
    labels = np.array([[1, 0, 2, 3]], np.int32)
    keep = np.array([[True, True, False, True]])
    out, n = labelled_part(labels, 3, keep)
    assert n == 2 and out.tolist() == [[1, 0, 0, 2]]
    same, n_same = labelled_part(labels, 3, np.ones_like(keep))
    assert n_same == 3 and same is labels


def test_evaluate_masks_leaves_unlabelled_slices_out_of_the_slice_mean() -> None:
    truth = np.stack([np.full((2, 3), X, np.uint8), TRUTH])
    pred = np.stack([np.ones((2, 3), np.uint8), PRED])
    summary, rows = evaluate_masks(truth, pred, 2)
    assert [r["labelled_pixels"] for r in rows] == [0, 4]
    assert summary["confusion"] == [[1, 1], [1, 1]]
    assert summary["iou"] == pytest.approx(1 / 3)
    assert summary["slice_mean"]["iou"] == pytest.approx(1 / 3)  # slice 1 only
    assert (summary["n_slices"], summary["n_labelled_slices"]) == (2, 1)
    # slice 0's whole-slice prediction is one object on unlabelled pixels only
    assert rows[0]["objects_pred"] == 0


def test_threshold_histogram_skips_unlabelled_pixels() -> None:
    # labelled: fg probs [0.9], bg probs [0.2, 0.6]; the unlabelled 0.7 and 0.8 are left out
    probs = np.array([[0.9, 0.7, 0.2], [0.8, 0.6, 0.0]])
    truth = np.array([[1, X, 0], [X, 0, X]], np.uint8)
    hist = ProbabilityHistogram(bins=10)
    hist.add(probs, truth)
    assert hist.pixels == 3
    thresholds, iou = hist.iou_curve()
    # threshold 0.5: predicted {0.9, 0.6} vs truth {0.9}: IoU 1/2; 0.7: {0.9} -> 1
    assert iou[np.isclose(thresholds, 0.5)][0] == pytest.approx(1 / 2)
    assert iou[np.isclose(thresholds, 0.7)][0] == pytest.approx(1.0)


def test_instance_metrics_ignore_objects_on_unlabelled_voxels() -> None:
    truth = np.zeros((2, 6, 6), np.uint8)
    truth[:, :, 4:] = X
    truth[:, 0:2, 0:2] = 1
    pred = np.zeros_like(truth)
    pred[:, 0:2, 0:2] = 1
    pred[:, 0:2, 4:6] = 1  # on unlabelled voxels only
    m = instance_metrics(truth, pred, ["background", "mitochondria"])
    assert (m["n_true"], m["n_pred"], m["iou_50"]["tp"], m["iou_50"]["fp"]) == (1, 1, 1, 0)


def test_evaluate_stack_and_threshold_choice_score_labelled_pixels_only() -> None:
    from mitoseg.evaluate import choose_threshold, evaluate_stack
    from mitoseg.inference.plan import InferencePlan

    # pixelwise identity model: probability = normalised intensity (here v / 255). Slice 0:
    # left half 255 (mitochondria, labelled), right half 0 (labelled background); slice 1:
    # left half 255 (truth 1), right half unlabelled: column 8 is 0, columns 9-15 are 200,
    # a predicted object on unlabelled pixels only, neither a false positive nor an object
    images = np.zeros((2, 16, 16), np.uint8)
    images[:, :, :8] = 255
    images[1, :, 9:] = 200
    truth = np.zeros((2, 16, 16), np.uint8)
    truth[:, :, :8] = 1
    truth[1, :, 8:] = X
    plan = InferencePlan(
        n_classes=2, class_names=["background", "mito"], tile_size=16, halo=4, batch_size=4,
        threshold=0.5, min_object_size=0,
    )  # fmt: skip
    result = evaluate_stack(lambda b: b.copy(), images, truth, plan)
    assert result.metrics["iou"] == 1.0 and result.metrics["precision"] == 1.0
    assert result.metrics["objects"]["n_pred"] == 2 and result.metrics["objects"]["precision"] == 1
    assert result.metrics["instances"]["n_pred"] == 1  # one 3D object through both slices
    assert result.metrics["calibration"]["pixels"] == 16 * 16 + 16 * 8
    choice = choose_threshold(lambda b: b.copy(), images, truth, plan)
    assert choice.iou == 1.0
