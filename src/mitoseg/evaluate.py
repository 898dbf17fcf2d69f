"""Whole-slice evaluation: threshold choice, test metrics, per-slice table and figures.

Why one module of about 600 lines: threshold search, metrics, tables and figures all read
the same :class:`EvaluationResult` of one pass over the test slices.

Slices are segmented with the same tiled inference as ``mitoseg predict`` and the service
(:func:`mitoseg.inference.predict.segment_stack`); scores come from :mod:`mitoseg.metrics`.

Figure colours (overlay panel, drawn over the grey input at 50 % opacity):

* green: true positive, foreground predicted with the right class;
* red: false positive, foreground predicted where the truth is background or another
  class;
* blue: false negative, truth foreground predicted as background.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mitoseg.checks import check_stack
from mitoseg.data.patches import map_mask_to_classes
from mitoseg.inference.normalize import normalize_slice
from mitoseg.inference.plan import Calibration, InferencePlan, foreground_class
from mitoseg.inference.predict import decide_mask, iter_stack_probabilities
from mitoseg.io import DataError, atomic_dir, atomic_path, write_json
from mitoseg.labels import labelled
from mitoseg.metrics import evaluate_masks, labelled_part

__all__ = [
    "OVERLAY_COLORS",
    "PER_SLICE_COLUMNS",
    "THRESHOLD_BINS",
    "EvaluationResult",
    "ProbabilityHistogram",
    "ThresholdChoice",
    "choose_threshold",
    "evaluate_stack",
    "instance_metrics",
    "masks_to_indices",
    "write_figures",
    "write_outputs",
]

#: Columns of ``per_slice.csv`` (one row per slice with a labelled pixel).
PER_SLICE_COLUMNS: tuple[str, ...] = (
    "slice",
    "iou",
    "dice",
    "accuracy",
    "precision",
    "recall",
    "fg_true",
    "fg_pred",
    "labelled_pixels",
)

#: RGB colours of the overlay panel.
OVERLAY_COLORS: dict[str, tuple[float, float, float]] = {
    "tp": (0.0, 0.8, 0.0),
    "fp": (1.0, 0.0, 0.0),
    "fn": (0.0, 0.3, 1.0),
}


@dataclass
class EvaluationResult:
    """Outcome of :func:`evaluate_stack`.

    Attributes:
        metrics: the ``metrics.json`` content (see :func:`evaluate_stack`).
        rows: one dict per slice (``PER_SLICE_COLUMNS`` plus object counts).
        predictions: ``(Z, H, W)`` uint8 predicted class indexes.
        images: ``(Z, H, W)`` the evaluated raw images (a reference, not a copy).
        masks: ``(Z, H, W)`` ground-truth class indexes.
    """

    metrics: dict[str, Any]
    rows: list[dict[str, Any]]
    predictions: np.ndarray
    images: np.ndarray
    masks: np.ndarray


def masks_to_indices(
    masks: np.ndarray, value_to_index: Mapping[int, int], source: str
) -> np.ndarray:
    """Map raw mask values to class indexes with a class table.

    Args:
        masks: ``(Z, H, W)`` or ``(H, W)`` integer raw mask values (e.g. 0/255).
        value_to_index: raw value -> class index (``BaseConfig.value_to_index()``).
        source: file name used in error messages.

    Returns:
        uint8 class indexes, same shape.

    Raises:
        DataError: non-integer masks, or a value missing from the table (the message names
            ``source``, the slice holding it and the allowed values).
    """
    masks = np.asarray(masks)
    if not np.issubdtype(masks.dtype, np.integer):
        raise DataError(f"{source}: masks must be integer values, got dtype {masks.dtype}")
    stack = masks[None] if masks.ndim == 2 else masks
    mapped = [
        map_mask_to_classes(s, dict(value_to_index), where=f"{source} slice {z}")
        for z, s in enumerate(stack)
    ]
    return np.stack(mapped).reshape(masks.shape) if mapped else masks.astype(np.uint8)


def _check_pair(images: np.ndarray, masks: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    images = check_stack(images, f"{what}: images", nonempty=True)
    masks = check_stack(masks, f"{what}: masks")
    if images.shape != masks.shape:
        raise ValueError(f"{what}: images shape {images.shape} != masks shape {masks.shape}")
    return images, masks


def _check_classes(channels: int, n_classes: int) -> None:
    expected = 1 if n_classes == 2 else n_classes
    if channels != expected:
        raise ValueError(
            f"model outputs {channels} channel(s) but the class table has {n_classes} classes "
            f"(expected {expected} output channel(s))"
        )


#: Resolution of the threshold search: candidate thresholds are multiples of 1/BINS.
THRESHOLD_BINS = 1000


class ProbabilityHistogram:
    """Foreground/background pixel counts per probability bin (binary models).

    Accumulates, for ``bins`` equal-width bins of the foreground probability, how many
    true-foreground and true-background pixels fall in each, and their summed
    probabilities. From that, IoU at every threshold ``k / bins`` and calibration figures
    are exact sums, so a fine threshold search costs one pass over the probabilities.

    Args:
        bins: number of bins (threshold resolution ``1 / bins``).
    """

    def __init__(self, bins: int = THRESHOLD_BINS) -> None:
        if bins < 2:
            raise ValueError(f"ProbabilityHistogram: bins must be >= 2, got {bins}")
        self.bins = bins
        self.fg = np.zeros(bins, dtype=np.int64)
        self.bg = np.zeros(bins, dtype=np.int64)
        self.psum = np.zeros(bins, dtype=np.float64)
        self.sq_err = 0.0

    @property
    def pixels(self) -> int:
        """Pixels added so far."""
        return int(self.fg.sum() + self.bg.sum())

    def add(self, probs: np.ndarray, truth: np.ndarray) -> None:
        """Add one slice.

        Args:
            probs: ``(H, W)`` or ``(H, W, 1)`` float foreground probabilities in [0, 1].
            truth: ``(H, W)`` class indexes 0/1; unlabelled pixels (``IGNORE_INDEX``) are
                not added.

        Raises:
            ValueError: shapes differ, or more than one probability channel.
        """
        p = np.asarray(probs, dtype=np.float64)
        if p.ndim == 3:
            if p.shape[-1] != 1:
                raise ValueError(
                    f"ProbabilityHistogram: expected one probability channel, got {p.shape[-1]}"
                )
            p = p[..., 0]
        truth = np.asarray(truth)
        if p.shape != truth.shape:
            raise ValueError(f"ProbabilityHistogram: probs {p.shape} != truth {truth.shape}")
        keep = labelled(truth)
        p, t = p[keep], truth[keep] != 0
        idx = np.clip(np.floor(p * self.bins).astype(np.int64), 0, self.bins - 1)
        tf = t
        self.fg += np.bincount(idx[tf], minlength=self.bins)
        self.bg += np.bincount(idx[~tf], minlength=self.bins)
        self.psum += np.bincount(idx, weights=p.ravel(), minlength=self.bins)
        self.sq_err += float(((p.ravel() - tf) ** 2).sum())

    def iou_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """Foreground IoU at every threshold ``k / bins``, ``k = 1 .. bins - 1``.

        Returns:
            ``(thresholds, iou)``: two ``(bins - 1,)`` float64 arrays. IoU is 1 where
            truth and prediction are both empty.
        """
        tp = np.cumsum(self.fg[::-1])[::-1][1:]  # pixels with bin >= k are predicted fg
        fp = np.cumsum(self.bg[::-1])[::-1][1:]
        fn = self.fg.sum() - tp
        denom = tp + fp + fn
        iou = np.where(denom > 0, tp / np.maximum(denom, 1), 1.0)
        return np.arange(1, self.bins) / self.bins, iou.astype(np.float64)

    def calibration(self, n_bins: int = 10) -> Calibration:
        """Expected calibration error, Brier score and the reliability table.

        Args:
            n_bins: reliability bins (must divide ``bins``).

        Raises:
            ValueError: ``n_bins`` does not divide ``bins``, or nothing was added.
        """
        if n_bins < 1 or self.bins % n_bins:
            raise ValueError(f"calibration: n_bins {n_bins} must divide bins {self.bins}")
        total = self.pixels
        if total == 0:
            raise ValueError("calibration: no pixels were added")
        group = self.bins // n_bins
        fg = self.fg.reshape(n_bins, group).sum(1)
        n = (self.fg + self.bg).reshape(n_bins, group).sum(1)
        ps = self.psum.reshape(n_bins, group).sum(1)
        rows, ece = [], 0.0
        for b in range(n_bins):
            if n[b] == 0:
                continue
            conf, freq, share = ps[b] / n[b], fg[b] / n[b], n[b] / total
            ece += share * abs(conf - freq)
            rows.append([round(b / n_bins, 6), round(conf, 6), round(freq, 6), round(share, 6)])
        return Calibration(
            ece=round(float(ece), 6),
            brier=round(self.sq_err / total, 6),
            bins=n_bins,
            reliability=rows,
            pixels=total,
        )


@dataclass
class ThresholdChoice:
    """Outcome of :func:`choose_threshold`.

    Attributes:
        threshold: the chosen foreground threshold.
        iou: validation IoU at that threshold.
        curve: ``{threshold: iou}`` at every 0.05 step (for reports and plots).
        calibration: calibration of the validation probabilities.
    """

    threshold: float
    iou: float
    curve: dict[str, float]
    calibration: Calibration


def choose_threshold(
    model_or_fn: Any,
    val_images: np.ndarray,
    val_masks: np.ndarray,
    plan: InferencePlan,
    *,
    bins: int = THRESHOLD_BINS,
    progress: bool = False,
) -> ThresholdChoice:
    """Pick the foreground threshold that maximises IoU on whole validation slices.

    The validation probabilities are computed once with ``plan`` (its threshold is not
    used); IoU is evaluated at every multiple of ``1 / bins`` from the pixel counts
    summed over all validation slices (:class:`ProbabilityHistogram`). Ties are broken
    towards 0.5, then towards the lower threshold. Binary (sigmoid) models only: softmax
    models use argmax and need no threshold.

    Args:
        model_or_fn: Keras model or batch-predict callable with one output channel.
        val_images: ``(Z, H, W)`` raw validation slices (uint8/uint16).
        val_masks: ``(Z, H, W)`` class indexes 0/1.
        plan: how to run the model (tiling, normalisation, engine).
        bins: threshold resolution ``1 / bins``.
        progress: show a progress bar.

    Returns:
        :class:`ThresholdChoice`.

    Raises:
        ValueError: shape mismatch, a model with more than one output channel.
    """
    images, masks = _check_pair(val_images, val_masks, "choose_threshold")
    hist = ProbabilityHistogram(bins)
    probs_iter = iter_stack_probabilities(
        model_or_fn, images, plan, progress=progress, description="validation slices"
    )
    for z, probs in enumerate(probs_iter):
        if probs.shape[-1] != 1:
            raise ValueError(
                f"choose_threshold: the model has {probs.shape[-1]} output channels; thresholds "
                "apply only to binary (sigmoid) models, multiclass uses argmax"
            )
        hist.add(probs, masks[z])
    thresholds, ious = hist.iou_curve()
    best = float(ious.max())
    ties = thresholds[ious >= best - 1e-12]
    threshold = float(min(ties, key=lambda g: (abs(g - 0.5), g)))
    step = max(1, bins // 20)
    curve = {
        f"{thresholds[i]:g}": round(float(ious[i]), 6) for i in range(step - 1, bins - 1, step)
    }
    return ThresholdChoice(
        threshold=threshold, iou=best, curve=curve, calibration=hist.calibration()
    )


def evaluate_stack(
    model_or_fn: Any,
    images: np.ndarray,
    masks: np.ndarray,
    plan: InferencePlan,
    progress: bool = False,
) -> EvaluationResult:
    """Segment a labelled stack exactly as ``plan`` says and score it.

    Args:
        model_or_fn: Keras model (run on the plan's engine) or batch-predict callable
            (``C = 1`` sigmoid for 2 classes, ``C = n_classes`` softmax otherwise).
        images: ``(Z, H, W)`` (or ``(H, W)``) raw uint8/uint16 slices.
        masks: same shape, ground-truth class indexes ``0 .. n_classes-1``.
        plan: the inference plan (class table, threshold, tiling, ``min_object_size``).
        progress: show a progress bar.

    Returns:
        :class:`EvaluationResult` whose ``metrics`` has ``iou, mean_iou, dice, accuracy,
        precision, recall`` (aggregated over all pixels; foreground scores are the macro
        mean over foreground classes for multiclass), ``threshold`` (None for multiclass),
        ``n_test_slices``, ``objects`` (per-slice 2D objects), ``instances`` (3D objects,
        :func:`instance_metrics`), ``per_class``, ``slice_mean``, ``confusion``,
        ``class_names``, ``tile_size``, ``halo``, ``tta``, ``engine``, ``calibration``
        (binary), ``inference_seconds`` and ``pixels_per_second``.

    Raises:
        ValueError: shape mismatch, or model outputs not matching the plan's classes.
    """
    images, masks = _check_pair(images, masks, "evaluate_stack")
    n_classes = plan.n_classes
    preds = np.zeros(images.shape, dtype=np.uint8)
    hist = ProbabilityHistogram() if n_classes == 2 else None
    start = time.perf_counter()
    probs_iter = iter_stack_probabilities(
        model_or_fn, images, plan, progress=progress, description="test slices"
    )
    for z, probs in enumerate(probs_iter):
        _check_classes(probs.shape[-1], n_classes)
        preds[z] = decide_mask(probs, plan)
        if hist is not None:
            hist.add(probs, masks[z])
    seconds = time.perf_counter() - start
    summary, rows = evaluate_masks(masks, preds, n_classes, plan.class_names, plan.min_object_size)
    metrics: dict[str, Any] = {
        key: summary[key] for key in ("iou", "mean_iou", "dice", "accuracy", "precision", "recall")
    }
    metrics["threshold"] = plan.threshold
    metrics["n_test_slices"] = int(images.shape[0])
    metrics["objects"] = summary["objects"]
    instances = instance_metrics(masks, preds, plan.class_names, plan.min_object_size)
    if instances is not None:
        metrics["instances"] = instances
    metrics["per_class"] = summary["per_class"]
    metrics["slice_mean"] = summary["slice_mean"]
    metrics["confusion"] = summary["confusion"]
    metrics["class_names"] = list(plan.class_names)
    metrics["tile_size"] = plan.tile_size
    metrics["halo"] = plan.halo
    metrics["tta"] = plan.tta
    metrics["engine"] = f"{plan.runtime}/{plan.precision}"
    if hist is not None and hist.pixels:
        metrics["calibration"] = hist.calibration().model_dump()
    metrics["inference_seconds"] = round(seconds, 3)
    metrics["pixels_per_second"] = round(images.size / seconds, 1) if seconds > 0 else None
    return EvaluationResult(
        metrics=metrics, rows=rows, predictions=preds, images=images, masks=masks
    )


def predicted_objects(
    result: EvaluationResult,
    class_names: list[str],
    min_object_size: int = 0,
    voxel_size: Any = None,
) -> list[dict[str, Any]]:
    """Measurement rows (:func:`mitoseg.inference.objects.measure_objects`) of the
    predicted 3D objects of the test stack: the 26-connected components of the
    mitochondria class (:func:`mitoseg.inference.plan.foreground_class`), smaller than
    ``min_object_size`` voxels dropped, with the raw images' mean intensity and, with
    ``voxel_size`` (``(z, y, x)`` nm), volumes; empty for a table without a mitochondria
    class."""
    from mitoseg.inference.objects import instance_labels, measure_objects

    k = foreground_class(class_names)
    if k is None:
        return []
    labels, _ = instance_labels(np.asarray(result.predictions) == k, min_object_size)
    return measure_objects(labels, result.images, voxel_size)


def instance_metrics(
    truth: np.ndarray,
    pred: np.ndarray,
    class_names: list[str],
    min_object_size: int = 0,
) -> dict[str, Any] | None:
    """3D instance metrics of a predicted stack (MitoEM-style, :mod:`mitoseg.inference.objects`).

    The objects are the 26-connected components of the mitochondria class
    (:func:`mitoseg.inference.plan.foreground_class`) in truth and
    prediction, smaller than ``min_object_size`` voxels dropped from both, matched
    one-to-one at IoU 0.5 and 0.75. Predicted objects are cut to the labelled truth voxels
    (:func:`mitoseg.metrics.labelled_part`: one only on unlabelled voxels does not count).

    Args:
        truth: ``(Z, H, W)`` ground-truth class indexes.
        pred: ``(Z, H, W)`` predicted class indexes.
        class_names: class names in index order.
        min_object_size: object filter, voxels.

    Returns:
        :func:`mitoseg.inference.objects.instance_scores` plus ``class``, ``min_object_size`` and
        ``connectivity``; None for a multiclass table without a ``mitochondria`` class.
    """
    from mitoseg.inference.objects import instance_labels, instance_scores

    k = foreground_class(class_names)
    if k is None:
        return None
    truth = np.asarray(truth)
    truth_labels, _ = instance_labels(truth == k, min_object_size)
    pred_labels, n_pred = instance_labels(np.asarray(pred) == k, min_object_size)
    pred_labels, _ = labelled_part(pred_labels, n_pred, labelled(truth))
    scores = instance_scores(truth_labels, pred_labels)
    return {
        "class": class_names[k],
        **scores,
        "min_object_size": int(min_object_size),
        "connectivity": 26,
    }


def _overlay(gray: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` float RGB: grey input with TP/FP/FN coloured (see module docstring)."""
    rgb = np.repeat(gray[..., None], 3, axis=-1).astype(np.float32)
    known = labelled(truth)
    tp = (pred != 0) & (pred == truth)
    fp = (pred != 0) & (pred != truth) & known
    fn = (truth != 0) & (pred == 0) & known
    for sel, key in ((tp, "tp"), (fp, "fp"), (fn, "fn")):
        rgb[sel] = 0.5 * rgb[sel] + 0.5 * np.asarray(OVERLAY_COLORS[key], dtype=np.float32)
    return rgb


def write_figures(
    images: np.ndarray,
    masks: np.ndarray,
    preds: np.ndarray,
    out_dir: str | Path,
    n: int,
    n_classes: int = 2,
) -> list[Path]:
    """Save ``n`` evenly spaced slices as 4-panel PNGs (input, truth, prediction, overlay).

    Args:
        images: ``(Z, H, W)`` raw slices.
        masks: ``(Z, H, W)`` ground-truth class indexes.
        preds: ``(Z, H, W)`` predicted class indexes.
        out_dir: directory for ``slice_XXX.png`` files (created).
        n: number of slices to draw (capped at Z; 0 draws none).
        n_classes: classes including background (colour scale of the mask panels).

    Returns:
        The written PNG paths, in slice order.

    Raises:
        ValueError: shapes differ or ``n < 0``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if n < 0:
        raise ValueError(f"write_figures: n must be >= 0, got {n}")
    images, masks = _check_pair(images, masks, "write_figures")
    preds = np.asarray(preds)
    if preds.ndim == 2:
        preds = preds[None]
    if preds.shape != masks.shape:
        raise ValueError(
            f"write_figures: predictions shape {preds.shape} != masks shape {masks.shape}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    z_count = images.shape[0]
    picks = (
        sorted({round(float(v)) for v in np.linspace(0, z_count - 1, min(n, z_count))}) if n else []
    )
    cmap = "gray" if n_classes == 2 else "tab10"
    paths: list[Path] = []
    for z in picks:
        gray = normalize_slice(images[z])
        height, width = images.shape[1:]
        fig = Figure(figsize=(16, 4 * height / width + 0.6), dpi=80)
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, 4)
        panels = (
            ("input", gray, "gray", 0, 1),
            ("ground truth", masks[z], cmap, 0, n_classes - 1),
            ("prediction", preds[z], cmap, 0, n_classes - 1),
        )
        for ax, (title, arr, cm, lo, hi) in zip(axes[:3], panels, strict=True):
            ax.imshow(arr, cmap=cm, vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_title(f"slice {z}: {title}")
        axes[3].imshow(_overlay(gray, masks[z], preds[z]), interpolation="nearest")
        axes[3].set_title("overlay: TP green, FP red, FN blue")
        for ax in axes:
            ax.set_axis_off()
        fig.tight_layout()
        path = out / f"slice_{z:03d}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
        paths.append(path)
    return paths


def write_outputs(
    result: EvaluationResult,
    out_dir: str | Path,
    n_figures: int = 3,
    *,
    min_object_size: int = 0,
    voxel_size: Any = None,
) -> dict[str, Any]:
    """Write ``metrics.json``, ``per_slice.csv``, ``objects.csv`` and ``figures/`` into
    ``out_dir``.

    ``per_slice.csv`` has a row for each slice with a labelled pixel (``labelled_pixels``
    column); slices without one (unlabelled context slices of sparse labels) are not scored
    and have no row.

    Each output is replaced atomically (the figures directory as a whole).

    Args:
        result: from :func:`evaluate_stack`.
        out_dir: output directory (created).
        n_figures: slices drawn into ``figures/``.
        min_object_size: smallest predicted object in ``objects.csv``, voxels.
        voxel_size: ``(z, y, x)`` nm of the test stack (physical columns of
            ``objects.csv``), or None.

    Returns:
        ``{"metrics": Path, "per_slice": Path, "objects": Path, "figures": [Path, ...]}``.
    """
    from mitoseg.inference.objects import write_object_table

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.json"
    write_json(metrics_path, result.metrics)
    csv_path = out / "per_slice.csv"
    with atomic_path(csv_path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(PER_SLICE_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        for row in result.rows:
            if row["labelled_pixels"] == 0:
                continue  # not scored (context slice): its 0/0 scores would read as 1.0
            writer.writerow(
                {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
            )
    n_classes = len(result.metrics.get("class_names") or [0, 1])
    with atomic_dir(out / "figures") as tmp_dir:
        written = write_figures(
            result.images, result.masks, result.predictions, tmp_dir, n_figures, n_classes
        )
    figures = [out / "figures" / p.name for p in written]
    names = list(result.metrics.get("class_names") or ["background", "mitochondria"])
    objects_path = write_object_table(
        out / "objects.csv", predicted_objects(result, names, min_object_size, voxel_size)
    )
    return {
        "metrics": metrics_path,
        "per_slice": csv_path,
        "objects": objects_path,
        "figures": figures,
    }
