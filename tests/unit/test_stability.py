"""mitoseg.stability: the stability results schema and the tags the train stage logs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mitoseg.io import DataError
from mitoseg.stability import SeedSpread, read_stability, spread_tags


def _spread(values: list[float]) -> dict:
    import statistics

    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values),
        "max": max(values),
    }


def _report(**over: object) -> dict:
    row = {
        "seeds": [0, 1, 2],
        "test_iou": _spread([0.78, 0.79, 0.80]),
        "object_f1": _spread([0.7, 0.7, 0.7]),
        "mean_abs_delta_val_iou": _spread([0.01]),
        "runs_with_collapsed_validation": 0,
    }
    return {
        "what": "test",
        "steps": 1200,
        "machine": {"git_commit": "abc1234", "cpu": "Some CPU"},
        "summary": {"sample/default": row, "gap/default": row, "sample/v2": row},
        "runs": [],
        **over,
    }


def test_spread_text_rounds_and_names_the_seeds() -> None:
    assert (
        SeedSpread(**_spread([0.78, 0.79, 0.80])).text() == "0.790 +- 0.010 (3 seeds, 0.780-0.800)"
    )
    assert SeedSpread(**_spread([0.5])).text() == "0.500 +- n/a (1 seed, 0.500-0.500)"


def test_spread_tags_of_one_recipe_on_every_dataset(tmp_path: Path) -> None:
    path = tmp_path / "stability.json"
    path.write_text(json.dumps(_report()))
    tags = spread_tags(read_stability(path), "default")
    assert tags == {
        "stability.gap.test_iou": "0.790 +- 0.010 (3 seeds, 0.780-0.800)",
        "stability.sample.test_iou": "0.790 +- 0.010 (3 seeds, 0.780-0.800)",
        "stability.measured_at": "abc1234, Some CPU, 1200 steps",
    }
    assert spread_tags(read_stability(path), "seed") == {
        "stability.measured_at": "recipe 'seed' not measured"
    }


def test_object_counts_are_optional_and_read_back(tmp_path: Path) -> None:
    counts = {
        "test_false_objects_per_slice": _spread([8.0, 10.0]),
        "test_long_false_objects_per_slice": _spread([1.2, 2.4]),
        "distant_long_objects_per_slice": _spread([3.0, 3.4]),
    }
    row = {**_report()["summary"]["gap/default"], **counts}
    path = tmp_path / "stability.json"
    path.write_text(json.dumps(_report(summary={"gap/default": row, "sample/default": row})))
    report = read_stability(path)
    assert report.summary["gap/default"].test_long_false_objects_per_slice.text() == (
        "1.800 +- 0.849 (2 seeds, 1.200-2.400)"
    )
    path.write_text(json.dumps(_report()))
    assert read_stability(path).summary["gap/default"].distant_long_objects_per_slice is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "stability.json"),
        ("{", "stability.json"),
        (json.dumps(_report(steps=0)), "invalid stability results at steps"),
        (json.dumps({k: v for k, v in _report().items() if k != "summary"}), "at summary"),
        (
            json.dumps(_report(summary={"sample/default": {"seeds": []}})),
            r"at summary.sample/default.test_iou",
        ),
    ],
)
def test_read_stability_errors_name_the_file_and_field(
    tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "stability.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_stability(path)
