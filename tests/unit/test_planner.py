"""The planner's z-averaging choice, on a network whose answer is known by construction.

The network is a fixed 1x1 convolution: its probability is the normalised intensity of
the slice, so what averaging over neighbouring slices does is known: it removes slice
noise from structures that run through the sections and blurs structures that do not.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from mitoseg.config import EvaluateConfig
from mitoseg.planner import make_plan


def intensity_model() -> keras.Model:
    """``p = x``: a 1x1 convolution with weight 1, no bias."""
    inputs = keras.Input((None, None, 1))
    conv = keras.layers.Conv2D(1, 1, use_bias=False, kernel_initializer="ones")
    return keras.Model(inputs, conv(inputs))


def _stack(through_sections: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """4 slices of 64 x 64: bright squares on dark background plus per-slice noise.

    ``through_sections``: the same squares on every slice (as mitochondria running through
    sections); else each slice has its own squares.
    """
    rng = np.random.default_rng(seed)
    masks = np.zeros((4, 64, 64), np.uint8)
    for z in range(4):
        for y, x in [(8, 8), (8, 40), (40, 24)] if through_sections else [(4 + 14 * z, 8)]:
            masks[z, y : y + 16, x : x + 16] = 1
    images = 60 + 120 * masks + rng.normal(0, 45, masks.shape)
    return np.clip(images, 0, 255).astype(np.uint8), masks


@pytest.mark.parametrize(("through_sections", "expected"), [(True, 1), (False, 0)])
def test_z_average_is_kept_only_where_it_scores_better(through_sections, expected) -> None:
    images, masks = _stack(through_sections)
    cfg = EvaluateConfig(engines=["keras/fp32"], tile_size=64, halo=0)
    plan, report = make_plan(intensity_model(), cfg, ["background", "mito"], images, masks)
    assert plan.z_average == expected
    assert set(report.z_average) == {"0", "1"}
    assert (report.z_average["1"] > report.z_average["0"]) == bool(expected)
    assert report.to_json()["z_average"] == report.z_average


@pytest.mark.parametrize(("setting", "expected"), [(0, 0), (2, 2)])
def test_a_fixed_z_average_is_not_chosen(setting: int, expected: int) -> None:
    images, masks = _stack(True)
    cfg = EvaluateConfig(engines=["keras/fp32"], tile_size=64, halo=0, z_average=setting)
    plan, report = make_plan(intensity_model(), cfg, ["background", "mito"], images, masks)
    assert plan.z_average == expected and report.z_average == {}


@pytest.mark.parametrize(
    ("value", "message"),
    [(9, "less than or equal to 8"), (-1, "greater than or equal to 0"), ("x", "valid integer")],
)
def test_z_average_setting_errors(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=rf"(?s)z_average.*{message}"):
        EvaluateConfig(z_average=value)
