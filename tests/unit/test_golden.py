"""Golden test: a stored model segments a stored real EM crop as well as when it was made.

The data come from ``tests/golden/regenerate.py`` (a small UNet trained on the bundled VNC
sample; the crop is from the sample's held-out test split). The test runs the current
``mitoseg.inference.predict.segment_stack`` on the crop and checks Dice against the stored
ground-truth mask, and agreement with the mask predicted at generation time.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mitoseg.io import read_image
from mitoseg.metrics import evaluate_masks

GOLDEN = Path(__file__).resolve().parents[1] / "golden"


@pytest.fixture(scope="module")
def prediction() -> tuple[np.ndarray, dict]:
    import keras

    from mitoseg.inference.predict import segment_stack
    from mitoseg.model.analysis import default_plan

    spec = json.loads((GOLDEN / "golden.json").read_text())
    model = keras.models.load_model(GOLDEN / "model.keras", compile=False)
    crop = read_image(GOLDEN / "crop.tif")
    plan = default_plan(model).with_overrides(
        tile_size=spec["tile_size"], halo=spec["halo"], threshold=spec["threshold"]
    )
    pred = segment_stack(model, crop, plan)[0]
    return pred, spec


def test_golden_crop_dice_matches_stored_value(prediction: tuple[np.ndarray, dict]) -> None:
    pred, spec = prediction
    truth = (read_image(GOLDEN / "expected_mask.tif") > 0).astype(np.uint8)
    assert pred.shape == truth.shape == (256, 384)
    dice = evaluate_masks(truth[None], pred[None], 2)[0]["dice"]
    # A real, not a trivial, segmentation: the stored value is well above chance.
    assert spec["dice_vs_expected"] > 0.6
    assert dice == pytest.approx(spec["dice_vs_expected"], abs=0.01)


def test_golden_crop_prediction_is_stable(prediction: tuple[np.ndarray, dict]) -> None:
    pred, _ = prediction
    stored = (read_image(GOLDEN / "predicted_mask.tif") > 0).astype(np.uint8)
    agreement = float((pred == stored).mean())
    assert agreement > 0.999, f"only {agreement:.4%} of pixels agree with the stored mask"
