"""Unit tests of mitoseg.tracking against a temporary embedded (sqlite) MLflow store."""

from __future__ import annotations

import json
import math
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mitoseg import tracking
from mitoseg.config import RegisterConfig
from mitoseg.tracking import ModelNotFoundError
from tracking_state import reset_tracking, seed_store


@pytest.fixture
def clean_env() -> Iterator[pytest.MonkeyPatch]:
    """No MLFLOW_TRACKING_URI from the outside; tracking state reset afterwards.

    Set ``MLFLOW_*`` variables through the returned MonkeyPatch: it is undone before the
    last reset, so a value MLflow mirrored into ``$MLFLOW_TRACKING_URI`` (and the
    MonkeyPatch would restore) does not outlive the test.
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        reset_tracking()
        yield mp
    reset_tracking()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, empty_mlflow_db: Path) -> Iterator[Path]:
    """One sqlite store for the module (a copy of the session's migrated empty one)."""
    root = tmp_path_factory.mktemp("mlflow_store")
    seed_store(empty_mlflow_db, root)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        reset_tracking()
        tracking.configure_tracking(root=root)
        yield root
        reset_tracking()


@pytest.fixture(autouse=True)
def _reselect_store(request: pytest.FixtureRequest) -> None:
    """Tests using ``store`` run against it even if another test re-pointed MLflow."""
    if "store" in request.fixturenames:
        root = request.getfixturevalue("store")
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        tracking.configure_tracking(root=root)


def _tiny_model(channels: int = 1) -> Any:
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((None, None, 1))
    x = keras.layers.Conv2D(2, 3, padding="same", activation="relu")(inp)
    act = "sigmoid" if channels == 1 else "softmax"
    out = keras.layers.Conv2D(channels, 1, activation=act, dtype="float32")(x)
    return keras.Model(inp, out)


@pytest.fixture(scope="module")
def logged(store: Path) -> dict[str, Any]:
    """A finished run holding a tiny binary model logged as ``model``."""
    tracking.configure_tracking(root=store)
    model = _tiny_model()
    with tracking.start_training_run(
        {"model": {"depth": 1}}, {"git_commit": "abc123", "data_dvc_md5": "d41d8"}, "tiny"
    ) as run:
        uri = tracking.log_keras_model(model, 2, class_names=["background", "mitochondria"])
    x = np.random.default_rng(0).random((1, 8, 8, 1), dtype=np.float32)
    return {"run_id": run.info.run_id, "uri": uri, "x": x, "y": model.predict(x, verbose=0)}


# ------------------------------------------------------------------ configure


def test_configure_tracking_defaults_to_cwd(
    clean_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = tracking.configure_tracking()
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert (tmp_path / "mlflow.db").is_file()
    exp = MlflowClient(uri).get_experiment_by_name("mitoseg")
    assert exp.artifact_location == (tmp_path.resolve() / "mlartifacts").as_uri()
    assert tracking.configure_tracking() == uri  # idempotent
    assert MlflowClient(uri).get_experiment_by_name("mitoseg").experiment_id == exp.experiment_id


def test_configure_tracking_root_env_and_explicit(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, empty_mlflow_db: Path
) -> None:
    """Which store is chosen (its creation: the test above), so the stores are copies."""
    import mlflow
    from mlflow import MlflowClient

    root = tmp_path / "store"
    seed_store(empty_mlflow_db, root)
    assert tracking.configure_tracking(root=root) == f"sqlite:///{root.resolve()}/mlflow.db"
    assert mlflow.get_tracking_uri() == f"sqlite:///{root.resolve()}/mlflow.db"

    env_uri = f"sqlite:///{seed_store(empty_mlflow_db, tmp_path / 'env', 'other.db')}"
    clean_env.setenv("MLFLOW_TRACKING_URI", env_uri)
    assert tracking.configure_tracking(root=root) == env_uri
    exp = MlflowClient(env_uri).get_experiment_by_name("mitoseg")
    assert exp.artifact_location == (root.resolve() / "mlartifacts").as_uri()

    explicit = f"sqlite:///{seed_store(empty_mlflow_db, tmp_path, 'x.db')}"
    assert tracking.configure_tracking(tracking_uri=explicit) == explicit
    exp = MlflowClient(explicit).get_experiment_by_name("mitoseg")
    assert exp.artifact_location == (tmp_path.resolve() / "mlartifacts").as_uri()


# -------------------------------------------------------------------- lineage


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo), *args],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def test_lineage_tags_in_git_repo(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "data.dvc").write_text(
        "outs:\n- md5: 0123456789abcdef0123456789abcdef.dir\n  size: 10\n  path: raw\n"
    )
    lock = {
        "schema": "2.0",
        "stages": {
            "train": {"cmd": "python train.py", "outs": [{"path": "m.keras", "md5": "aa"}]},
            "evaluate": {"cmd": "python evaluate.py", "deps": [{"path": "m.keras", "md5": "aa"}]},
        },
    }
    (repo / "dvc.lock").write_text(json.dumps(lock))
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "init")
    head = _git(repo, "rev-parse", "HEAD")

    tags = tracking.lineage_tags(repo)
    assert tags["git_commit"] == head
    assert tags["git_dirty"] == "false"
    assert tags["data_dvc_md5"] == "0123456789abcdef0123456789abcdef.dir"
    assert len(tags["dvc_lock_md5"]) == 32
    assert set(tags) == {
        "git_commit",
        "git_dirty",
        "data_dvc_md5",
        "dvc_lock_md5",
        "dvc_stage_train",
        "dvc_stage_evaluate",
    }

    lock["stages"]["train"]["outs"][0]["md5"] = "bb"
    (repo / "dvc.lock").write_text(json.dumps(lock))
    changed = tracking.lineage_tags(repo)
    assert changed["git_dirty"] == "true"
    assert changed["dvc_stage_train"] != tags["dvc_stage_train"]
    assert changed["dvc_stage_evaluate"] == tags["dvc_stage_evaluate"]


def test_lineage_tags_without_git_or_dvc_files(tmp_path: Path) -> None:
    tags = tracking.lineage_tags(tmp_path)
    assert tags == {
        "git_commit": "unknown",
        "git_dirty": "unknown",
        "data_dvc_md5": "unknown",
        "dvc_lock_md5": "unknown",
    }


def test_lineage_tags_malformed_files_and_no_git_binary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "data.dvc").write_text("outs: [unclosed\n")
    (tmp_path / "dvc.lock").write_text("just a string\n")
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    tags = tracking.lineage_tags(tmp_path)
    assert tags["git_commit"] == "unknown"
    assert tags["git_dirty"] == "unknown"
    assert tags["data_dvc_md5"] == "unknown"
    assert len(tags["dvc_lock_md5"]) == 32
    assert not any(k.startswith("dvc_stage_") for k in tags)


# ----------------------------------------------------------------------- runs


def test_flatten_dict() -> None:
    assert tracking.flatten_dict({"a": 1, "model": {"depth": 4, "x": {"y": None}}}) == {
        "a": 1,
        "model.depth": 4,
        "model.x.y": None,
    }


def test_start_training_run_logs_params_and_tags(store: Path) -> None:
    from mlflow import MlflowClient

    params = {"epochs": 3, "model": {"depth": 2, "variant": "plain"}, "grid": [0.2, 0.5]}
    with tracking.start_training_run(params, {"git_commit": "abc", "n": 1}, "named") as run:
        run_id = run.info.run_id
    got = MlflowClient().get_run(run_id)
    assert got.data.params == {
        "epochs": "3",
        "model.depth": "2",
        "model.variant": "plain",
        "grid": "[0.2, 0.5]",
    }
    assert got.data.tags["git_commit"] == "abc"
    assert got.data.tags["n"] == "1"
    assert got.data.tags["mlflow.runName"] == "named"
    assert got.info.status == "FINISHED"
    exp = MlflowClient().get_experiment(got.info.experiment_id)
    assert exp.name == "mitoseg"

    with pytest.raises(RuntimeError, match="boom"), tracking.start_training_run({}, {}) as run:
        failed_id = run.info.run_id
        raise RuntimeError("boom")
    assert MlflowClient().get_run(failed_id).info.status == "FAILED"


def test_log_keras_model_and_load_via_run(logged: dict[str, Any]) -> None:
    import mlflow

    run_id = logged["run_id"]
    assert logged["uri"] == f"runs:/{run_id}/model"
    model = tracking.load_model(logged["uri"])
    np.testing.assert_allclose(model.predict(logged["x"], verbose=0), logged["y"], rtol=1e-6)
    sig = mlflow.models.get_model_info(logged["uri"]).signature
    assert sig.inputs.inputs[0].shape == (-1, -1, -1, 1)
    assert sig.outputs.inputs[0].shape == (-1, -1, -1, 1)
    assert sig.inputs.inputs[0].type == np.dtype("float32")
    tags = mlflow.get_run(run_id).data.tags
    assert tags["n_classes"] == "2"
    assert json.loads(tags["class_names"]) == ["background", "mitochondria"]


def test_log_keras_model_multiclass_signature(store: Path) -> None:
    import mlflow

    with tracking.start_training_run({}, {}):
        uri = tracking.log_keras_model(_tiny_model(3), 3)
    sig = mlflow.models.get_model_info(uri).signature
    assert sig.outputs.inputs[0].shape == (-1, -1, -1, 3)
    assert json.loads(mlflow.get_run(uri.split("/")[1]).data.tags["class_names"]) == [
        "class_0",
        "class_1",
        "class_2",
    ]


def test_log_keras_model_errors(store: Path) -> None:
    model = _tiny_model()
    with pytest.raises(ValueError, match=r"log_keras_model: n_classes must be an int >= 2, got 1"):
        tracking.log_keras_model(model, 1)
    with pytest.raises(
        ValueError,
        match=r"log_keras_model: model output shape \(None, None, None, 1\) has 1 channels "
        r"but n_classes=3 needs 3",
    ):
        tracking.log_keras_model(model, 3)
    with pytest.raises(ValueError, match=r"log_keras_model: 1 class_names given for n_classes=2"):
        tracking.log_keras_model(model, 2, class_names=["bg"])
    with pytest.raises(RuntimeError, match=r"log_keras_model: no active MLflow run"):
        tracking.log_keras_model(model, 2)


def test_log_evaluation(store: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    with tracking.start_training_run({}, {}) as run:
        run_id = run.info.run_id
    fig_dir = tmp_path / "figures"
    fig_dir.mkdir()
    (fig_dir / "slice_0.png").write_bytes(b"png")
    metrics_file = tmp_path / "metrics.json"
    metrics_file.write_text("{}")
    metrics = {
        "iou": 0.8,
        "threshold": 0.4,
        "objects": {"f1": 0.7, "n": 12},
        "per_class": {"mito chondria": {"iou": 0.8}},
        "source": "validation",
        "flag": True,
        "missing": None,
    }
    logged = tracking.log_evaluation(run_id, metrics, [metrics_file, fig_dir])
    assert logged == {
        "test_iou": 0.8,
        "test_threshold": 0.4,
        "test_objects.f1": 0.7,
        "test_objects.n": 12.0,
        "test_per_class.mito chondria.iou": 0.8,
    }
    client = MlflowClient()
    assert client.get_run(run_id).data.metrics == logged
    assert [a.path for a in client.list_artifacts(run_id, "evaluation")] == [
        "evaluation/figures",
        "evaluation/metrics.json",
    ]
    assert [a.path for a in client.list_artifacts(run_id, "evaluation/figures")] == [
        "evaluation/figures/slice_0.png"
    ]


def test_log_evaluation_errors(store: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match=rf"artifact\(s\) not found: {missing}"):
        tracking.log_evaluation("abc", {"iou": 1.0}, [missing])
    with pytest.raises(ModelNotFoundError, match=r"run 'f00' not found in tracking store sqlite"):
        tracking.log_evaluation("f00", {"iou": 1.0}, [])


# ------------------------------------------------------------------- registry

_CHAMP = {"metric": "iou", "value": 0.5, "test_data_id": "test:aaa"}


@pytest.mark.parametrize(
    ("previous", "metric", "value", "test_data_id", "rescored", "expected"),
    [
        (None, "iou", 0.1, "test:aaa", None, (True, "first")),
        (_CHAMP, "iou", 0.6, "test:aaa", None, (True, "better")),
        (_CHAMP, "iou", 0.4, "test:aaa", None, (False, "not_better")),
        (_CHAMP, "iou", 0.5, "test:aaa", None, (False, "not_better")),  # tie keeps it
        (_CHAMP, "iou", 0.6, "test:aaa", 0.9, (True, "better")),  # rescore unused: same data
        # other test data, other metric, no score: never compared with the tagged score
        (_CHAMP, "iou", 0.9, "test:bbb", None, (False, "incomparable")),
        (_CHAMP, "dice", 0.9, "test:aaa", None, (False, "incomparable")),
        ({**_CHAMP, "value": None}, "iou", 0.9, "test:aaa", None, (False, "incomparable")),
        ({"version": 3}, "iou", 0.9, "test:aaa", None, (False, "incomparable")),
        # ... but with the champion's score re-evaluated on this test data
        (_CHAMP, "iou", 0.3, "test:bbb", 0.2, (True, "better")),
        (_CHAMP, "iou", 0.3, "test:bbb", 0.4, (False, "not_better")),
        (_CHAMP, "iou", 0.3, "test:bbb", 0.3, (False, "not_better")),
        ({"version": 3}, "iou", 0.3, "test:aaa", 0.1, (True, "better")),
    ],
)
def test_decide_alias(
    previous: dict[str, Any] | None,
    metric: str,
    value: float,
    test_data_id: str,
    rescored: float | None,
    expected: tuple[bool, str],
) -> None:
    assert tracking.decide_alias(previous, metric, value, test_data_id, rescored) == expected


def test_explicit_stores_are_independent(
    tmp_path: Path, clean_env: None, empty_mlflow_db: Path
) -> None:
    dbs = [seed_store(empty_mlflow_db, tmp_path / n) for n in "ab"]
    a, b = (tracking.open_store(f"sqlite:///{db}") for db in dbs)
    assert a.uri != b.uri
    with tracking.start_training_run({"x": 1}, {}, "in-a", store=a) as run:
        pass
    assert a.get_run(run.info.run_id).info.run_name == "in-a"
    with pytest.raises(ModelNotFoundError, match=r"not found in tracking store sqlite:///.*/b/"):
        b.get_run(run.info.run_id)
    with pytest.raises(ModelNotFoundError, match=r"has no logged model 'model'"):
        tracking.model_info(f"runs:/{run.info.run_id}/model", store=a)


def _cfg(name: str) -> RegisterConfig:
    return RegisterConfig(model_name=name)


def _aliases(name: str) -> dict[str, int]:
    from mlflow import MlflowClient

    return {a: int(v) for a, v in MlflowClient().get_registered_model(name).aliases.items()}


def test_register_rule(logged: dict[str, Any]) -> None:
    run_id = logged["run_id"]
    cfg = _cfg("rule")

    first = tracking.register_model(run_id, "iou", 0.5, cfg, "test:aaa")
    assert first == {
        "model_name": "rule",
        "version": 1,
        "alias": "champion",
        "metric": "iou",
        "value": 0.5,
        "previous_champion": None,
        "champion_rescored": None,
        "test_data_id": "test:aaa",
        "run_id": run_id,
        "reason": "first",
        "message": "no champion yet: this version is the first",
    }
    worse = tracking.register_model(run_id, "iou", 0.4, cfg, "test:aaa")
    assert worse["message"] == (
        "iou=0.4000 does not beat the champion v1's iou=0.5000 on the same test data"
    )
    assert (worse["version"], worse["alias"], worse["reason"]) == (2, "challenger", "not_better")
    assert worse["previous_champion"] == {
        "version": 1,
        "run_id": run_id,
        "metric": "iou",
        "value": 0.5,
        "test_data_id": "test:aaa",
    }
    assert _aliases("rule") == {"champion": 1, "challenger": 2}

    tie = tracking.register_model(run_id, "iou", 0.5, cfg, "test:aaa")
    assert (tie["version"], tie["alias"], tie["reason"]) == (3, "challenger", "not_better")
    assert _aliases("rule") == {"champion": 1, "challenger": 3}

    better = tracking.register_model(run_id, "iou", 0.6, cfg, "test:aaa")
    assert (better["version"], better["alias"], better["reason"]) == (4, "champion", "better")
    assert better["previous_champion"]["version"] == 1
    assert _aliases("rule") == {"champion": 4, "challenger": 3}

    # other test data: a much higher number is not compared with the champion's
    other_data = tracking.register_model(run_id, "iou", 0.99, cfg, "test:bbb")
    assert (other_data["alias"], other_data["reason"]) == ("challenger", "incomparable")
    assert other_data["previous_champion"]["test_data_id"] == "test:aaa"
    assert other_data["champion_rescored"] is None
    assert other_data["message"].startswith(
        "not promoted: the champion v4 was scored iou=0.6000 on test data test:aaa; this "
        "model iou on test:bbb; numbers from different test sets are not compared, and it "
        "was not re-evaluated on this test data. Move the alias by hand"
    )
    assert _aliases("rule") == {"champion": 4, "challenger": 5}

    other_metric = tracking.register_model(run_id, "dice", 0.99, cfg, "test:aaa")
    assert (other_metric["alias"], other_metric["reason"]) == ("challenger", "incomparable")
    assert _aliases("rule")["champion"] == 4


def test_register_rescores_a_champion_on_other_test_data(logged: dict[str, Any]) -> None:
    """The champion's number on the new test data decides; a failed rescore never promotes."""
    run_id, cfg = logged["run_id"], _cfg("rescore")
    tracking.register_model(run_id, "iou", 0.9, cfg, "test:old")
    asked: list[str] = []

    def rescore_to(value: float) -> Any:
        def rescore(uri: str) -> float:
            asked.append(uri)
            return value

        return rescore

    worse = tracking.register_model(run_id, "iou", 0.5, cfg, "test:new", rescore=rescore_to(0.6))
    assert asked == ["models:/rescore/1"]
    assert (worse["alias"], worse["reason"]) == ("challenger", "not_better")
    assert worse["champion_rescored"] == {
        "uri": "models:/rescore/1", "metric": "iou", "value": 0.6, "test_data_id": "test:new",
        "error": None,
    }  # fmt: skip
    assert worse["message"] == (
        "iou=0.5000 does not beat the champion v1 re-evaluated on this test data (iou=0.6000; "
        "the champion v1 was scored iou=0.9000 on test data test:old; this model iou on "
        "test:new)"
    )
    assert _aliases("rescore") == {"champion": 1, "challenger": 2}

    def broken(uri: str) -> float:
        raise ValueError(f"{uri}: 3 output channels for 2 classes")

    failed = tracking.register_model(run_id, "iou", 0.99, cfg, "test:new", rescore=broken)
    assert (failed["alias"], failed["reason"]) == ("challenger", "incomparable")
    assert failed["champion_rescored"]["error"] == (
        "ValueError: models:/rescore/1: 3 output channels for 2 classes"
    )
    assert (
        "re-evaluating it on this test data failed (ValueError: models:/rescore/1: 3"
        in (failed["message"])
    )
    nan = tracking.register_model(run_id, "iou", 0.9, cfg, "test:new", rescore=rescore_to(math.nan))
    assert (nan["reason"], nan["champion_rescored"]["error"]) == (
        "incomparable", "its iou is not finite",
    )  # fmt: skip
    assert _aliases("rescore") == {"champion": 1, "challenger": 4}

    better = tracking.register_model(run_id, "iou", 0.7, cfg, "test:new", rescore=rescore_to(0.6))
    assert (better["version"], better["alias"], better["reason"]) == (5, "champion", "better")
    # from now on the champion is scored on test:new: compared directly, no rescore
    asked.clear()
    tracking.register_model(run_id, "iou", 0.65, cfg, "test:new", rescore=rescore_to(0.0))
    assert asked == []
    assert _aliases("rescore") == {"champion": 5, "challenger": 6}


def test_register_tags_versions_and_custom_aliases(logged: dict[str, Any]) -> None:
    from mlflow import MlflowClient

    cfg = RegisterConfig(model_name="tagged", champion_alias="prod", challenger_alias="cand")
    tracking.register_model(logged["run_id"], "iou", 1 / 3, cfg, "test:aaa")
    second = tracking.register_model(logged["run_id"], "iou", 0.1, cfg, "test:aaa")
    assert second["alias"] == "cand"
    assert _aliases("tagged") == {"prod": 1, "cand": 2}
    mv = MlflowClient().get_model_version("tagged", "1")
    assert mv.tags["eval_metric"] == "iou"
    assert float(mv.tags["eval_value"]) == 1 / 3  # exact round trip
    assert mv.tags["test_data_id"] == "test:aaa"
    assert mv.tags["registration_reason"] == "first"
    assert mv.tags["registration_message"] == "no champion yet: this version is the first"
    assert mv.tags["git_commit"] == "abc123"
    assert mv.tags["n_classes"] == "2"
    assert mv.description == "iou=0.3333 on test data test:aaa (first)"


def test_register_champion_without_score_tags_is_incomparable(logged: dict[str, Any]) -> None:
    import mlflow
    from mlflow import MlflowClient

    mv = mlflow.register_model(logged["uri"], "untagged")
    MlflowClient().set_registered_model_alias("untagged", "champion", mv.version)
    result = tracking.register_model(logged["run_id"], "iou", 0.2, _cfg("untagged"), "test:a")
    assert (result["alias"], result["reason"]) == ("challenger", "incomparable")
    assert result["previous_champion"]["value"] is None
    assert result["message"].startswith("not promoted: the champion v1 has no score tags;")


def test_register_errors(store: Path, logged: dict[str, Any]) -> None:
    cfg = _cfg("errors")
    with pytest.raises(ValueError, match=r"register_model: iou value must be finite, got nan"):
        tracking.register_model(logged["run_id"], "iou", math.nan, cfg, "t")
    with pytest.raises(ValueError, match=r"register_model: test_data_id is empty"):
        tracking.register_model(logged["run_id"], "iou", 0.5, cfg, "")
    with pytest.raises(ValueError, match=r"register_model: metric name is empty"):
        tracking.register_model(logged["run_id"], "", 0.5, cfg, "t")
    with pytest.raises(ModelNotFoundError, match=r"run 'nope' not found in tracking store"):
        tracking.register_model("nope", "iou", 0.5, cfg, "t")
    with tracking.start_training_run({}, {}) as run:
        pass
    with pytest.raises(
        ModelNotFoundError,
        match=rf"run '{run.info.run_id}' has no logged model 'model' "
        rf"\(runs:/{run.info.run_id}/model\)",
    ):
        tracking.register_model(run.info.run_id, "iou", 0.5, cfg, "t")


# -------------------------------------------------------------------- loading


def test_load_model_by_alias_version_and_info(logged: dict[str, Any]) -> None:
    run_id = logged["run_id"]
    tracking.log_evaluation(run_id, {"iou": 0.77, "threshold": 0.35}, [])
    tracking.register_model(run_id, "iou", 0.77, _cfg("loadme"), "test:aaa")
    for uri in ("models:/loadme@champion", "models:/loadme/1"):
        model = tracking.load_model(uri)
        np.testing.assert_allclose(model.predict(logged["x"], verbose=0), logged["y"], rtol=1e-6)

    info = tracking.model_info("models:/loadme@champion")
    assert info["name"] == "loadme"
    assert info["version"] == 1
    assert info["alias"] == "champion"
    assert info["aliases"] == ["champion"]
    assert info["run_id"] == run_id
    assert info["git_commit"] == "abc123"
    assert info["data_dvc_md5"] == "d41d8"
    assert info["test_data_id"] == "test:aaa"
    assert info["n_classes"] == 2
    assert info["class_names"] == ["background", "mitochondria"]
    assert info["metrics"]["test_iou"] == pytest.approx(0.77)
    assert "threshold" not in info  # the threshold lives in the inference plan only
    assert info["tags"]["eval_value"] == "0.77"

    run_info = tracking.model_info(logged["uri"])
    assert (run_info["name"], run_info["version"], run_info["run_id"]) == (None, None, run_id)


def test_inference_plan_travels_with_the_registered_model(
    logged: dict[str, Any], tmp_path: Path
) -> None:
    from mitoseg.inference.plan import InferencePlan

    run_id = logged["run_id"]
    assert tracking.load_inference_plan(logged["uri"]) is None
    _, default = tracking.load_model_and_plan(logged["uri"])
    assert default.source == "default" and default.threshold == 0.5
    plan = InferencePlan.default_for(1, 1, tile_size=64, halo=8, threshold=0.35)
    plan = plan.with_overrides(source="evaluate", threshold_source="validation")
    plan = plan.with_calibration(np.full((1, 8, 8), 7, np.uint8))  # travels with it
    path = plan.write(tmp_path / "elsewhere.json")
    tracking.log_inference_plan(run_id, path)
    tracking.register_model(run_id, "iou", 0.7, _cfg("planned"), "test:p")
    for uri in ("models:/planned@champion", "models:/planned/1", logged["uri"]):
        assert tracking.load_inference_plan(uri) == plan
        _, loaded = tracking.load_model_and_plan(uri)
        assert loaded == plan
        np.testing.assert_array_equal(loaded.calibration_images(), plan.calibration_images())
    import mlflow

    client = mlflow.MlflowClient()
    names = [a.path for a in client.list_artifacts(run_id)]
    assert "inference_plan.json" in names and "inference_calibration.npy" in names
    with pytest.raises(FileNotFoundError, match=r"^log_inference_plan: .*nope.json not found$"):
        tracking.log_inference_plan(run_id, tmp_path / "nope.json")


def test_load_model_from_keras_file(tmp_path: Path) -> None:
    model = _tiny_model()
    path = tmp_path / "model.keras"
    model.save(path)
    x = np.ones((1, 4, 4, 1), np.float32)
    loaded = tracking.load_model(str(path))
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    info = tracking.model_info(str(path))
    assert (info["name"], info["run_id"], info["metrics"]) == (
        None,
        None,
        {},
    )


@pytest.fixture(scope="module")
def known(logged: dict[str, Any]) -> str:
    """Registered model ``known`` (version 1, champion) of the logged run; its run id."""
    tracking.register_model(logged["run_id"], "iou", 0.5, _cfg("known"), "t")
    return logged["run_id"]


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("models:/ghost@champion", r"unknown registered model 'ghost' \(models:/ghost@champion\)"),
        ("models:/known@staging", r"registered model 'known' has no alias 'staging' "
         r"\(models:/known@staging\)"),
        ("models:/known/99", r"registered model 'known' has no version 99 \(models:/known/99\)"),
        ("runs:/deadbeef/model", r"run 'deadbeef' \(runs:/deadbeef/model\) not found"),
        ("runs:/{run}/other", r"run '{run}' has no logged model 'other' \(runs:/{run}/other\)"),
        ("{tmp}/missing.keras", r"model file not found: {tmp}/missing.keras"),
    ],
)  # fmt: skip
def test_unknown_models_are_named(known: str, tmp_path: Path, uri: str, message: str) -> None:
    uri = uri.format(run=known, tmp=tmp_path)
    message = message.format(run=known, tmp=tmp_path)
    with pytest.raises(ModelNotFoundError, match=message):
        tracking.load_model(uri)
    with pytest.raises(ModelNotFoundError, match=message):
        tracking.model_info(uri)


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("s3://b/m", r"unsupported model URI 's3://b/m'; use a .keras path"),
        ("models:/only-name", r"unsupported model URI 'models:/only-name'"),
        (" ", r"model URI is empty"),
        ("{tmp}/notes.txt", r"{tmp}/notes.txt: not a .keras file or an MLflow model dir"),
    ],
)
def test_bad_model_uris(store: Path, tmp_path: Path, uri: str, message: str) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=message.format(tmp=tmp_path)):
        tracking.load_model(uri.format(tmp=tmp_path))


def test_load_model_without_store_does_not_create_one(
    clean_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ModelNotFoundError,
        match=rf"no MLflow tracking store at {tmp_path.resolve()}/mlflow.db",
    ):
        tracking.load_model("models:/mitoseg-unet@champion")
    assert not (tmp_path / "mlflow.db").exists()


def test_load_model_uses_embedded_default_in_cwd(
    clean_env: None, logged: dict[str, Any], store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`mitoseg predict --model models:/...` in the project dir resolves against ./mlflow.db."""
    monkeypatch.chdir(store)
    tracking.register_model(logged["run_id"], "iou", 0.5, _cfg("cwd-default"), "t")
    reset_tracking()
    model = tracking.load_model("models:/cwd-default@champion")
    np.testing.assert_allclose(model.predict(logged["x"], verbose=0), logged["y"], rtol=1e-6)


# --------------------------------------------------------------- test data id


def test_compute_test_data_id(logged: dict[str, Any], tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    (raw / "test").mkdir(parents=True)
    (raw / "test" / "images.tif").write_bytes(b"images")
    first = tracking.compute_test_data_id(raw)
    assert first.startswith("test:") and len(first) == len("test:") + 32
    assert tracking.compute_test_data_id(raw) == first
    (raw / "test" / "masks.tif").write_bytes(b"masks")
    with_masks = tracking.compute_test_data_id(raw)
    assert with_masks != first
    (raw / "test" / "masks.tif").write_bytes(b"masks2")
    assert tracking.compute_test_data_id(raw) != with_masks

    empty = tmp_path / "empty"
    assert tracking.compute_test_data_id(empty, run_id=logged["run_id"]) == "data.dvc:d41d8"
    (tmp_path / "data.dvc").write_text("outs:\n- md5: feed.dir\n  path: raw\n")
    assert tracking.compute_test_data_id(empty, repo_root=tmp_path) == "data.dvc:feed.dir"
    with pytest.raises(ValueError, match=r"cannot identify the test data: no .*/empty/test/images"):
        tracking.compute_test_data_id(empty, repo_root=empty)
