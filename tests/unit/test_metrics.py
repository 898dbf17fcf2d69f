"""Metrics on tiny hand-computed masks (expected numbers worked out in the comments)."""

from __future__ import annotations

import numpy as np
import pytest

from mitoseg.metrics import (
    confusion_matrix,
    evaluate_masks,
    label_objects,
    match_objects,
    object_counts,
    object_scores,
    safe_ratio,
    scores_from_confusion,
)

# truth            pred
# 0 1 1 0          0 0 1 1
# 0 1 1 0          0 1 1 0
# 0 0 0 0          0 0 0 0
# TP = 3 ((0,2), (1,1), (1,2)), FP = 1 ((0,3)), FN = 1 ((0,1)), TN = 12 - 5 = 7.
TRUTH = np.array([[0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]], dtype=np.uint8)
PRED = np.array([[0, 0, 1, 1], [0, 1, 1, 0], [0, 0, 0, 0]], dtype=np.uint8)


def test_confusion_matrix_binary() -> None:
    cm = confusion_matrix(TRUTH, PRED, 2)
    assert cm.dtype == np.int64
    assert cm.tolist() == [[7, 1], [1, 3]]


def test_binary_scores_by_hand() -> None:
    s = scores_from_confusion(confusion_matrix(TRUTH, PRED, 2), ["background", "mito"])
    assert s["iou"] == pytest.approx(3 / 5)  # 0.6
    assert s["dice"] == pytest.approx(6 / 8)  # 0.75
    assert s["precision"] == pytest.approx(3 / 4)
    assert s["recall"] == pytest.approx(3 / 4)
    assert s["accuracy"] == pytest.approx(10 / 12)
    # background: TP 7, FP 1 (missed fg), FN 1 (false fg) -> 7/9
    assert s["per_class"]["background"]["iou"] == pytest.approx(7 / 9)
    assert s["mean_iou"] == pytest.approx((0.6 + 7 / 9) / 2)  # 0.68889
    assert s["per_class"]["mito"] == pytest.approx(
        {"iou": 0.6, "dice": 0.75, "precision": 0.75, "recall": 0.75}
    )
    assert (s["fg_true"], s["fg_pred"]) == (4, 4)


def test_multiclass_scores_by_hand() -> None:
    # truth 0 1 2 / 0 1 2, pred 0 1 1 / 0 2 2 -> cm [[2,0,0],[0,1,1],[0,1,1]]
    truth = np.array([[0, 1, 2], [0, 1, 2]])
    pred = np.array([[0, 1, 1], [0, 2, 2]])
    cm = confusion_matrix(truth, pred, 3)
    assert cm.tolist() == [[2, 0, 0], [0, 1, 1], [0, 1, 1]]
    s = scores_from_confusion(cm, ["bg", "a", "b"])
    # classes a and b: TP 1, FP 1, FN 1 -> IoU 1/3, Dice 1/2, precision 1/2, recall 1/2
    for name in ("a", "b"):
        assert s["per_class"][name]["iou"] == pytest.approx(1 / 3)
        assert s["per_class"][name]["dice"] == pytest.approx(0.5)
    assert s["per_class"]["bg"]["iou"] == 1.0
    assert s["iou"] == pytest.approx(1 / 3)  # macro mean over foreground classes
    assert s["dice"] == pytest.approx(0.5)
    assert s["mean_iou"] == pytest.approx((1 + 1 / 3 + 1 / 3) / 3)  # 5/9
    assert s["accuracy"] == pytest.approx(4 / 6)
    assert (s["fg_true"], s["fg_pred"]) == (4, 4)


def test_empty_vs_empty_is_perfect() -> None:
    z = np.zeros((2, 2), dtype=np.uint8)
    s = scores_from_confusion(confusion_matrix(z, z, 2))
    assert (s["iou"], s["dice"], s["precision"], s["recall"], s["accuracy"]) == (1, 1, 1, 1, 1)


def test_empty_truth_nonempty_prediction() -> None:
    truth = np.zeros((2, 2), dtype=np.uint8)
    pred = np.array([[1, 1], [0, 0]], dtype=np.uint8)
    s = scores_from_confusion(confusion_matrix(truth, pred, 2))
    assert (s["iou"], s["dice"], s["precision"]) == (0.0, 0.0, 0.0)
    assert s["recall"] == 1.0  # nothing to find, nothing missed
    assert s["accuracy"] == 0.5


def test_nonempty_truth_empty_prediction() -> None:
    truth = np.array([[1, 0], [0, 0]], dtype=np.uint8)
    pred = np.zeros((2, 2), dtype=np.uint8)
    s = scores_from_confusion(confusion_matrix(truth, pred, 2))
    assert (s["iou"], s["dice"], s["recall"]) == (0.0, 0.0, 0.0)
    assert s["precision"] == 1.0  # no false positives
    assert s["accuracy"] == 0.75


def test_safe_ratio() -> None:
    assert safe_ratio(0, 0) == 1.0
    assert safe_ratio(1, 4) == 0.25
    with pytest.raises(ValueError, match=r"^safe_ratio: 1 / 0 is undefined$"):
        safe_ratio(1, 0)


def test_label_objects_eight_connectivity_and_size_filter() -> None:
    m = np.zeros((5, 5), dtype=np.uint8)
    m[0, 0] = m[1, 1] = m[2, 2] = 1  # diagonal chain: one object under 8-connectivity
    m[4, 3:5] = 1  # second object, 2 px
    labels, n = label_objects(m)
    assert n == 2
    assert labels.dtype == np.int32
    assert labels[0, 0] == labels[2, 2] != labels[4, 4]
    labels, n = label_objects(m, min_object_size=3)
    assert n == 1
    assert labels[4, 4] == 0 and labels[1, 1] == 1


def test_object_counts_by_hand() -> None:
    truth = np.zeros((5, 10), dtype=np.uint8)
    pred = np.zeros((5, 10), dtype=np.uint8)
    truth[0:2, 0:2] = 1  # A, 4 px
    truth[0:2, 5:8] = 1  # B, 6 px
    truth[4, 9] = 1  # C, 1 px
    pred[0:2, 0:3] = 1  # A': IoU with A = 4/6 -> match
    pred[0, 5:7] = 1  # B': IoU with B = 2/6 -> no match
    pred[3:5, 0:2] = 1  # D': false positive, 4 px
    assert object_counts(truth, pred) == (3, 3, 1)
    assert object_counts(truth, pred, min_object_size=2) == (2, 3, 1)  # C dropped
    s = object_scores(2, 3, 1)
    assert s["precision"] == pytest.approx(1 / 3)
    assert s["recall"] == pytest.approx(1 / 2)
    assert s["f1"] == pytest.approx(2 / 5)
    assert object_scores(0, 0, 0) == {
        "n_true": 0,
        "n_pred": 0,
        "n_matched": 0,
        "precision": 1.0,
        "recall": 1.0,
        "f1": 1.0,
    }


def test_match_objects_is_one_to_one() -> None:
    # one truth object, two predicted halves with IoU exactly 0.5 each: only one may match
    truth_labels = np.array([[1, 1, 1, 1]])
    pred_labels = np.array([[1, 1, 2, 2]])
    assert match_objects(truth_labels, 1, pred_labels, 2) == [(1, 1, 0.5)]
    assert match_objects(truth_labels, 1, pred_labels, 2, iou_threshold=0.6) == []
    assert match_objects(truth_labels, 1, np.zeros_like(pred_labels), 0) == []


def test_evaluate_masks_aggregate_and_per_slice() -> None:
    truth = np.stack([TRUTH, np.zeros_like(TRUTH)])
    pred = np.stack([PRED, np.zeros_like(PRED)])
    summary, rows = evaluate_masks(truth, pred, 2, ["background", "mito"], min_object_size=0)
    # summed confusion: TP 3, FP 1, FN 1, TN 7 + 12 = 19
    assert summary["confusion"] == [[19, 1], [1, 3]]
    assert summary["iou"] == pytest.approx(0.6)
    assert summary["accuracy"] == pytest.approx(22 / 24)
    assert summary["slice_mean"]["iou"] == pytest.approx((0.6 + 1.0) / 2)
    assert summary["n_slices"] == 2
    assert summary["objects"]["n_true"] == 1 and summary["objects"]["n_matched"] == 1
    assert [r["slice"] for r in rows] == [0, 1]
    assert rows[0]["iou"] == pytest.approx(0.6) and rows[1]["iou"] == 1.0
    assert (rows[0]["fg_true"], rows[0]["fg_pred"], rows[1]["fg_true"]) == (4, 4, 0)
    single, rows2 = evaluate_masks(TRUTH, PRED, 2)
    assert single["iou"] == pytest.approx(0.6) and len(rows2) == 1


@pytest.mark.parametrize(
    ("truth", "pred", "n", "message"),
    [
        (
            np.zeros((2, 2), int),
            np.zeros((2, 3), int),
            2,
            "truth shape (2, 2) != prediction shape (2, 3)",
        ),
        (np.zeros((2, 2), int), np.zeros((2, 2), int), 1, "n_classes must be >= 2, got 1"),
        (
            np.zeros((2, 2)),
            np.zeros((2, 2), int),
            2,
            "truth must be integer class indexes, got float64",
        ),
        (
            np.zeros((2, 2), int),
            np.full((2, 2), 3),
            2,
            "prediction has values in [3, 3], expected 0..1",
        ),
    ],
)
def test_confusion_matrix_errors(truth, pred, n, message) -> None:
    with pytest.raises(ValueError) as exc:
        confusion_matrix(truth, pred, n)
    assert str(exc.value) == f"confusion_matrix: {message}"


@pytest.mark.parametrize(
    ("cm", "names", "message"),
    [
        (np.zeros(4, int), None, "expected (C, C), got shape (4,)"),
        (np.zeros((2, 3), int), None, "expected a (C, C) matrix with C >= 2, got (2, 3)"),
        (np.zeros((1, 1), int), None, "expected a (C, C) matrix with C >= 2, got (1, 1)"),
        (np.array([[1, -1], [0, 0]]), None, "confusion matrix has negative counts"),
        (np.eye(2, dtype=int), ["bg"], "1 class names for a 2-class confusion matrix"),
    ],
    ids=["1d", "not-square", "one-class", "negative", "names"],
)
def test_scores_from_confusion_errors(
    cm: np.ndarray, names: list[str] | None, message: str
) -> None:
    with pytest.raises(ValueError) as exc:
        scores_from_confusion(cm, names)
    assert str(exc.value) == f"scores_from_confusion: {message}"


def test_object_and_stack_errors() -> None:
    with pytest.raises(
        ValueError, match=r"^label_objects: expected \(H, W\), got shape \(1, 2, 2\)$"
    ):
        label_objects(np.zeros((1, 2, 2)))
    with pytest.raises(ValueError, match="label_objects: min_object_size must be >= 0, got -1"):
        label_objects(np.zeros((2, 2)), -1)
    with pytest.raises(ValueError, match=r"match_objects: truth labels \(1, 2\) != prediction"):
        match_objects(np.zeros((1, 2), int), 0, np.zeros((2, 1), int), 0)
    with pytest.raises(ValueError, match=r"object_counts: truth shape \(2, 2\) != prediction"):
        object_counts(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(
        ValueError, match=r"^evaluate_masks: expected \(Z, H, W\) or \(H, W\), got shape \(4,\)$"
    ):
        evaluate_masks(np.zeros(4, int), np.zeros(4, int), 2)
    with pytest.raises(
        ValueError, match=r"^evaluate_masks: expected a non-empty array, got shape \(0, 2, 2\)$"
    ):
        evaluate_masks(np.zeros((0, 2, 2), int), np.zeros((0, 2, 2), int), 2)
    with pytest.raises(ValueError, match=r"evaluate_masks: truth shape \(4,\) != prediction"):
        evaluate_masks(np.zeros(4, int), np.zeros(5, int), 2)
