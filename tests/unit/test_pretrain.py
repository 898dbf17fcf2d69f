"""Self-supervised pre-training: square masks, the masked crop stream, the loss, a tiny run
whose weights a segmentation run can start from."""

from __future__ import annotations

import numpy as np
import pytest

from mitoseg.config import AugmentConfig, ModelConfig, resolve_train_config
from mitoseg.pretrain import MaskedCropSampler, masked_mse, pretrain_model, square_mask

TINY = ModelConfig(depth=1, base_filters=2, batch_norm=False, dropout=0.0)


def slices(n: int = 4, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size), dtype=np.uint8)


@pytest.mark.parametrize(
    ("size", "square", "ratio", "n"),
    [(16, 4, 0.5, 8), (16, 8, 0.25, 1), (8, 8, 0.1, 1), (12, 3, 0.75, 12)],
)
def test_square_mask_masks_whole_grid_squares(size: int, square: int, ratio: float, n: int) -> None:
    mask = square_mask(size, square, ratio, np.random.default_rng(1))
    assert mask.shape == (size, size) and mask.dtype == bool
    cells = mask.reshape(size // square, square, size // square, square)
    per_cell = cells.sum(axis=(1, 3))
    assert set(np.unique(per_cell)) <= {0, square * square}  # whole squares only
    assert int((per_cell > 0).sum()) == n


def test_sampler_element_is_a_masked_crop_of_its_target() -> None:
    s = MaskedCropSampler(slices(), 16, 4, 0.5, None, seed=3)
    x, y = s.sample(5)
    assert x.shape == (16, 16, 1) and x.dtype == np.float32
    assert y.shape == (16, 16, 2) and y.dtype == np.float32
    target, hidden = y[..., 0], y[..., 1].astype(bool)
    assert set(np.unique(y[..., 1])) == {0.0, 1.0}
    np.testing.assert_array_equal(x[..., 0][~hidden], target[~hidden])
    np.testing.assert_allclose(x[..., 0][hidden], target.mean(), rtol=1e-6)
    assert int(hidden.sum()) == 8 * 16  # 8 of the 16 squares of 4 x 4
    # the target is a crop of one of the slices, intensity / 255
    crops = [
        np.array_equal(np.rint(target * 255).astype(np.uint8), sl[t : t + 16, l : l + 16])
        for sl in s.slices for t in range(17) for l in range(17)  # noqa: E741
    ]  # fmt: skip
    assert any(crops)


def test_sampler_is_a_pure_function_of_the_index() -> None:
    a = MaskedCropSampler(slices(), 16, 4, 0.5, AugmentConfig(), seed=3)
    b = MaskedCropSampler(slices(), 16, 4, 0.5, AugmentConfig(), seed=3)
    for k in (0, 7, 3, 7):
        for u, v in zip(a.sample(k), b.sample(k), strict=True):
            np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a.sample(0)[1], a.sample(1)[1])


def test_sampler_visits_every_slice_once_per_round() -> None:
    data = np.stack([np.full((16, 16), 10 * (i + 1), np.uint8) for i in range(5)])
    s = MaskedCropSampler(data, 16, 4, 0.5, None, seed=0)
    for rnd in range(2):
        seen = {round(float(s.sample(rnd * 5 + i)[1][0, 0, 0]) * 255) for i in range(5)}
        assert seen == {10, 20, 30, 40, 50}


@pytest.mark.parametrize(
    ("data", "kwargs", "message"),
    [
        (np.zeros((2, 16), np.uint8), {}, "slices: expected (N, H, W), got shape (2, 16)"),
        (np.zeros((2, 16, 16), np.float32), {}, "slices: expected uint8, got float32"),
        (np.zeros((0, 16, 16), np.uint8), {}, "slices: expected a non-empty array, got shape"),
        (np.zeros((2, 16, 16), np.uint8), {"square": 0}, "square must be >= 1, got 0"),
        (np.zeros((2, 16, 16), np.uint8), {"crop_size": 10}, "crop_size (10) must be a multiple"),
        (np.zeros((2, 16, 16), np.uint8), {"crop_size": 32}, "crop_size (32) exceeds the slices'"),
        (np.zeros((2, 16, 16), np.uint8), {"mask_ratio": 1.0}, "mask_ratio must be in (0, 1)"),
        (np.zeros((2, 16, 16), np.uint8), {"mask_ratio": 0.0}, "mask_ratio must be in (0, 1)"),
    ],
)
def test_sampler_rejects_bad_arguments(data: np.ndarray, kwargs: dict, message: str) -> None:
    args = {"crop_size": 16, "square": 4, "mask_ratio": 0.5, "augment": None, "seed": 0, **kwargs}
    with pytest.raises(ValueError) as err:
        MaskedCropSampler(data, **args)
    assert message in str(err.value)


def test_masked_mse_counts_masked_pixels_only() -> None:
    target = np.array([[[[0.0, 1.0], [1.0, 0.0]], [[0.5, 1.0], [0.2, 0.0]]]], np.float32)
    pred = np.array([[[[1.0], [0.0]], [[0.0], [0.9]]]], np.float32)
    # masked pixels: (0,0) err (1-0)^2 = 1 and (1,0) err (0-0.5)^2 = 0.25 -> mean 0.625
    assert float(masked_mse(target, pred)) == pytest.approx(0.625)
    no_mask = target.copy()
    no_mask[..., 1] = 0
    assert float(masked_mse(no_mask, pred)) == 0.0


def test_pretrain_is_reproducible_and_fine_tunes_a_segmentation_run() -> None:
    from mitoseg.train import initial_weights

    data = slices(3, 32)
    kwargs = {"epochs": 2, "steps_per_epoch": 2, "batch_size": 2, "crop_size": 16, "square": 4}
    a = pretrain_model(data, TINY, seed=5, progress=False, **kwargs)
    b = pretrain_model(data, TINY, seed=5, progress=False, **kwargs)
    assert a.steps == 4 and len(a.losses) == 2 and all(np.isfinite(a.losses))
    # bit for bit in a fresh process; here TensorFlow may have started with several
    # inter-op threads before this test, which allows last-bit differences (as in
    # tests/unit/test_train.py)
    assert a.losses == pytest.approx(b.losses, rel=1e-4, abs=1e-6)
    for u, v in zip(a.model.get_weights(), b.model.get_weights(), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-3, atol=1e-5)
    out = a.model.predict(np.zeros((1, 16, 16, 1), np.float32), verbose=0)
    assert out.shape == (1, 16, 16, 1)
    cfg = resolve_train_config({"model": TINY.model_dump(), "init_from": "pretrained.keras"})
    weights = initial_weights(a.model, cfg, 2)
    assert len(weights) == len(a.model.get_weights())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epochs": 0}, "epochs must be >= 1, got 0"),
        ({"steps_per_epoch": 0}, "steps_per_epoch must be >= 1, got 0"),
        ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
        ({"learning_rate": 0.0}, "learning_rate must be > 0, got 0.0"),
        ({"crop_size": 12, "square": 4}, "crop_size (12) must be a multiple of 2**depth (8)"),
    ],
)
def test_pretrain_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    args = {"epochs": 1, "crop_size": 16, "square": 4, **kwargs}
    with pytest.raises(ValueError) as err:
        pretrain_model(slices(2, 32), ModelConfig(depth=3, base_filters=2), **args)
    assert message in str(err.value)
