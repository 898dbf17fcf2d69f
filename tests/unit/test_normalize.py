"""One intensity rule for training and inference (:mod:`mitoseg.inference.normalize`)."""

from __future__ import annotations

import numpy as np
import pytest

from mitoseg.data.patches import to_uint8
from mitoseg.inference.normalize import (
    HIGH_PCT,
    LOW_PCT,
    Normalization,
    normalize_for_plan,
    normalize_slice,
)
from mitoseg.inference.plan import InferencePlan

RNG = np.random.default_rng(5)


def test_the_default_plan_uses_the_training_percentiles() -> None:
    norm = InferencePlan.default_for(1, 16).normalization
    assert (norm.low_pct, norm.high_pct) == (LOW_PCT, HIGH_PCT)
    assert Normalization() == norm


@pytest.mark.parametrize(
    "image",
    [
        RNG.integers(0, 256, (40, 50)).astype(np.uint8),
        RNG.integers(0, 65536, (40, 50)).astype(np.uint16),
        RNG.random((40, 50)).astype(np.float32),
    ],
    ids=["uint8", "uint16", "float32"],
)
def test_training_patches_see_what_inference_sees(image: np.ndarray) -> None:
    """A stored training patch (uint8, intensity x 255) is the plan's network input,
    rounded: the same percentiles on both sides."""
    planned = normalize_for_plan(image, InferencePlan.default_for(1, 16).normalization)
    assert planned is not None
    np.testing.assert_array_equal(to_uint8(image), np.rint(planned * 255).astype(np.uint8))
    np.testing.assert_array_equal(normalize_slice(image), planned)


def test_a_blank_slice_is_none_for_inference_only() -> None:
    flat = np.full((8, 8), 7, np.uint8)
    assert normalize_for_plan(flat, Normalization()) is None
    assert not normalize_slice(flat).any()
