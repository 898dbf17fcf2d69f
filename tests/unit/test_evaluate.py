"""Evaluation: threshold choice, metrics, outputs and the DVC stage script (no keras).

Images hold three grey levels 0 / 100 / 200 in equal shares, so ``normalize_slice`` maps
them exactly to 0 / 0.5 / 1; the "model" predicts ``0.8 * x`` per pixel, i.e. 0 / 0.4 / 0.8,
and the truth is foreground where the grey level is >= 100. Thresholds <= 0.4 are then
perfect and thresholds in (0.4, 0.8] find only the 200-pixels.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import yaml

from mitoseg.config import EvaluateConfig
from mitoseg.evaluate import (
    OVERLAY_COLORS,
    PER_SLICE_COLUMNS,
    _overlay,
    choose_threshold,
    evaluate_stack,
    masks_to_indices,
    write_figures,
    write_outputs,
)
from mitoseg.io import DataError, write_stack

CFG = EvaluateConfig(tile_size=16, overlap=0.5, batch_size=16, min_object_size=0, figure_slices=2)
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
    "per_class",
    "slice_mean",
    "confusion",
    "class_names",
    "tile_size",
    "overlap",
    "tta",
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


def test_choose_threshold_picks_the_best_and_breaks_ties_towards_half() -> None:
    images = three_level_stack(2)
    masks = (images >= 100).astype(np.uint8)
    thr, scores = choose_threshold(sigmoid_model, images, masks, [0.3, 0.5, 0.7], tile_size=16)
    # 0.3 -> perfect; 0.5 and 0.7 -> only the 200-pixels: IoU = 240 / 480 per slice
    assert thr == 0.3
    assert scores == pytest.approx({0.3: 1.0, 0.5: 0.5, 0.7: 0.5})
    thr, scores = choose_threshold(sigmoid_model, images, masks, [0.1, 0.2, 0.3], tile_size=16)
    assert scores == pytest.approx({0.1: 1.0, 0.2: 1.0, 0.3: 1.0})
    assert thr == 0.3  # tie -> closest to 0.5


def test_choose_threshold_errors() -> None:
    images = three_level_stack(1)
    masks = (images >= 100).astype(np.uint8)
    with pytest.raises(ValueError, match=r"^choose_threshold: threshold grid is empty$"):
        choose_threshold(sigmoid_model, images, masks, [])
    with pytest.raises(
        ValueError, match=r"^choose_threshold: thresholds must be in \[0, 1\], got \[1\.5\]$"
    ):
        choose_threshold(sigmoid_model, images, masks, [0.5, 1.5])
    with pytest.raises(
        ValueError,
        match=r"^choose_threshold: images shape \(1, 24, 30\) != masks shape \(1, 24, 29\)$",
    ):
        choose_threshold(sigmoid_model, images, masks[..., :29], [0.5])
    with pytest.raises(ValueError) as exc:
        choose_threshold(softmax_model, images, masks, [0.5], tile_size=16)
    assert str(exc.value) == (
        "choose_threshold: the model has 3 output channels; thresholds apply only to binary "
        "(sigmoid) models, multiclass uses argmax"
    )


def test_evaluate_stack_binary() -> None:
    images = three_level_stack(3, seed=1)
    masks = (images >= 100).astype(np.uint8)
    result = evaluate_stack(sigmoid_model, images, masks, CFG, 0.5, 2, ["background", "mito"])
    m = result.metrics
    assert set(m) == METRIC_KEYS
    # 0.5 finds the 200-pixels only: TP = 240, FN = 240, FP = 0 per slice
    assert m["iou"] == pytest.approx(0.5)
    assert m["dice"] == pytest.approx(2 / 3)
    assert m["precision"] == 1.0 and m["recall"] == pytest.approx(0.5)
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["threshold"] == 0.5 and m["n_test_slices"] == 3
    assert set(m["per_class"]) == {"background", "mito"}
    assert m["slice_mean"]["iou"] == pytest.approx(0.5)
    assert result.predictions.shape == (3, 24, 30) and result.predictions.dtype == np.uint8
    assert np.array_equal(result.predictions, (images == 200).astype(np.uint8))
    assert [r["slice"] for r in result.rows] == [0, 1, 2]
    assert result.rows[0]["fg_true"] == 480 and result.rows[0]["fg_pred"] == 240
    perfect = evaluate_stack(sigmoid_model, images, masks, CFG, 0.3, 2, ["background", "mito"])
    assert perfect.metrics["iou"] == 1.0 and perfect.metrics["mean_iou"] == 1.0
    json.dumps(perfect.metrics)  # JSON-serialisable as is


def test_evaluate_stack_multiclass() -> None:
    images = three_level_stack(2, seed=2)
    masks = (images // 100).astype(np.uint8)
    result = evaluate_stack(softmax_model, images, masks, CFG, 0.5, 3, ["bg", "a", "b"])
    assert result.metrics["threshold"] is None
    assert result.metrics["iou"] == 1.0 and result.metrics["mean_iou"] == 1.0
    assert set(result.metrics["per_class"]) == {"bg", "a", "b"}
    assert np.array_equal(result.predictions, masks)


def test_evaluate_stack_errors() -> None:
    images = three_level_stack(1)
    masks = (images >= 100).astype(np.uint8)
    with pytest.raises(ValueError, match=r"^evaluate_stack: 1 class names for 2 classes$"):
        evaluate_stack(sigmoid_model, images, masks, CFG, 0.5, 2, ["bg"])
    with pytest.raises(ValueError, match=r"^evaluate_stack: threshold must be in \[0, 1\], got 2$"):
        evaluate_stack(sigmoid_model, images, masks, CFG, 2, 2, ["bg", "fg"])
    with pytest.raises(ValueError) as exc:
        evaluate_stack(sigmoid_model, images, masks, CFG, 0.5, 3, ["bg", "a", "b"])
    assert str(exc.value) == (
        "model outputs 1 channel(s) but the class table has 3 classes "
        "(expected 3 output channel(s))"
    )


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
    result = evaluate_stack(sigmoid_model, images, masks, CFG, 0.5, 2, ["background", "mito"])
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
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp leftovers


# ------------------------------------------------------------------ pipelines/evaluate.py


def _load_stage():
    path = Path(__file__).resolve().parents[2] / "pipelines" / "evaluate.py"
    spec = importlib.util.spec_from_file_location("stage_evaluate", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def stage_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Raw data, patch meta, train.json, params and a recording fake ``mitoseg.tracking``."""
    import mitoseg

    raw = tmp_path / "raw"
    train = three_level_stack(4, seed=3)
    test = three_level_stack(2, seed=4)
    write_stack(raw / "train" / "images.tif", train)
    write_stack(raw / "train" / "masks.tif", np.where(train >= 100, 255, 0).astype(np.uint8))
    write_stack(raw / "test" / "images.tif", test)
    write_stack(raw / "test" / "masks.tif", np.where(test >= 100, 255, 0).astype(np.uint8))
    patches = tmp_path / "patches"
    patches.mkdir()
    (patches / "meta.json").write_text(json.dumps({"val_slices": [1, 3]}))
    info = tmp_path / "train.json"
    info.write_text(json.dumps({"run_id": "abc123", "model_path": "model.keras"}))
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "base": {"classes": {"background": 0, "mitochondria": 255}},
                "evaluate": {
                    "tile_size": 16,
                    "threshold": "auto",
                    "threshold_grid": [0.3, 0.5, 0.7],
                    "figure_slices": 1,
                },
            }
        )
    )
    calls: dict = {}
    fake = types.ModuleType("mitoseg.tracking")

    def load_model(uri: str):
        calls["load"] = uri
        return sigmoid_model

    def log_evaluation(run_id: str, metrics: dict, artifacts: list[Path]) -> None:
        calls["log"] = (run_id, metrics, artifacts)

    fake.load_model = load_model
    fake.log_evaluation = log_evaluation
    monkeypatch.setitem(sys.modules, "mitoseg.tracking", fake)
    monkeypatch.setattr(mitoseg, "tracking", fake, raising=False)
    args = [
        "--model", str(tmp_path / "model.keras"), "--train-info", str(info), "--raw", str(raw),
        "--patches", str(patches), "--out", str(tmp_path / "out"), "--params", str(params),
        "--no-progress",
    ]  # fmt: skip
    return types.SimpleNamespace(tmp=tmp_path, args=args, calls=calls, patches=patches)


def test_stage_chooses_threshold_evaluates_and_logs(stage_env, capsys) -> None:
    stage = _load_stage()
    assert stage.main(stage_env.args) == 0
    out = stage_env.tmp / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["threshold"] == 0.3 and metrics["threshold_source"] == "validation"
    assert metrics["threshold_scores"] == pytest.approx({"0.3": 1.0, "0.5": 0.5, "0.7": 0.5})
    assert metrics["iou"] == 1.0 and metrics["n_test_slices"] == 2
    assert (out / "per_slice.csv").is_file()
    assert [p.name for p in (out / "figures").iterdir()] == ["slice_000.png"]
    assert stage_env.calls["load"] == str(stage_env.tmp / "model.keras")
    run_id, logged, artifacts = stage_env.calls["log"]
    assert run_id == "abc123" and logged["iou"] == 1.0
    assert artifacts == [
        out / "metrics.json",
        out / "per_slice.csv",
        out / "figures" / "slice_000.png",
    ]
    assert "test iou=1.0000" in capsys.readouterr().out


def test_stage_errors(stage_env, capsys) -> None:
    stage = _load_stage()
    (stage_env.patches / "meta.json").write_text(json.dumps({"val_slices": [1, 9]}))
    assert stage.main(stage_env.args) == 1
    err = capsys.readouterr().err
    assert err.strip() == (
        f"error: {stage_env.patches / 'meta.json'}: val_slices [9] out of range for 4 training "
        "slices"
    )
    (stage_env.patches / "meta.json").write_text(json.dumps({"slices": []}))
    assert stage.main(stage_env.args) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: {stage_env.patches / 'meta.json'}: missing 'val_slices'"
    )
    (stage_env.patches / "meta.json").unlink()
    assert stage.main(stage_env.args) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: {stage_env.patches / 'meta.json'}: patch metadata not found"
    )
    assert "log" not in stage_env.calls
