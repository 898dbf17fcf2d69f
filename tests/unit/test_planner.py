"""The planner's z-averaging choice, on a network whose answer is known by construction.

The network is a fixed 1x1 convolution: its probability is the normalised intensity of
the slice, so what averaging over neighbouring slices does is known: it removes slice
noise from structures that run through the sections and blurs structures that do not.
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from mitoseg.config import EvaluateConfig
from mitoseg.planner import MemoPredictor, PlanReport, make_plan


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
    # every choice re-used the validation tiles: halo 0 makes both borders the same
    # tiles, so the network ran once per slice (batch of one 64 x 64 tile) and no more
    assert report.forward_passes["run"] == len(images)
    assert report.forward_passes["remembered"] > 5 * len(images)


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


def _cored_stack(faint_regions: bool) -> tuple[np.ndarray, np.ndarray]:
    """4 slices of 64 x 64: mitochondria with a faint rim (150) and a bright core (230) on
    a dark background (30); ``faint_regions`` adds regions as faint as the rims (not
    mitochondria), which no threshold alone separates from the rims."""
    rng = np.random.default_rng(0)
    images = np.full((4, 64, 64), 30.0)
    masks = np.zeros((4, 64, 64), np.uint8)
    for y, x in [(6, 6), (6, 40)]:
        images[:, y : y + 16, x : x + 16] = 150
        images[:, y + 4 : y + 12, x + 4 : x + 12] = 230
        masks[:, y : y + 16, x : x + 16] = 1
    if faint_regions:
        images[:, 40:52, 20:32] = 150
    images += rng.normal(0, 3, images.shape)
    return np.clip(images, 0, 255).astype(np.uint8), masks


@pytest.mark.parametrize(("faint_regions", "kept"), [(True, True), (False, False)])
def test_hysteresis_is_kept_only_where_it_scores_better(faint_regions, kept) -> None:
    images, masks = _cored_stack(faint_regions)
    cfg = EvaluateConfig(engines=["keras/fp32"], tile_size=64, halo=0, z_average=0)
    plan, report = make_plan(intensity_model(), cfg, ["background", "mito"], images, masks)
    assert (plan.seed_threshold is not None) == kept
    best = max(report.seed_threshold.values())
    assert (best > report.seed_threshold["none"]) == kept
    if kept:  # rims above the threshold, faint regions never reach the seed
        assert plan.threshold < 0.6 < plan.seed_threshold
        assert plan.validation["iou"] == best == 1.0
    assert report.to_json()["seed_threshold"] == report.seed_threshold


@pytest.mark.parametrize(("setting", "expected"), [(None, None), (0.9, 0.9)])
def test_a_fixed_seed_threshold_is_not_chosen(setting, expected) -> None:
    images, masks = _cored_stack(True)
    cfg = EvaluateConfig(
        engines=["keras/fp32"], tile_size=64, halo=0, z_average=0, seed_threshold=setting
    )
    plan, report = make_plan(intensity_model(), cfg, ["background", "mito"], images, masks)
    assert plan.seed_threshold == expected and report.seed_threshold == {}


@pytest.mark.parametrize(
    ("value", "message"),
    [(1.0, "less than 1"), (0.0, "greater than 0"), ("x", "valid number")],
)
def test_seed_threshold_setting_errors(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=rf"(?s)seed_threshold.*{message}"):
        EvaluateConfig(seed_threshold=value)


def test_memo_predictor_runs_each_distinct_batch_once() -> None:
    calls: list[tuple[int, ...]] = []

    def double(batch: np.ndarray) -> np.ndarray:
        calls.append(batch.shape)
        return batch * 2

    memo = MemoPredictor(double)
    a = np.arange(8, dtype=np.float32).reshape(1, 2, 2, 2)
    first = memo(a)
    first[:] = -1  # a caller changing its answer changes nothing remembered
    np.testing.assert_array_equal(memo(a.copy()), a * 2)
    np.testing.assert_array_equal(memo(a + 1), (a + 1) * 2)
    np.testing.assert_array_equal(memo(a.reshape(1, 2, 4, 1)), a.reshape(1, 2, 4, 1) * 2)
    assert (memo.misses, memo.hits, len(calls)) == (3, 1, 3)  # same bytes, other shape: new
    small = MemoPredictor(double, max_bytes=a.nbytes)  # room for one answer
    small(a), small(a + 1), small(a + 1)
    assert (small.misses, small.hits) == (3, 0)  # the second answer was not kept
    small(a)
    assert small.hits == 1  # the first one was


@pytest.mark.parametrize(
    ("n_slices", "val", "plan_on", "chosen_on", "engine"),
    [
        (6, [1, 2], "labelled", [0, 1, 2, 3, 4, 5], [1, 2]),
        (6, [1, 2], "validation", [1, 2], [0, 1]),
        (6, [4, 3], "validation", [3, 4], [0, 1]),
        (3, [2], "labelled", [0, 1, 2], [2]),
        (5, [], "labelled", [], []),
        (5, [], "validation", [], []),
    ],
)
def test_planning_slices(n_slices, val, plan_on, chosen_on, engine) -> None:
    from mitoseg.planner import planning_slices

    assert planning_slices(n_slices, val, plan_on) == (chosen_on, engine)


@pytest.mark.parametrize(
    ("n_slices", "val", "plan_on", "message"),
    [
        (6, [1], "test", "plan_on must be 'validation' or 'labelled', got 'test'"),
        (6, [6], "labelled", r"validation slices \[6\] outside the training stack's 6 slices"),
        (6, [-1, 2], "validation", r"validation slices \[-1\] outside"),
    ],
)
def test_planning_slices_errors(n_slices, val, plan_on, message) -> None:
    from mitoseg.planner import planning_slices

    with pytest.raises(ValueError, match=message):
        planning_slices(n_slices, val, plan_on)


def test_plan_on_setting_error() -> None:
    with pytest.raises(ValueError, match=r"(?s)plan_on.*'validation' or 'labelled'"):
        EvaluateConfig(plan_on="test")


def test_engines_are_scored_on_the_engine_slices_alone() -> None:
    """The choices see all four slices, the engine trial only slices 1 and 2: its score is
    the plan's IoU on those two (evaluated on its own), not on all four."""
    from mitoseg.planner import evaluate_split

    images, masks = _stack(False)
    model = intensity_model()
    cfg = EvaluateConfig(engines=["keras/fp32"], tile_size=64, halo=0, z_average=0)
    plan, report = make_plan(
        model, cfg, ["background", "mito"], images, masks, engine_slices=[1, 2]
    )
    on_two = evaluate_split(model, plan, images[1:3], masks[1:3]).metrics["iou"]
    on_all = evaluate_split(model, plan, images, masks).metrics["iou"]
    assert [t.engine for t in report.engines] == ["keras/fp32"]
    assert report.engines[0].score == pytest.approx(on_two, abs=1e-6)
    assert abs(on_two - on_all) > 1e-3  # the two sets differ, so the test can tell


def test_plan_report_says_which_slices_the_choices_saw() -> None:
    report = PlanReport()
    empty = report.to_json()
    assert (empty["plan_on"], empty["chosen_on_slices"], empty["engines_timed_on_slices"]) == (
        None,
        [],
        [],
    )
    report.plan_on, report.chosen_on_slices = "labelled", [0, 1, 2, 3]
    report.engines_timed_on_slices = [1, 3]
    written = json.loads(json.dumps(report.to_json()))
    assert written["plan_on"] == "labelled"
    assert written["chosen_on_slices"] == [0, 1, 2, 3]
    assert written["engines_timed_on_slices"] == [1, 3]
