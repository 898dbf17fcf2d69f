"""Evaluation: threshold choice, calibration, metrics and outputs (no keras).

Images hold three grey levels 0 / 100 / 200 in equal shares, so ``normalize_slice`` maps
them exactly to 0 / 0.5 / 1; the "model" predicts ``0.8 * x`` per pixel, i.e. 0 / 0.4 / 0.8,
and the truth is foreground where the grey level is >= 100. Thresholds <= 0.4 are then
perfect and thresholds in (0.4, 0.8] find only the 200-pixels.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from mitoseg.evaluate import (
    OVERLAY_COLORS,
    PER_SLICE_COLUMNS,
    ProbabilityHistogram,
    _overlay,
    choose_threshold,
    evaluate_stack,
    masks_to_indices,
    predicted_objects,
    write_figures,
    write_outputs,
)
from mitoseg.inference.plan import InferencePlan
from mitoseg.io import DataError

PLAN = InferencePlan(
    n_classes=2,
    class_names=["background", "mito"],
    tile_size=16,
    halo=4,
    batch_size=16,
    threshold=0.5,
    min_object_size=0,
)
PLAN3 = InferencePlan.model_validate(
    {**PLAN.model_dump(), "n_classes": 3, "class_names": ["bg", "a", "b"], "threshold": None}
)
METRIC_KEYS = {
    "iou",
    "mean_iou",
    "dice",
    "accuracy",
    "precision",
    "recall",
    "threshold",
    "n_test_slices",
    "objects",
    "instances",
    "per_class",
    "slice_mean",
    "confusion",
    "class_names",
    "tile_size",
    "halo",
    "tta",
    "engine",
    "calibration",
    "inference_seconds",
    "pixels_per_second",
}


def three_level_stack(z: int, h: int = 24, w: int = 30, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    levels = np.repeat(np.array([0, 100, 200], dtype=np.uint8), (h * w) // 3)
    return np.stack([rng.permutation(levels).reshape(h, w) for _ in range(z)])


def sigmoid_model(batch: np.ndarray) -> np.ndarray:
    return 0.8 * batch


def softmax_model(batch: np.ndarray) -> np.ndarray:
    """One-hot over 3 classes by grey level (0 -> 0, 0.5 -> 1, 1 -> 2)."""
    idx = np.rint(batch[..., 0] * 2).astype(int)
    return np.eye(3, dtype=np.float32)[idx]


def test_masks_to_indices() -> None:
    raw = np.array([[[0, 255], [1, 0]]], dtype=np.uint8)
    out = masks_to_indices(raw, {0: 0, 255: 1, 1: 1}, "m.tif")
    assert out.dtype == np.uint8 and out.tolist() == [[[0, 1], [1, 0]]]
    bad = np.zeros((3, 2, 2), dtype=np.uint16)
    bad[2, 0, 0] = 7
    with pytest.raises(DataError) as exc:
        masks_to_indices(bad, {0: 0, 255: 1}, "m.tif")
    assert str(exc.value) == (
        "m.tif slice 2: mask values [7] are not in the class table base.classes "
        "(allowed values: 0, 255)"
    )
    with pytest.raises(
        DataError, match=r"^m\.tif: masks must be integer values, got dtype float64$"
    ):
        masks_to_indices(np.zeros((2, 2)), {0: 0}, "m.tif")


def test_histogram_iou_curve_and_calibration_by_hand() -> None:
    hist = ProbabilityHistogram(bins=10)
    probs = np.array([[0.05, 0.35], [0.75, 0.95]])
    truth = np.array([[0, 1], [0, 1]])
    hist.add(probs[..., None], truth)
    thresholds, iou = hist.iou_curve()
    assert thresholds.tolist() == pytest.approx([k / 10 for k in range(1, 10)])
    # t <= 0.3: fg = {0.35, 0.75, 0.95}: TP 2, FP 1 -> 2/3; t in (0.3, 0.7]: TP 1, FP 1, FN 1
    # -> 1/3; t in (0.7, 0.9]: fg = {0.95}: TP 1, FN 1 -> 1/2
    assert iou.tolist() == pytest.approx([2 / 3] * 3 + [1 / 3] * 4 + [1 / 2] * 2)
    cal = hist.calibration(n_bins=2)
    # bin [0, 0.5): mean p 0.2, freq 0.5; bin [0.5, 1): mean p 0.85, freq 0.5
    assert cal.ece == pytest.approx(0.5 * 0.3 + 0.5 * 0.35)
    assert cal.brier == pytest.approx((0.05**2 + 0.65**2 + 0.75**2 + 0.05**2) / 4)
    assert np.allclose(cal.reliability, [[0.0, 0.2, 0.5, 0.5], [0.5, 0.85, 0.5, 0.5]])
    assert cal.pixels == 4 and cal.bins == 2


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: ProbabilityHistogram(bins=1), "ProbabilityHistogram: bins must be >= 2, got 1"),
        (
            lambda: ProbabilityHistogram().add(np.zeros((2, 2, 2)), np.zeros((2, 2))),
            "ProbabilityHistogram: expected one probability channel, got 2",
        ),
        (
            lambda: ProbabilityHistogram().add(np.zeros((2, 2)), np.zeros((2, 3))),
            "ProbabilityHistogram: probs (2, 2) != truth (2, 3)",
        ),
        (
            lambda: ProbabilityHistogram(bins=10).calibration(n_bins=3),
            "calibration: n_bins 3 must divide bins 10",
        ),
        (lambda: ProbabilityHistogram().calibration(), "calibration: no pixels were added"),
    ],
)
def test_histogram_errors(call, message: str) -> None:
    with pytest.raises(ValueError) as exc:
        call()
    assert str(exc.value) == message


def test_choose_threshold_finds_the_optimum_on_a_fine_grid() -> None:
    images = three_level_stack(2)
    masks = (images >= 100).astype(np.uint8)
    choice = choose_threshold(sigmoid_model, images, masks, PLAN)
    # predictions 0 / 0.4 / 0.8 (0.4 up to float32 rounding of the blending): thresholds up
    # to ~0.4 are perfect; ties go to the one nearest 0.5
    assert 0.399 <= choice.threshold <= 0.4
    scored = evaluate_stack(
        sigmoid_model, images, masks, PLAN.with_overrides(threshold=choice.threshold)
    )
    assert scored.metrics["iou"] == 1.0  # the histogram agrees with real thresholding
    assert choice.iou == 1.0
    assert choice.curve["0.5"] == pytest.approx(0.5) and choice.curve["0.35"] == 1.0
    assert choice.calibration.pixels == images.size
    strict = (images == 200).astype(np.uint8)  # only 0.8 is foreground: (0.4, 0.8] perfect
    assert choose_threshold(sigmoid_model, images, strict, PLAN).threshold == pytest.approx(0.5)


def test_choose_threshold_errors() -> None:
    images = three_level_stack(1)
    masks = (images >= 100).astype(np.uint8)
    with pytest.raises(
        ValueError,
        match=r"^choose_threshold: images shape \(1, 24, 30\) != masks shape \(1, 24, 29\)$",
    ):
        choose_threshold(sigmoid_model, images, masks[..., :29], PLAN)
    with pytest.raises(ValueError) as exc:
        choose_threshold(softmax_model, images, masks, PLAN3)
    assert str(exc.value) == (
        "choose_threshold: the model has 3 output channels; thresholds apply only to binary "
        "(sigmoid) models, multiclass uses argmax"
    )


def test_evaluate_stack_binary() -> None:
    images = three_level_stack(3, seed=1)
    masks = (images >= 100).astype(np.uint8)
    result = evaluate_stack(sigmoid_model, images, masks, PLAN)
    m = result.metrics
    assert set(m) == METRIC_KEYS
    # 0.5 finds the 200-pixels only: TP = 240, FN = 240, FP = 0 per slice
    assert m["iou"] == pytest.approx(0.5)
    assert m["dice"] == pytest.approx(2 / 3)
    assert m["precision"] == 1.0 and m["recall"] == pytest.approx(0.5)
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["threshold"] == 0.5 and m["n_test_slices"] == 3
    assert m["engine"] == "keras/fp32" and m["halo"] == 4
    assert set(m["per_class"]) == {"background", "mito"}
    assert m["slice_mean"]["iou"] == pytest.approx(0.5)
    assert result.predictions.shape == (3, 24, 30) and result.predictions.dtype == np.uint8
    assert np.array_equal(result.predictions, (images == 200).astype(np.uint8))
    assert [r["slice"] for r in result.rows] == [0, 1, 2]
    assert result.rows[0]["fg_true"] == 480 and result.rows[0]["fg_pred"] == 240
    perfect = evaluate_stack(sigmoid_model, images, masks, PLAN.with_overrides(threshold=0.3))
    assert perfect.metrics["iou"] == 1.0 and perfect.metrics["mean_iou"] == 1.0
    json.dumps(perfect.metrics)  # JSON-serialisable as is


def test_evaluate_stack_multiclass() -> None:
    images = three_level_stack(2, seed=2)
    masks = (images // 100).astype(np.uint8)
    result = evaluate_stack(softmax_model, images, masks, PLAN3)
    assert result.metrics["threshold"] is None and "calibration" not in result.metrics
    assert "instances" not in result.metrics  # no class named mitochondria
    assert result.metrics["iou"] == 1.0 and result.metrics["mean_iou"] == 1.0
    assert set(result.metrics["per_class"]) == {"bg", "a", "b"}
    assert np.array_equal(result.predictions, masks)


def test_evaluate_stack_errors() -> None:
    images = three_level_stack(1)
    masks = (images >= 100).astype(np.uint8)
    with pytest.raises(ValueError) as exc:
        evaluate_stack(sigmoid_model, images, masks, PLAN3)
    assert str(exc.value) == (
        "model outputs 1 channel(s) but the class table has 3 classes "
        "(expected 3 output channel(s))"
    )
    with pytest.raises(ValueError, match=r"^evaluate_stack: images shape"):
        evaluate_stack(sigmoid_model, images, masks[..., :3], PLAN)


def test_overlay_colours() -> None:
    gray = np.zeros((1, 4), dtype=np.float32)
    truth = np.array([[1, 0, 1, 0]])
    pred = np.array([[1, 1, 0, 0]])
    rgb = _overlay(gray, truth, pred)
    assert rgb.shape == (1, 4, 3)
    np.testing.assert_allclose(rgb[0, 0], 0.5 * np.array(OVERLAY_COLORS["tp"]))
    np.testing.assert_allclose(rgb[0, 1], 0.5 * np.array(OVERLAY_COLORS["fp"]))
    np.testing.assert_allclose(rgb[0, 2], 0.5 * np.array(OVERLAY_COLORS["fn"]))
    np.testing.assert_allclose(rgb[0, 3], 0.0)
    assert OVERLAY_COLORS == {"tp": (0.0, 0.8, 0.0), "fp": (1.0, 0.0, 0.0), "fn": (0.0, 0.3, 1.0)}


def test_write_figures(tmp_path: Path) -> None:
    from PIL import Image

    images = three_level_stack(5)
    masks = (images >= 100).astype(np.uint8)
    paths = write_figures(images, masks, masks, tmp_path / "f", 3)
    assert [p.name for p in paths] == ["slice_000.png", "slice_002.png", "slice_004.png"]
    with Image.open(paths[0]) as im:
        assert im.size == (16 * 80, round((4 * 24 / 30 + 0.6) * 80))  # 4 panels of 24x30
    assert len(write_figures(images[:2], masks[:2], masks[:2], tmp_path / "g", 9)) == 2
    assert write_figures(images, masks, masks, tmp_path / "h", 0) == []
    with pytest.raises(ValueError, match=r"^write_figures: n must be >= 0, got -1$"):
        write_figures(images, masks, masks, tmp_path, -1)
    with pytest.raises(
        ValueError, match=r"^write_figures: predictions shape \(4, 24, 30\) != masks"
    ):
        write_figures(images, masks, masks[:4], tmp_path, 1)


def test_write_outputs(tmp_path: Path) -> None:
    images = three_level_stack(3)
    masks = (images >= 100).astype(np.uint8)
    result = evaluate_stack(sigmoid_model, images, masks, PLAN)
    out = tmp_path / "evaluate"
    (out / "figures").mkdir(parents=True)
    (out / "figures" / "stale.png").write_bytes(b"old")
    paths = write_outputs(result, out, n_figures=2)
    assert json.loads((out / "metrics.json").read_text())["iou"] == pytest.approx(0.5)
    with (out / "per_slice.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == PER_SLICE_COLUMNS
    assert [r["slice"] for r in rows] == ["0", "1", "2"]
    assert float(rows[1]["iou"]) == pytest.approx(0.5) and rows[1]["fg_pred"] == "240"
    assert sorted(p.name for p in (out / "figures").iterdir()) == ["slice_000.png", "slice_002.png"]
    assert paths["figures"] == [
        out / "figures" / "slice_000.png",
        out / "figures" / "slice_002.png",
    ]
    assert paths["metrics"] == out / "metrics.json" and paths["per_slice"] == out / "per_slice.csv"
    assert [r["labelled_pixels"] for r in rows] == [str(images[0].size)] * 3
    with paths["objects"].open() as fh:
        objects = list(csv.DictReader(fh))
    expected = predicted_objects(result, ["background", "mito"])
    assert len(objects) == len(expected) > 0
    assert [int(o["voxels"]) for o in objects] == [r["voxels"] for r in expected]
    assert all(o["volume_nm3"] == "" for o in objects)  # no voxel size given
    sized = write_outputs(result, tmp_path / "sized", 0, voxel_size=(40.0, 4.0, 4.0))
    with sized["objects"].open() as fh:
        first = next(csv.DictReader(fh))
    assert float(first["volume_nm3"]) == pytest.approx(int(first["voxels"]) * 640.0)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_per_slice_csv_leaves_out_unlabelled_slices(tmp_path: Path) -> None:
    """Sparse labels: a slice without a labelled pixel (context) is not scored, so it has
    no per_slice.csv row (its 0/0 scores would read as IoU 1.0); a partly labelled slice
    has its labelled pixel count."""
    from mitoseg.labels import IGNORE_INDEX

    images = three_level_stack(3)
    masks = (images >= 100).astype(np.uint8)
    masks[1] = IGNORE_INDEX
    masks[2, :, : images.shape[2] // 2] = IGNORE_INDEX
    result = evaluate_stack(sigmoid_model, images, masks, PLAN)
    write_outputs(result, tmp_path, n_figures=0)
    with (tmp_path / "per_slice.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["slice"] for r in rows] == ["0", "2"]
    assert [int(r["labelled_pixels"]) for r in rows] == [
        int((masks[z] != IGNORE_INDEX).sum()) for z in (0, 2)
    ]
