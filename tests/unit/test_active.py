"""mitoseg.active: the pure selection logic of the active-learning benchmark and its schema."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mitoseg.active import (
    ActiveLearningReport,
    ArmResult,
    Region,
    even_picks,
    random_picks,
    read_active_learning,
    region_mask,
    region_order,
    regions_for_pixels,
    summarise_arms,
    top_k,
)
from mitoseg.io import DataError

POOL = list(range(10))


@pytest.mark.parametrize(
    ("pool", "labelled", "k", "expected"),
    [
        (POOL, [], 2, [2, 7]),  # bin centres floor(0.5 * 10 / 2), floor(1.5 * 10 / 2)
        (POOL, [], 3, [1, 5, 8]),  # floor(10/6), floor(5), floor(25/3)
        ([10, 11, 12, 13], [], 2, [11, 13]),  # pool positions 1 and 3
        (POOL, [2, 7], 2, [0, 4]),  # 0, 4, 5, 9 are 2 away: 0; then 4 and 5 (4 lower)
        (POOL, [0, 2, 4, 7], 2, [9, 1]),  # 9 is 2 away, then every other one 1 away
        (POOL, [0, 1, 2, 3, 4, 5, 7, 9], 2, [6, 8]),
        ([3, 8], [8], 1, [3]),
    ],
)
def test_even_picks_hand_computed(
    pool: list[int], labelled: list[int], k: int, expected: list[int]
) -> None:
    assert even_picks(pool, labelled, k) == expected


def test_even_picks_reach_the_whole_pool_one_round_at_a_time() -> None:
    labelled = even_picks(POOL, [], 2)
    for _ in range(4):
        added = even_picks(POOL, labelled, 2)
        assert not set(added) & set(labelled)
        labelled += added
    assert sorted(labelled) == POOL


def test_random_picks_are_unlabelled_distinct_and_seeded() -> None:
    labelled = [2, 7]
    picks = random_picks(POOL, labelled, 3, (0, 1))
    assert len(set(picks)) == 3 and not set(picks) & set(labelled)
    assert set(picks) <= set(POOL)
    assert random_picks(POOL, labelled, 3, (0, 1)) == picks
    draws = {tuple(random_picks(POOL, labelled, 3, (0, r))) for r in range(10)}
    assert len(draws) > 1  # the seed matters
    assert sorted(random_picks(POOL, labelled, 8, 5)) == [0, 1, 3, 4, 5, 6, 8, 9]


def test_top_k_takes_the_highest_unlabelled_scores_ties_lowest_slice() -> None:
    scores = {0: 0.1, 1: 0.5, 2: 0.5, 3: 0.9, 4: 0.2}
    assert top_k(scores, [3], 2) == [1, 2]
    assert top_k(scores, [], 1) == [3]
    assert top_k(scores, [1, 3], 3) == [2, 4, 0]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: even_picks([1, 1], [], 1),
            r"even_picks: pool must be distinct slices, got \[1, 1\]",
        ),
        (lambda: even_picks([], [], 1), r"even_picks: pool must be distinct slices, got \[\]"),
        (
            lambda: even_picks(POOL, [12], 1),
            r"even_picks: labelled slices \[12\] are not in the pool",
        ),
        (
            lambda: even_picks(POOL, [], 0),
            r"even_picks: k must be in 1\.\.10 \(unlabelled slices\), got 0",
        ),
        (
            lambda: random_picks(POOL, list(range(9)), 2, 0),
            r"random_picks: k must be in 1\.\.1 \(unlabelled slices\), got 2",
        ),
        (
            lambda: top_k({0: 1.0}, [0], 1),
            r"top_k: k must be in 1\.\.0 \(unlabelled slices\), got 1",
        ),
        (lambda: region_order([], (4, 4), 2, 0), r"region_order: need slices and a positive shape"),
        (
            lambda: region_order([0], (0, 4), 2, 0),
            r"region_order: need slices and a positive shape",
        ),
        (lambda: region_order([0], (4, 4), 0, 0), r"region_order: tile must be >= 1, got 0"),
        (
            lambda: regions_for_pixels([Region(0, 0, 0, 2, 2)], 0),
            r"regions_for_pixels: n_pixels must be in 1\.\.4, got 0",
        ),
        (
            lambda: regions_for_pixels([Region(0, 0, 0, 2, 2)], 5),
            r"regions_for_pixels: n_pixels must be in 1\.\.4, got 5",
        ),
        (
            lambda: region_mask([Region(3, 0, 0, 2, 2)], [0, 1], (4, 4)),
            r"region_mask: Region\(slice=3, .*\) is outside slices \[0, 1\] of shape \(4, 4\)",
        ),
        (
            lambda: region_mask([Region(0, 3, 0, 2, 2)], [0, 1], (4, 4)),
            r"region_mask: Region\(slice=0, top=3, .*\) is outside slices",
        ),
    ],
)
def test_selection_errors(call: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_region_order_covers_every_tile_once_border_tiles_cut() -> None:
    order = region_order([4, 6], (5, 4), 2, 0)
    # rows 0, 2, 4 (heights 2, 2, 1) x columns 0, 2 (widths 2, 2) on each slice
    expected = {
        Region(z, top, left, 1 if top == 4 else 2, 2)
        for z in (4, 6)
        for top in (0, 2, 4)
        for left in (0, 2)
    }
    assert len(order) == 12 and set(order) == expected
    assert sum(r.pixels for r in order) == 2 * 5 * 4
    assert region_order([4, 6], (5, 4), 2, 0) == order
    assert region_order([4, 6], (5, 4), 2, 1) != order


def test_regions_for_pixels_takes_the_shortest_prefix() -> None:
    order = [Region(0, 0, 0, 2, 2), Region(1, 4, 0, 1, 2), Region(0, 0, 2, 2, 2)]
    assert regions_for_pixels(order, 4) == order[:1]
    assert regions_for_pixels(order, 5) == order[:2]  # 6 pixels: the tiles give no 5
    assert regions_for_pixels(order, 6) == order[:2]
    assert regions_for_pixels(order, 10) == order


def test_region_mask_marks_the_rectangles_on_their_slices() -> None:
    mask = region_mask([Region(7, 1, 2, 2, 1), Region(5, 0, 0, 1, 3)], [5, 7], (3, 4))
    assert mask.shape == (2, 3, 4) and mask.dtype == bool
    assert np.argwhere(mask).tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [1, 1, 2], [1, 2, 2]]


def test_partial_regions_match_whole_slices_pixel_for_pixel() -> None:
    order = region_order(POOL, (8, 8), 4, 3)
    for n_slices in (2, 4, 10):
        mask = region_mask(regions_for_pixels(order, n_slices * 64), POOL, (8, 8))
        assert mask.sum() == n_slices * 64
    assert region_mask(regions_for_pixels(order, 640), POOL, (8, 8)).all()


# ---------------------------------------------------------------------------- schema


def _round(r: int, iou: float, slices: list[int], seconds: float = 10.0) -> dict[str, Any]:
    return {
        "round": r,
        "added": slices[-2:],
        "labelled_slices": slices,
        "labelled_pixels": 16 * len(slices),
        "steps": 5,
        "init": "scratch" if r == 0 else "previous",
        "test_iou": iou,
        "dice": 0.5,
        "precision": 0.5,
        "recall": 0.5,
        "object_f1": iou / 2,
        "plan": {"threshold": 0.5},
        "seconds": {"select": 0.0, "train": seconds, "score": 0.0, "total": seconds},
    }


def _arm(strategy: str, seed: int, ious: list[float]) -> dict[str, Any]:
    return {
        "strategy": strategy,
        "seed": seed,
        "shared_start": strategy != "partial",
        "git_commit": "abc1234",
        "rounds": [_round(r, iou, list(range(2 + 2 * r))) for r, iou in enumerate(ious)],
    }


def test_summarise_arms_mean_sd_per_strategy_and_round() -> None:
    arms = [
        ArmResult.model_validate(a)
        for a in (
            _arm("even", 0, [0.5, 0.6]),
            _arm("suggest", 0, [0.5, 0.7]),
            _arm("even", 1, [0.7, 0.8]),
        )
    ]
    summary = summarise_arms(arms)
    assert [(s.strategy, s.round) for s in summary] == [
        ("suggest", 0),
        ("suggest", 1),
        ("even", 0),
        ("even", 1),
    ]
    even0 = summary[2]
    assert even0.seeds == [0, 1]
    assert even0.test_iou.mean == 0.6 and even0.test_iou.sd == round(math.sqrt(0.02), 4)
    assert (even0.test_iou.min, even0.test_iou.max) == (0.5, 0.7)
    assert even0.object_f1.mean == 0.3
    assert even0.labelled_slices.mean == 2 and even0.labelled_pixels.mean == 32
    assert summary[1].test_iou.sd is None and summary[1].labelled_slices.mean == 4


def _report(**over: Any) -> dict[str, Any]:
    arms = [_arm("random", 0, [0.5, 0.6])]
    return {
        "what": "test",
        "scoring": "fixed",
        "data": {"pool": POOL},
        "settings": {"k": 2},
        "machine": {"git_commit": "abc1234"},
        "summary": [
            s.model_dump(mode="json")
            for s in summarise_arms([ArmResult.model_validate(a) for a in arms])
        ],
        "arms": arms,
        **over,
    }


def test_report_round_trips(tmp_path: Path) -> None:
    data = _report()
    data["arms"][0]["rounds"][1]["suggest_scores"] = {"2": 0.25, "9": 0.5}
    path = tmp_path / "al.json"
    path.write_text(json.dumps(data))
    report = read_active_learning(path)
    assert isinstance(report, ActiveLearningReport)
    assert report.arms[0].rounds[1].labelled_slices == [0, 1, 2, 3]
    assert report.arms[0].rounds[1].suggest_scores == {2: 0.25, 9: 0.5}
    path.write_text(json.dumps(report.model_dump(mode="json")))
    assert read_active_learning(path) == report


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, r"al\.json: active-learning results not found"),
        ("{", r"al\.json: not valid JSON"),
        (
            json.dumps({k: v for k, v in _report().items() if k != "arms"}),
            r"at arms: Field required",
        ),
        (json.dumps(_report(arms=[_arm("uncertain", 0, [0.5])])), r"at arms\.0\.strategy"),
        (json.dumps(_report(arms=[_arm("even", 0, [1.5])])), r"at arms\.0\.rounds\.0\.test_iou"),
        (
            json.dumps(_report(arms=[{**_arm("even", 0, [0.5]), "rounds": []}])),
            r"at arms\.0\.rounds",
        ),
    ],
)
def test_read_active_learning_errors_name_the_file_and_field(
    tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "al.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_active_learning(path)
