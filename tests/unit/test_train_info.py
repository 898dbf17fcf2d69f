"""``train.json`` hand-off (mitoseg.train_info): round trip and the readers' error messages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mitoseg.io import DataError
from mitoseg.train_info import TrainInfo

GOOD: dict[str, Any] = {
    "run_id": "abc",
    "experiment_id": "1",
    "model_path": "artifacts/train/model.keras",
    "best_epoch": 3,
    "epochs_run": 5,
    "train_seconds": 12.5,
    "patches_per_second": 40.0,
    "params": {"epochs": 5, "model": {"depth": 2}},
    "n_classes": 2,
    "class_names": ["background", "mitochondria"],
    "resumed": False,
    "stop_reason": "early_stopping",
    "run_key": "k1",
    "init_from": None,
}


def test_round_trip(tmp_path: Path) -> None:
    path = TrainInfo(**GOOD).write(tmp_path / "train.json")
    assert json.loads(path.read_text()) == GOOD
    assert TrainInfo.read(path) == TrainInfo(**GOOD)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, r"train\.json: train info not found"),
        ("{oops", r"train\.json: not valid JSON"),
        ("[]", r"train\.json: expected a JSON object"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "run_id"}), r"json: missing 'run_id'$"),
        (json.dumps({**GOOD, "run_id": ""}), r"json: run_id: String should have at least 1"),
        (json.dumps({**GOOD, "n_classes": 3}), r"json: 2 class_names for n_classes=3"),
        (json.dumps({**GOOD, "best_epoch": -1}), r"json: best_epoch: Input should be greater"),
        (json.dumps({**GOOD, "extra": 1}), r"json: extra: Extra inputs are not permitted"),
    ],
)
def test_read_errors(tmp_path: Path, text: str | None, message: str) -> None:
    path = tmp_path / "train.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(DataError, match=message):
        TrainInfo.read(path)
