"""Unit tests of the DVC ``register`` stage script (pipelines/register.py)."""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from mitoseg import tracking
from mitoseg.config import BaseConfig, RegisterConfig
from mitoseg.train_info import TrainInfo
from tracking_state import reset_tracking, seed_store

ROOT = Path(__file__).resolve().parents[2]


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("register_stage", ROOT / "pipelines/register.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


register_stage = _load_script()


def _train_info(run_id: str) -> str:
    """A valid ``train.json`` for ``run_id``."""
    info = TrainInfo(
        run_id=run_id,
        experiment_id="1",
        model_path="artifacts/train/model.keras",
        best_epoch=1,
        epochs_run=1,
        train_seconds=1.0,
        patches_per_second=1.0,
        params={},
        n_classes=2,
        class_names=["background", "mitochondria"],
        resumed=False,
        stop_reason="completed",
        run_key="k",
        init_from=None,
    )
    return info.model_dump_json()


@pytest.fixture(scope="module")
def project(
    tmp_path_factory: pytest.TempPathFactory, empty_mlflow_db: Path
) -> Iterator[dict[str, Any]]:
    """A project dir with an embedded store, one run holding a tiny model, and params.yaml."""
    import keras

    root = tmp_path_factory.mktemp("project")
    seed_store(empty_mlflow_db, root)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        reset_tracking()
        tracking.configure_tracking(root=root)
        inp = keras.Input((None, None, 1))
        model = keras.Model(inp, keras.layers.Conv2D(1, 1, activation="sigmoid")(inp))
        with tracking.start_training_run({}, {"data_dvc_md5": "cafe.dir"}) as run:
            tracking.log_keras_model(model, 2)
        reset_tracking()
        (root / "params.yaml").write_text(
            "register:\n  model_name: stage-model\n  metric: iou\n"
            "  champion_alias: champion\n  challenger_alias: challenger\n"
        )
        (root / "train.json").write_text(_train_info(run.info.run_id))
        raw_test = root / "data" / "raw" / "test"
        raw_test.mkdir(parents=True)
        (raw_test / "images.tif").write_bytes(b"img")
        (raw_test / "masks.tif").write_bytes(b"msk")
        yield {"root": root, "run_id": run.info.run_id}


@pytest.fixture
def in_project(project: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Run the stage like DVC does: from the project directory, default store in cwd."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(project["root"])
    reset_tracking()
    yield project["root"]
    reset_tracking()


def _metrics(root: Path, name: str, **values: Any) -> Path:
    path = root / name
    path.write_text(json.dumps({"dice": 0.1, **values}))
    return path


def _params(root: Path, model_name: str) -> str:
    """A params file registering as ``model_name``: tests share the store, not a model."""
    path = root / f"params-{model_name}.yaml"
    path.write_text(
        f"register:\n  model_name: {model_name}\n  metric: iou\n"
        "  champion_alias: champion\n  challenger_alias: challenger\n"
    )
    return str(path)


def _cfg_named(model_name: str) -> RegisterConfig:
    return RegisterConfig(model_name=model_name)


def _args(metrics: Path, out: str, *extra: str) -> list[str]:
    return ["--train-info", "train.json", "--metrics", str(metrics), "--out", out, *extra]


def test_register_stage_champion_then_challenger(
    in_project: Path, project: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    good = _metrics(in_project, "good.json", iou=0.8)
    params = ["--params", _params(in_project, "stage-model")]
    assert register_stage.main(_args(good, "out/first/registration.json", *params)) == 0
    first = json.loads((in_project / "out/first/registration.json").read_text())
    test_id = tracking.compute_test_data_id(in_project / "data" / "raw")
    assert first == {
        "model_name": "stage-model",
        "version": 1,
        "alias": "champion",
        "metric": "iou",
        "value": 0.8,
        "previous_champion": None,
        "champion_rescored": None,
        "test_data_id": test_id,
        "run_id": project["run_id"],
        "reason": "first",
        "message": "no champion yet: this version is the first",
    }
    assert "registered stage-model v1 as champion (iou=0.8000, first; no previous champion)" in (
        capsys.readouterr().out
    )

    worse = _metrics(in_project, "worse.json", iou=0.7)
    assert register_stage.main(_args(worse, "out/second.json", *params)) == 0
    second = json.loads((in_project / "out/second.json").read_text())
    assert (second["version"], second["alias"], second["reason"]) == (2, "challenger", "not_better")
    assert second["previous_champion"]["version"] == 1
    assert second["previous_champion"]["value"] == 0.8
    out = capsys.readouterr().out
    assert "previous champion v1 iou=0.8" in out
    assert "iou=0.7000 does not beat the champion v1's iou=0.8000 on the same test data" in out
    assert (in_project / "mlflow.db").is_file()
    info = tracking.model_info("models:/stage-model@champion")
    assert info["version"] == 1


def test_register_stage_test_data_fallback_and_override(in_project: Path) -> None:
    good = _metrics(in_project, "m.json", iou=0.9)
    params = ["--params", _params(in_project, "fallback-model")]
    assert register_stage.main(_args(good, "a.json", "--raw", "no-such-dir", *params)) == 0
    record = json.loads((in_project / "a.json").read_text())
    assert record["test_data_id"] == "data.dvc:cafe.dir"
    assert (record["alias"], record["reason"]) == ("champion", "first")

    assert register_stage.main(_args(good, "b.json", "--test-data-id", "custom", *params)) == 0
    record = json.loads((in_project / "b.json").read_text())
    assert record["test_data_id"] == "custom"


@pytest.mark.parametrize(
    ("train_info", "metrics", "message"),
    [
        (None, {"iou": 0.5}, r"train\.json: train info not found"),
        ("{not json", {"iou": 0.5}, r"train\.json: not valid JSON"),
        ("[1]", {"iou": 0.5}, r"train\.json: expected a JSON object"),
        ("{}", {"iou": 0.5}, r"train\.json: missing 'run_id'; missing 'experiment_id'"),
        (_train_info("r").replace('"r"', "1"), {"iou": 0.5}, r"train\.json: run_id: Input should"),
        (_train_info("r")[:-1] + ', "x": 1}', {"iou": 0.5}, r"json: x: Extra inputs are not"),
        (_train_info("r"), {"dice": 0.5}, r"json: missing metric 'iou' \(register\.metric\)"),
        (_train_info("r"), {"iou": "high"}, r"json: metric 'iou' is not a finite number: 'high'"),
        (_train_info("r"), {"iou": None}, r"json: metric 'iou' is not a finite number: None"),
        (_train_info("r"), {"iou": float("nan")}, r"metric 'iou' is not a finite number: nan"),
        (_train_info("r"), {"iou": 0.5}, r"run 'r' not found in tracking store sqlite:///"),
        (_train_info("r"), {"iou": 0.5, "test_data_id": "test:other"},
         r"metrics\.json: measured on test data test:other, but data/raw/test is "
         r"test:[0-9a-f]{32}; run evaluate on this test data first"),
    ],
)  # fmt: skip
def test_register_stage_errors(
    tmp_path: Path,
    in_project: Path,
    capsys: pytest.CaptureFixture[str],
    train_info: str | None,
    metrics: dict[str, Any],
    message: str,
) -> None:
    info = tmp_path / "train.json"
    if train_info is not None:
        info.write_text(train_info)
    metrics_path = tmp_path / "metrics.json"
    metrics_path.write_text(json.dumps(metrics))
    out = tmp_path / "registration.json"
    argv = ["--train-info", str(info), "--metrics", str(metrics_path), "--out", str(out)]
    assert register_stage.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert re.search(message, err), err
    assert not out.exists()


def test_register_stage_bad_params(in_project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = in_project / "bad_params.yaml"
    params.write_text("register:\n  metric: accuracy\n")
    good = _metrics(in_project, "m2.json", iou=0.5)
    assert register_stage.main(_args(good, "c.json", "--params", str(params))) == 1
    assert "register.metric: Input should be 'iou', 'dice' or 'mean_iou'" in capsys.readouterr().err
    assert not (in_project / "c.json").exists()


def _half_model() -> Any:
    """A 1x1 convolution whose foreground is the bright pixels: p = sigmoid(20 x - 10)."""
    import keras

    inp = keras.Input((None, None, 1))
    conv = keras.layers.Conv2D(1, 1, activation="sigmoid")
    model = keras.Model(inp, conv(inp))
    conv.set_weights([np.full((1, 1, 1, 1), 20.0, np.float32), np.array([-10.0], np.float32)])
    return model


def _raw_test(root: Path) -> Path:
    """A test split whose IoU with :func:`_half_model` is 0.5 by construction: the left half
    is bright (predicted), the truth is its top half."""
    from mitoseg.io import write_stack

    images = np.full((3, 32, 32), 50, np.uint8)
    images[:, :, :16] = 200
    masks = np.zeros_like(images)
    masks[:, :16, :16] = 255
    write_stack(root / "test" / "images.tif", images)
    write_stack(root / "test" / "masks.tif", masks)
    return root


def test_register_stage_rescores_a_champion_from_other_test_data(
    in_project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A new test set: the champion is re-evaluated on it, and only a better model wins."""
    from mitoseg.gate import score_on_test

    with tracking.start_training_run({}, {}) as run:
        tracking.log_keras_model(_half_model(), 2)
    (in_project / "half.json").write_text(_train_info(run.info.run_id))
    raw = _raw_test(in_project / "half-raw")
    params = ["--params", _params(in_project, "gate-model"), "--raw", str(raw)]

    def register(iou: float, out: str, *extra: str) -> dict[str, Any]:
        recorded = {} if extra else {"test_data_id": tracking.compute_test_data_id(raw)}
        metrics = _metrics(in_project, out, iou=iou, **recorded)  # as evaluate records it
        argv = ["--train-info", "half.json", "--metrics", str(metrics)]
        assert register_stage.main([*argv, "--out", out, *params, *extra]) == 0
        return json.loads((in_project / out).read_text())

    assert register(0.9, "g1.json", "--test-data-id", "test:old")["reason"] == "first"
    worse = register(0.45, "g2.json")
    assert worse["test_data_id"] == tracking.compute_test_data_id(raw)
    assert (worse["alias"], worse["reason"]) == ("challenger", "not_better")
    rescored = worse["champion_rescored"]
    assert (rescored["uri"], rescored["error"]) == ("models:/gate-model/1", None)
    assert rescored["value"] == pytest.approx(0.5)
    out = capsys.readouterr().out
    assert f"re-evaluating models:/gate-model/1 on {raw}/test" in out
    assert (
        "iou=0.4500 does not beat the champion v1 re-evaluated on this test data (iou=0.5000" in out
    )
    better = register(0.55, "g3.json")
    assert (better["version"], better["alias"], better["reason"]) == (3, "champion", "better")
    assert tracking.model_info("models:/gate-model@champion")["version"] == 3
    assert score_on_test("models:/gate-model/1", raw, BaseConfig(), "dice") == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    ("metric", "split", "message"),
    [
        ("iou", None, r"half-raw/test/images\.tif"),
        ("accuracy_of_nothing", "test", r"models:/gate-err/1 on \S*half-raw/test: metric "
         r"'accuracy_of_nothing' is None"),
        ("iou", "bad-mask", r"half-raw/test/masks\.tif slice 0: mask values \[7\] are not in "
         r"the class table"),
    ],
    ids=["no-test-split", "unknown-metric", "bad-mask"],
)  # fmt: skip
def test_score_on_test_errors(
    in_project: Path, tmp_path: Path, metric: str, split: str | None, message: str
) -> None:
    from mitoseg.gate import score_on_test
    from mitoseg.io import DataError, write_stack

    with tracking.start_training_run({}, {}) as run:
        tracking.log_keras_model(_half_model(), 2)
    tracking.register_model(run.info.run_id, "iou", 0.5, _cfg_named("gate-err"), "t")
    raw = tmp_path / "half-raw"
    if split is not None:
        _raw_test(raw)
    if split == "bad-mask":
        write_stack(raw / "test" / "masks.tif", np.full((3, 32, 32), 7, np.uint8))
    with pytest.raises(DataError, match=message):
        score_on_test("models:/gate-err/1", raw, BaseConfig(), metric)
