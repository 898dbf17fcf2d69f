"""The inference plan: validation, overrides, file round trip, blank slices; receptive
field and halo measured on predictors whose field is known by construction."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from scipy import ndimage

from mitoseg.inference.normalize import Normalization, normalize_for_plan
from mitoseg.inference.plan import (
    CALIBRATION_FILE,
    PLAN_FILE,
    InferencePlan,
    foreground_class,
    plan_path_for,
)
from mitoseg.io import DataError
from mitoseg.model.analysis import halo_for, receptive_field

BINARY = {"n_classes": 2, "class_names": ["background", "mitochondria"]}


@pytest.mark.parametrize(
    ("class_names", "expected"),
    [
        (["background", "mitochondria"], 1),
        (["bg", "fg"], 1),  # binary: the one foreground class, whatever its name
        (["mitochondria", "background"], 1),  # class 0 is the background, never it
        (["background", "membrane", "mitochondria", "synapse"], 2),
        (["background", "membrane", "Mitochondria"], None),  # the exact name only
        (["background", "mito", "membrane"], None),
        (["class_0", "class_1", "class_2"], None),
    ],
    ids=["binary_named", "binary_other_name", "binary_named_first", "multiclass_named",
         "multiclass_other_case", "multiclass_short_name", "multiclass_unnamed"],
)  # fmt: skip
def test_foreground_class(class_names: list[str], expected: int | None) -> None:
    assert foreground_class(class_names) == expected
    plan = InferencePlan.default_for(1 if len(class_names) == 2 else len(class_names), 16,
                                     class_names=class_names)  # fmt: skip
    assert plan.foreground_class == expected


def test_defaults_and_derived_fields() -> None:
    plan = InferencePlan.default_for(1, 16)
    assert plan.source == "default" and plan.threshold == 0.5 and plan.out_channels == 1
    assert plan.tile_size == 1024 and plan.tile_size % plan.divisor == 0
    assert plan.tiling_kwargs() == {
        "tile_size": 1024, "halo": 64, "border": None, "batch_size": 4, "tta": False,
        "divisor": 16,
    }  # fmt: skip
    multi = InferencePlan.default_for(5, 8)
    assert multi.threshold is None and multi.threshold_source == "argmax"
    assert multi.class_names == [f"class_{i}" for i in range(5)] and multi.decision == 0.5


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"class_names": ["a"]}, "class_names lists 1 names for n_classes=2"),
        ({"tile_size": 100}, "tile_size 100 is not a multiple of divisor 16"),
        ({"tile_size": 64, "halo": 32}, "halo 32 leaves nothing of a 64-pixel tile"),
        ({"threshold": None}, "a binary plan needs a threshold"),
        ({"voxel_size_nm": [5, 5]}, "voxel_size_nm must be 3 positive numbers"),
        ({"version": 2}, "plan version 2 is not supported"),
        ({"normalization": {"low_pct": 99, "high_pct": 1}}, "low_pct 99.0 must be below"),
        ({"runtime": "torch"}, "runtime: Input should be 'keras' or 'openvino'"),
        ({"tiles": 3}, "tiles: Extra inputs are not permitted"),
        ({"seed_threshold": 0.4}, "seed_threshold 0.4 needs a binary plan with a lower"),
        ({"seed_threshold": 0.5}, "seed_threshold 0.5 needs a binary plan with a lower"),
        (
            {
                "n_classes": 3,
                "class_names": ["a", "b", "c"],
                "threshold": None,
                "seed_threshold": 0.8,
            },
            "seed_threshold 0.8 needs a binary plan with a lower threshold (threshold None)",
        ),
        ({"seed_threshold": 1.5}, "seed_threshold: Input should be less than or equal to 1"),
    ],
)
def test_invalid_plans_name_the_field(fields: dict, message: str, tmp_path: Path) -> None:
    path = tmp_path / PLAN_FILE
    path.write_text(json.dumps({**BINARY, **fields}))
    with pytest.raises(DataError) as exc:
        InferencePlan.read(path)
    assert str(exc.value).startswith(f"{path}: invalid inference plan: ")
    assert message in str(exc.value)


def test_multiclass_plans_use_argmax(tmp_path: Path) -> None:
    path = tmp_path / PLAN_FILE
    path.write_text(json.dumps({"n_classes": 3, "class_names": ["a", "b", "c"]}))
    with pytest.raises(DataError, match="a multiclass plan uses argmax: threshold must be null"):
        InferencePlan.read(path)


def test_overrides_ignore_none_and_are_validated() -> None:
    plan = InferencePlan.model_validate(BINARY)
    assert plan.with_overrides(threshold=None) is plan
    assert plan.with_overrides(threshold=0.7, tta=True).threshold == 0.7
    with pytest.raises(ValueError, match=r"^unknown inference plan field\(s\): colour$"):
        plan.with_overrides(colour="red")
    with pytest.raises(ValueError, match=r"^invalid override: threshold: Input should be less"):
        plan.with_overrides(threshold=1.5)


def test_write_read_round_trip_and_file_errors(tmp_path: Path) -> None:
    plan = InferencePlan.model_validate({**BINARY, "threshold": 0.812, "voxel_size_nm": [50, 5, 5]})
    path = plan.write(tmp_path / "sub" / PLAN_FILE)
    assert InferencePlan.read(path) == plan
    assert not [p for p in path.parent.iterdir() if p.name != PLAN_FILE]  # atomic, no temp
    with pytest.raises(DataError, match=r"nope\.json: inference plan not found$"):
        InferencePlan.read(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match=r"bad\.json: cannot read the inference plan"):
        InferencePlan.read(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(DataError, match=r"bad\.json: an inference plan must be a JSON object$"):
        InferencePlan.read(bad)


def test_plan_beside_the_model(tmp_path: Path) -> None:
    model = tmp_path / "model.keras"
    assert plan_path_for(model) is None
    (tmp_path / PLAN_FILE).write_text("{}")
    assert plan_path_for(model) == tmp_path / PLAN_FILE
    (tmp_path / f"model.{PLAN_FILE}").write_text("{}")
    assert plan_path_for(model) == tmp_path / f"model.{PLAN_FILE}"


@pytest.mark.parametrize(
    ("image", "blank"),
    [
        (np.zeros((20, 20), np.uint8), True),
        (np.full((20, 20), 7, np.uint16), True),
        (np.random.default_rng(0).integers(100, 104, (20, 20)).astype(np.uint8), True),
        (np.random.default_rng(0).integers(0, 2000, (20, 20)).astype(np.uint16), False),
        (np.random.default_rng(0).integers(0, 256, (20, 20)).astype(np.uint8), False),
        (np.random.default_rng(0).random((20, 20)).astype(np.float32), False),
    ],
)
def test_blank_rule(image: np.ndarray, blank: bool) -> None:
    out = normalize_for_plan(image, Normalization())
    assert (out is None) == blank
    if not blank:
        assert out.dtype == np.float32 and out.min() >= 0.0 and out.max() <= 1.0


class Box:
    """A ``(2r + 1)``-wide box filter: receptive field ``2r + 1`` by construction."""

    def __init__(self, radius: int) -> None:
        self.size = 2 * radius + 1

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return ndimage.uniform_filter(batch, size=(1, self.size, self.size, 1), mode="reflect")


@pytest.mark.parametrize("radius", [0, 3, 10])
def test_receptive_field_of_a_box_filter(radius: int) -> None:
    field = receptive_field(Box(radius), probe=64)
    assert field["full"] == 2 * radius + 1 and field["effective"] <= field["full"]
    assert field["probe"] == 64


def test_effective_field_of_a_gaussian_is_smaller_than_the_full_one() -> None:
    def gauss(batch: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(batch, sigma=(0, 3, 3, 0), truncate=4.0, mode="reflect")

    field = receptive_field(gauss, probe=64, energy=0.9)
    assert field["full"] == 25  # truncate 4 sigma: radius 12
    assert field["effective"] < field["full"]


@pytest.mark.parametrize(
    ("field", "divisor", "halo"), [(1, 8, 0), (17, 8, 8), (149, 8, 80), (187, 16, 96)]
)
def test_halo_for(field: int, divisor: int, halo: int) -> None:
    assert halo_for(field, divisor) == halo


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"probe": 2}, "receptive_field: probe must be >= 3, got 2"),
        ({"energy": 0.0}, "receptive_field: energy must be in (0, 1], got 0.0"),
    ],
)
def test_receptive_field_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as exc:
        receptive_field(Box(1), **kwargs)
    assert str(exc.value) == message


def test_calibration_travels_beside_the_plan(tmp_path: Path) -> None:
    images = np.arange(2 * 4 * 6, dtype=np.uint8).reshape(2, 4, 6)
    plan = InferencePlan.model_validate(BINARY).with_calibration(images)
    assert plan.calibration_file == CALIBRATION_FILE
    np.testing.assert_array_equal(plan.calibration_images(), images.astype(np.float32) / 255)
    assert plan.with_overrides(threshold=0.7).calibration_images() is not None  # kept
    path = plan.write(tmp_path / PLAN_FILE)
    assert (tmp_path / CALIBRATION_FILE).is_file()
    back = InferencePlan.read(path)
    assert back == plan
    np.testing.assert_array_equal(back.calibration_images(), plan.calibration_images())
    (tmp_path / CALIBRATION_FILE).unlink()
    with pytest.raises(DataError, match=r"inference_calibration\.npy: cannot read the calibration"):
        InferencePlan.read(path)
    assert InferencePlan.model_validate(BINARY).calibration_images() is None


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (np.zeros((4, 6), np.uint8), r"expected \(N, H, W\), got shape \(4, 6\)"),
        (np.zeros((1, 4, 6), np.float32), "expected uint8, got float32"),
        (np.zeros((0, 4, 6), np.uint8), r"expected a non-empty array, got shape \(0, 4, 6\)"),
    ],
)
def test_calibration_must_be_uint8_slices(images: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=rf"^calibration images: {message}$"):
        InferencePlan.model_validate(BINARY).with_calibration(images)


def test_a_plan_naming_calibration_it_does_not_hold_is_not_written(tmp_path: Path) -> None:
    plan = InferencePlan.model_validate({**BINARY, "calibration_file": CALIBRATION_FILE})
    with pytest.raises(ValueError, match=r"names inference_calibration\.npy but holds no"):
        plan.write(tmp_path / PLAN_FILE)
    assert not list(tmp_path.iterdir())


def test_receptive_field_of_a_25d_predictor() -> None:
    """A box filter over the middle channel of a 3-channel input: its field, once."""

    def middle(batch: np.ndarray) -> np.ndarray:
        assert batch.shape[-1] == 3
        return Box(2)(batch[..., 1:2])

    assert receptive_field(middle, probe=64, channels=3)["full"] == 5


@pytest.mark.parametrize(
    ("images", "ok"),
    [
        (np.zeros((2, 4, 6, 3), np.uint8), True),
        (np.zeros((2, 4, 6), np.uint8), False),
        (np.zeros((2, 4, 6, 5), np.uint8), False),
    ],
)
def test_a_25d_plan_calibrates_with_context_channels(images: np.ndarray, ok: bool) -> None:
    plan = InferencePlan.model_validate({**BINARY, "z_context": 1})
    assert plan.in_channels == 3
    if ok:
        assert plan.with_calibration(images).calibration_images().shape == (2, 4, 6, 3)
    else:
        shape = str(images.shape).replace("(", r"\(").replace(")", r"\)")
        with pytest.raises(
            ValueError, match=rf"^calibration images: expected \(N, H, W, 3\), got shape {shape}$"
        ):
            plan.with_calibration(images)


@pytest.mark.parametrize("z_context", [-1, 9])
def test_z_context_is_bounded(z_context: int) -> None:
    with pytest.raises(ValidationError, match="z_context"):
        InferencePlan.model_validate({**BINARY, "z_context": z_context})
