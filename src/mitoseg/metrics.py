"""Segmentation metrics from confusion matrices (numpy + scipy only, no tensorflow).

Masks are class-index maps: ``(H, W)`` or ``(Z, H, W)`` integer arrays with values in
``0 .. n_classes - 1``; index 0 is the background. Every pixel-level score is computed
from a confusion matrix ``cm[truth, pred]`` so that aggregates over a whole test stack are
exact (summed confusion over all test pixels), not a mean of ratios. The mean of the
per-slice values is reported separately (``slice_mean``).

Definitions (per class ``k``; ``TP``, ``FP``, ``FN`` are pixel counts):

* IoU (Jaccard) ``= TP / (TP + FP + FN)``; Dice ``= 2 TP / (2 TP + FP + FN)``;
  precision ``= TP / (TP + FP)``; recall ``= TP / (TP + FN)``.
* Pixel accuracy ``= trace(cm) / cm.sum()`` over all classes.
* ``iou``, ``dice``, ``precision``, ``recall`` are the *foreground* scores: for a binary
  table the scores of class 1; for a multiclass table the macro average over the
  foreground classes ``1 .. C-1``.
* ``mean_iou`` is the mean IoU over *all* classes, background included.

**Empty-vs-empty rule.** A ratio whose numerator and denominator are both zero is defined
as ``1.0``: nothing to find and nothing found is a perfect score. Hence

* truth and prediction both without foreground: IoU = Dice = precision = recall = 1.0;
* truth empty, prediction not: IoU = Dice = precision = 0.0 and recall = 1.0 (nothing
  was missed, everything predicted is wrong);
* truth not empty, prediction empty: IoU = Dice = recall = 0.0 and precision = 1.0.

The same rule applies to object-level precision/recall/F1.

**Unlabelled pixels.** Truth pixels with class index :data:`~mitoseg.labels.IGNORE_INDEX`
(the ignore label) are left out of every pixel count: they enter no confusion matrix, so
IoU/Dice/precision/recall/accuracy are those of the labelled pixels only. A slice without
a labelled pixel has no per-slice scores that count: it is left out of ``slice_mean``.

**Objects.** Foreground (class != 0) of truth and prediction is split into connected
components with :func:`scipy.ndimage.label` using 8-connectivity; components smaller than
``min_object_size`` pixels are discarded from both. A truth object and a predicted object
match when their IoU is ``>= 0.5``; matching is one-to-one (greedy by decreasing IoU).
With unlabelled truth pixels: truth objects are components of the *labelled* foreground
(an unlabelled pixel is never part of one); predicted objects are components of the whole
prediction (size filter on their whole size), then cut to the labelled pixels: an object
lying only on unlabelled pixels does not count at all, one that reaches labelled pixels
counts and is matched by the IoU of its labelled part.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mitoseg.checks import check_array, check_stack
from mitoseg.labels import IGNORE_INDEX, labelled

__all__ = [
    "MATCH_IOU",
    "SCORE_NAMES",
    "confusion_matrix",
    "evaluate_masks",
    "label_objects",
    "labelled_part",
    "match_objects",
    "object_counts",
    "object_scores",
    "safe_ratio",
    "scores_from_confusion",
]

#: Object IoU needed for a truth object and a predicted object to match.
MATCH_IOU = 0.5

#: Per-slice / aggregate pixel scores, in the order they are reported.
SCORE_NAMES: tuple[str, ...] = ("iou", "dice", "accuracy", "precision", "recall")

_EIGHT = np.ones((3, 3), dtype=bool)


def safe_ratio(num: float, den: float) -> float:
    """Return ``num / den``, with ``0 / 0`` defined as ``1.0`` (the empty-vs-empty rule).

    Raises:
        ValueError: ``den == 0`` while ``num != 0`` (impossible for count ratios).
    """
    if den == 0:
        if num != 0:
            raise ValueError(f"safe_ratio: {num} / 0 is undefined")
        return 1.0
    return float(num) / float(den)


def confusion_matrix(truth: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Confusion matrix of two class-index maps (unlabelled truth pixels left out).

    Args:
        truth: ``(...)`` integer class indexes in ``0 .. n_classes-1``, or
            :data:`~mitoseg.labels.IGNORE_INDEX` for an unlabelled pixel.
        pred: same shape as ``truth``, integer class indexes.
        n_classes: number of classes, background included (``>= 2``).

    Returns:
        ``(n_classes, n_classes)`` int64 array, ``cm[t, p]`` = number of labelled pixels
        with truth class ``t`` predicted as class ``p``.

    Raises:
        ValueError: shapes differ, non-integer dtype, ``n_classes < 2`` or a value outside
            ``0 .. n_classes-1`` (``IGNORE_INDEX`` is allowed in ``truth`` only).
    """
    truth = np.asarray(truth)
    pred = np.asarray(pred)
    if n_classes < 2:
        raise ValueError(f"confusion_matrix: n_classes must be >= 2, got {n_classes}")
    if truth.shape != pred.shape:
        raise ValueError(
            f"confusion_matrix: truth shape {truth.shape} != prediction shape {pred.shape}"
        )
    for name, arr in (("truth", truth), ("prediction", pred)):
        if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
            raise ValueError(
                f"confusion_matrix: {name} must be integer class indexes, got {arr.dtype}"
            )
    keep = labelled(truth) if np.issubdtype(truth.dtype, np.integer) else None
    if keep is not None and not keep.all():
        truth, pred = truth[keep], pred[keep]
    for name, arr in (("truth", truth), ("prediction", pred)):
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= n_classes):
            allowed = f"0..{n_classes - 1}" + (f" or {IGNORE_INDEX}" if name == "truth" else "")
            raise ValueError(
                f"confusion_matrix: {name} has values in [{int(arr.min())}, {int(arr.max())}], "
                f"expected {allowed}"
            )
    flat = truth.astype(np.int64).ravel() * n_classes + pred.astype(np.int64).ravel()
    counts = np.bincount(flat, minlength=n_classes * n_classes)
    return counts.reshape(n_classes, n_classes)


def _class_scores(cm: np.ndarray, k: int) -> dict[str, float]:
    tp = int(cm[k, k])
    fp = int(cm[:, k].sum()) - tp
    fn = int(cm[k, :].sum()) - tp
    return {
        "iou": safe_ratio(tp, tp + fp + fn),
        "dice": safe_ratio(2 * tp, 2 * tp + fp + fn),
        "precision": safe_ratio(tp, tp + fp),
        "recall": safe_ratio(tp, tp + fn),
    }


def scores_from_confusion(
    cm: np.ndarray, class_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Pixel scores from a confusion matrix.

    Args:
        cm: ``(C, C)`` integer confusion matrix (rows truth, columns prediction), ``C >= 2``.
        class_names: ``C`` names for ``per_class``; default ``class_0 .. class_{C-1}``.

    Returns:
        ``{"iou", "dice", "precision", "recall"}`` (foreground, see module docstring),
        ``"mean_iou"`` (all classes), ``"accuracy"`` (pixel accuracy), ``"fg_true"`` and
        ``"fg_pred"`` (foreground pixel counts, int), and ``"per_class"``:
        ``{name: {"iou", "dice", "precision", "recall"}}``. All scores are floats in [0, 1].

    Raises:
        ValueError: ``cm`` not square ``(C, C)`` with ``C >= 2``, negative, or names of
            the wrong length.
    """
    cm = check_array(cm, "scores_from_confusion", ndim=2, axes={2: "(C, C)"})
    if cm.shape[0] != cm.shape[1] or cm.shape[0] < 2:
        raise ValueError(
            f"scores_from_confusion: expected a (C, C) matrix with C >= 2, got {cm.shape}"
        )
    if (cm < 0).any():
        raise ValueError("scores_from_confusion: confusion matrix has negative counts")
    n = cm.shape[0]
    names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(n)]
    if len(names) != n:
        raise ValueError(
            f"scores_from_confusion: {len(names)} class names for a {n}-class confusion matrix"
        )
    per_class = {names[k]: _class_scores(cm, k) for k in range(n)}
    fg = [per_class[names[k]] for k in range(1, n)]
    out: dict[str, Any] = {
        key: float(np.mean([s[key] for s in fg])) for key in ("iou", "dice", "precision", "recall")
    }
    out["mean_iou"] = float(np.mean([s["iou"] for s in per_class.values()]))
    out["accuracy"] = safe_ratio(int(np.trace(cm)), int(cm.sum()))
    out["fg_true"] = int(cm[1:, :].sum())
    out["fg_pred"] = int(cm[:, 1:].sum())
    out["per_class"] = per_class
    return out


def label_objects(mask: np.ndarray, min_object_size: int = 0) -> tuple[np.ndarray, int]:
    """Connected components (8-connectivity) of the foreground of a 2D mask.

    Args:
        mask: ``(H, W)`` class indexes or booleans; foreground is ``mask != 0`` and
            labelled (``!= IGNORE_INDEX``).
        min_object_size: components with fewer pixels are dropped.

    Returns:
        ``(labels (H, W) int32, n)``: labels ``1 .. n`` numbered consecutively, 0 elsewhere.

    Raises:
        ValueError: ``mask`` not 2D or ``min_object_size < 0``.
    """
    from scipy import ndimage

    mask = check_array(mask, "label_objects", ndim=2)
    if min_object_size < 0:
        raise ValueError(f"label_objects: min_object_size must be >= 0, got {min_object_size}")
    fg = mask != 0 if mask.dtype == bool else (mask != 0) & labelled(mask)
    labels, n = ndimage.label(fg, structure=_EIGHT)
    labels = labels.astype(np.int32)
    if n and min_object_size > 0:
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        keep = sizes >= min_object_size
        keep[0] = False
        relabel = np.zeros(n + 1, dtype=np.int32)
        relabel[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
        labels = relabel[labels]
        n = int(keep.sum())
    return labels, int(n)


def match_objects(
    truth_labels: np.ndarray,
    n_true: int,
    pred_labels: np.ndarray,
    n_pred: int,
    iou_threshold: float = MATCH_IOU,
) -> list[tuple[int, int, float]]:
    """One-to-one matching of labelled objects by IoU.

    Args:
        truth_labels: ``(H, W)`` int labels ``0 .. n_true`` (0 = background).
        n_true: number of truth objects.
        pred_labels: ``(H, W)`` int labels ``0 .. n_pred``.
        n_pred: number of predicted objects.
        iou_threshold: minimum IoU of a match.

    Returns:
        ``[(truth_label, pred_label, iou), ...]`` sorted by decreasing IoU; each label
        appears at most once.
    """
    if truth_labels.shape != pred_labels.shape:
        raise ValueError(
            f"match_objects: truth labels {truth_labels.shape} != prediction labels "
            f"{pred_labels.shape}"
        )
    if n_true == 0 or n_pred == 0:
        return []
    t = truth_labels.ravel().astype(np.int64)
    p = pred_labels.ravel().astype(np.int64)
    size_t = np.bincount(t, minlength=n_true + 1)
    size_p = np.bincount(p, minlength=n_pred + 1)
    both = (t > 0) & (p > 0)
    pair, inter = np.unique(t[both] * (n_pred + 1) + p[both], return_counts=True)
    ti, pi = pair // (n_pred + 1), pair % (n_pred + 1)
    ious = inter / (size_t[ti] + size_p[pi] - inter)
    order = np.lexsort((pi, ti, -ious))
    used_t: set[int] = set()
    used_p: set[int] = set()
    matches: list[tuple[int, int, float]] = []
    for j in order:
        if ious[j] < iou_threshold:
            break
        a, b = int(ti[j]), int(pi[j])
        if a in used_t or b in used_p:
            continue
        used_t.add(a)
        used_p.add(b)
        matches.append((a, b, float(ious[j])))
    return matches


def object_counts(
    truth: np.ndarray, pred: np.ndarray, min_object_size: int = 0, iou_threshold: float = MATCH_IOU
) -> tuple[int, int, int]:
    """Object counts of one 2D slice.

    Args:
        truth: ``(H, W)`` class indexes (foreground = non-zero; ``IGNORE_INDEX`` =
            unlabelled, see the module docstring for objects on unlabelled pixels).
        pred: ``(H, W)`` class indexes.
        min_object_size: objects with fewer pixels are ignored in both.
        iou_threshold: IoU needed for a match.

    Returns:
        ``(n_true, n_pred, n_matched)``.
    """
    truth = np.asarray(truth)
    pred = np.asarray(pred)
    if truth.shape != pred.shape:
        raise ValueError(
            f"object_counts: truth shape {truth.shape} != prediction shape {pred.shape}"
        )
    lt, nt = label_objects(truth, min_object_size)
    lp, np_ = label_objects(pred, min_object_size)
    if truth.dtype != bool and np_:
        lp, np_ = labelled_part(lp, np_, labelled(truth))
    return nt, np_, len(match_objects(lt, nt, lp, np_, iou_threshold))


def labelled_part(labels: np.ndarray, n: int, keep: np.ndarray) -> tuple[np.ndarray, int]:
    """Predicted objects cut to the labelled pixels (the module docstring's rule).

    Args:
        labels: object labels ``1 .. n`` (0 = none), any shape (2D or 3D).
        n: number of objects.
        keep: bool array of ``labels``' shape, True on labelled truth pixels
            (:func:`mitoseg.labels.labelled`).

    Returns:
        ``(labels, n')``: objects without a kept pixel dropped, the others renumbered
        ``1 .. n'`` in order (int32; the input itself when every pixel is kept).
    """
    if keep.all():
        return labels, n
    cut = np.where(keep, labels, 0)
    present = np.zeros(n + 1, dtype=bool)
    present[np.unique(cut)] = True
    present[0] = False
    relabel = np.zeros(n + 1, dtype=np.int32)
    relabel[present] = np.arange(1, int(present.sum()) + 1, dtype=np.int32)
    return relabel[cut], int(present.sum())


def object_scores(n_true: int, n_pred: int, n_matched: int) -> dict[str, float | int]:
    """Object precision / recall / F1 from counts (``0 / 0`` is 1.0).

    Returns:
        ``{"n_true", "n_pred", "n_matched", "precision", "recall", "f1"}``.
    """
    precision = safe_ratio(n_matched, n_pred)
    recall = safe_ratio(n_matched, n_true)
    return {
        "n_true": int(n_true),
        "n_pred": int(n_pred),
        "n_matched": int(n_matched),
        "precision": precision,
        "recall": recall,
        "f1": safe_ratio(2 * n_matched, n_true + n_pred),
    }


def evaluate_masks(
    truth: np.ndarray,
    pred: np.ndarray,
    n_classes: int,
    class_names: Sequence[str] | None = None,
    min_object_size: int = 0,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Aggregate and per-slice scores of a predicted stack against its ground truth.

    Args:
        truth: ``(Z, H, W)`` or ``(H, W)`` integer class indexes.
        pred: same shape, integer class indexes.
        n_classes: classes including background.
        class_names: ``n_classes`` names (default ``class_0 ..``).
        min_object_size: object filter in pixels for the object counts.

    Returns:
        ``(summary, rows)``. ``summary`` has ``iou, mean_iou, dice, accuracy, precision,
        recall`` (from the summed confusion matrix), ``per_class``, ``confusion`` (nested
        list), ``objects`` (see :func:`object_scores`, plus ``min_object_size`` and
        ``match_iou``), ``slice_mean`` (mean of the per-slice ``iou, dice, accuracy,
        precision, recall, mean_iou``) and ``n_slices``. ``rows`` has one dict per slice with
        ``slice, iou, dice, accuracy, precision, recall, mean_iou, fg_true, fg_pred,
        objects_true, objects_pred, objects_matched, labelled_pixels``. Unlabelled truth
        pixels (``IGNORE_INDEX``) count nowhere; slices with ``labelled_pixels == 0`` are
        left out of ``slice_mean`` (``n_labelled_slices`` counts the others).

    Raises:
        ValueError: shapes differ, wrong rank, or values out of range.
    """
    truth = np.asarray(truth)
    pred = np.asarray(pred)
    if truth.shape != pred.shape:
        raise ValueError(
            f"evaluate_masks: truth shape {truth.shape} != prediction shape {pred.shape}"
        )
    truth = check_stack(truth, "evaluate_masks", nonempty=True)
    pred = check_stack(pred, "evaluate_masks")
    total = np.zeros((n_classes, n_classes), dtype=np.int64)
    rows: list[dict[str, Any]] = []
    obj = np.zeros(3, dtype=np.int64)
    for z in range(truth.shape[0]):
        cm = confusion_matrix(truth[z], pred[z], n_classes)
        total += cm
        s = scores_from_confusion(cm, class_names)
        counts = object_counts(truth[z], pred[z], min_object_size)
        obj += counts
        rows.append(
            {
                "slice": z,
                **{k: s[k] for k in SCORE_NAMES},
                "mean_iou": s["mean_iou"],
                "fg_true": s["fg_true"],
                "fg_pred": s["fg_pred"],
                "objects_true": counts[0],
                "objects_pred": counts[1],
                "objects_matched": counts[2],
                "labelled_pixels": int(cm.sum()),
            }
        )
    agg = scores_from_confusion(total, class_names)
    summary: dict[str, Any] = {
        k: agg[k] for k in ("iou", "mean_iou", "dice", "accuracy", "precision", "recall")
    }
    summary["per_class"] = agg["per_class"]
    summary["confusion"] = total.tolist()
    summary["objects"] = {
        **object_scores(int(obj[0]), int(obj[1]), int(obj[2])),
        "min_object_size": int(min_object_size),
        "match_iou": MATCH_IOU,
    }
    scored = [r for r in rows if r["labelled_pixels"] > 0]
    summary["slice_mean"] = {
        k: float(np.mean([r[k] for r in scored])) if scored else float("nan")
        for k in (*SCORE_NAMES, "mean_iou")
    }
    summary["n_slices"] = len(rows)
    summary["n_labelled_slices"] = len(scored)
    return summary, rows
