"""Fine-tuning: ``train.init_from`` starts training from a saved or registered model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from test_train import TINY, make_patches

from mitoseg import tracking
from mitoseg.config import AugmentConfig, ConfigError, ModelConfig, RegisterConfig
from mitoseg.config import resolve_train_config as resolve
from mitoseg.train import initial_weights, run_key, train_model
from tracking_state import reset_tracking, seed_store

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "pipelines" / "train.py"


def _unet(path: Path, n_classes: int = 2, seed: int = 123, **model: Any) -> Path:
    """Save a UNet of ``TINY``'s architecture (with ``model`` overrides) to ``path``."""
    import keras

    from mitoseg.model.unet import build_unet

    keras.utils.set_random_seed(seed)
    build_unet(ModelConfig(**{**TINY["model"], **model}), n_classes).save(path)
    return path


@pytest.fixture(scope="module")
def patches(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_patches(tmp_path_factory.mktemp("patches"))


class _Stop(Exception):
    pass


def _exact(message: str) -> str:
    return "^" + re.escape(message) + "$"


def test_training_starts_from_the_file_weights(tmp_path: Path, patches: Path) -> None:
    import keras

    path = _unet(tmp_path / "start.keras")
    cfg = resolve({**TINY, "epochs": 1, "init_from": str(path)})
    weights = initial_weights(tracking.load_model(str(path)), cfg, 2)
    seen: list[list[np.ndarray]] = []

    class Spy(keras.callbacks.Callback):
        def __init__(self, stop: bool = False) -> None:
            super().__init__()
            self.stop = stop

        def on_train_begin(self, logs: Any = None) -> None:
            seen.append(self.model.get_weights())
            if self.stop:  # the starting weights are all this run is for
                raise _Stop

    result = train_model(
        patches, AugmentConfig(), cfg, 2, 0, tmp_path / "o", tmp_path / "ck",
        progress=False, callbacks=[Spy()], init_weights=weights,
    )  # fmt: skip
    expected = keras.saving.load_model(path).get_weights()
    assert len(seen[0]) == len(expected)
    for got, want in zip(seen[0], expected, strict=True):
        np.testing.assert_array_equal(got, want)
    # the seed alone would have given other weights (stopped before its first step);
    # training then changed them
    scratch = resolve({**TINY, "epochs": 1})
    with pytest.raises(_Stop):
        train_model(
            patches, AugmentConfig(), scratch, 2, 0,
            tmp_path / "s", tmp_path / "ck", progress=False, callbacks=[Spy(stop=True)],
        )  # fmt: skip
    assert not np.array_equal(seen[1][0], expected[0])
    assert result.run_key != run_key(patches, AugmentConfig(), scratch, 2, 0)
    trained = keras.saving.load_model(result.model_path).get_weights()
    assert not np.array_equal(trained[0], expected[0])


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            {"n_classes": 3},
            "the model has 3 output channel(s), 2 classes need 1",
        ),
        (
            {"base_filters": 8},
            "architecture differs from train.model: enc0_1_conv/kernel has shape "
            "(3, 3, 1, 8), expected (3, 3, 1, 4)",
        ),
        (
            {"depth": 3},
            "architecture differs from train.model: 78 weight arrays, expected 56",
        ),
    ],
)
def test_mismatched_model_is_rejected(tmp_path: Path, source: dict, message: str) -> None:
    path = _unet(tmp_path / "other.keras", **source)
    cfg = resolve({**TINY, "init_from": str(path)})
    with pytest.raises(ValueError, match=_exact(f"train.init_from {path}: {message}")):
        initial_weights(tracking.load_model(str(path)), cfg, 2)


def test_initial_weights_needs_init_from(tmp_path: Path) -> None:
    path = _unet(tmp_path / "m.keras")
    with pytest.raises(ValueError, match=_exact("initial_weights: cfg.init_from is not set")):
        initial_weights(tracking.load_model(str(path)), resolve(TINY), 2)


@pytest.mark.parametrize(
    ("init_from", "weights", "message"),
    [
        (
            "m.keras",
            None,
            "train_model: pass init_weights exactly when cfg.init_from is set "
            "(init_from='m.keras', init_weights missing); see initial_weights",
        ),
        (
            None,
            [np.zeros(1)],
            "train_model: pass init_weights exactly when cfg.init_from is set "
            "(init_from=None, init_weights given); see initial_weights",
        ),
        (
            "m.keras",
            [np.zeros(1)],
            "train.init_from m.keras: architecture differs from train.model: "
            "1 weight arrays, expected 56",
        ),
    ],
)
def test_train_model_init_errors(
    tmp_path: Path, patches: Path, init_from: str | None, weights: list | None, message: str
) -> None:
    cfg = resolve({**TINY, "init_from": init_from})
    with pytest.raises(ValueError, match=_exact(message)):
        train_model(
            patches, AugmentConfig(), cfg, 2, 0, tmp_path / "o", tmp_path / "ck",
            progress=False, init_weights=weights,
        )  # fmt: skip


def test_init_from_must_not_be_empty() -> None:
    with pytest.raises(ConfigError, match=r"train\.init_from: String should have at least 1"):
        resolve({"init_from": ""})


# ----------------------------------------------------------------------- the stage


def _stage(cwd: Path, init_from: str, out: str) -> subprocess.CompletedProcess[str]:
    params = {"base": {"seed": 0}, "train": {**TINY, "epochs": 1, "init_from": init_from}}
    (cwd / f"{out}.yaml").write_text(yaml.safe_dump(params))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    cmd = [sys.executable, str(SCRIPT), "--patches", "patches", "--augment", "augment.json",
           "--checkpoints", "ckpt", "--out", out, "--params", f"{out}.yaml",
           "--no-progress"]  # fmt: skip
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _runs(cwd: Path) -> list[Any]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    return client.search_runs([client.get_experiment_by_name("mitoseg").experiment_id])


@pytest.fixture(scope="module")
def stage_dir(tmp_path_factory: pytest.TempPathFactory, empty_mlflow_db: Path) -> Iterator[Path]:
    """Stage inputs plus an embedded store whose registry has ``mitoseg-unet@champion``."""
    import mlflow

    root = tmp_path_factory.mktemp("stage")
    seed_store(empty_mlflow_db, root)
    make_patches(root / "patches")
    (root / "augment.json").write_text(
        json.dumps({"seed": 0, "augment": AugmentConfig().model_dump(mode="json")})
    )
    _unet(root / "other.keras", base_filters=8)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        reset_tracking()
        tracking.configure_tracking(root=root)
        model = tracking.load_model(str(_unet(root / "registered.keras")))
        with tracking.start_training_run({}, {}, "source") as run:
            tracking.log_keras_model(model, 2)
        tracking.register_model(run.info.run_id, "iou", 0.5, RegisterConfig(), "test:x")
        (root / "source_run_id").write_text(run.info.run_id)
        assert mlflow.active_run() is None
        reset_tracking()
    yield root


def test_stage_starts_from_registered_model_and_records_it(stage_dir: Path) -> None:
    proc = _stage(stage_dir, "models:/mitoseg-unet@champion", "out_registry")
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((stage_dir / "out_registry" / "train.json").read_text())
    assert info["init_from"] == "models:/mitoseg-unet@champion"
    (run,) = [r for r in _runs(stage_dir) if r.info.run_id == info["run_id"]]
    tags = run.data.tags
    assert tags["init_from"] == "models:/mitoseg-unet@champion"
    assert (tags["init_from_name"], tags["init_from_version"]) == ("mitoseg-unet", "1")
    assert tags["init_from_alias"] == "champion"
    assert tags["init_from_run_id"] == (stage_dir / "source_run_id").read_text()
    assert len(tags["init_weights_digest"]) == 16 and tags["train_budget"] == "steps"
    assert run.data.params["init_from"] == "models:/mitoseg-unet@champion"


@pytest.mark.parametrize(
    ("init_from", "message"),
    [
        (
            "other.keras",
            "train: train.init_from other.keras: architecture differs from train.model: "
            "enc0_1_conv/kernel has shape (3, 3, 1, 8), expected (3, 3, 1, 4)",
        ),
        (
            "models:/mitoseg-unet@nope",
            "train: registered model 'mitoseg-unet' has no alias 'nope' "
            "(models:/mitoseg-unet@nope)",
        ),
    ],
)
def test_stage_rejects_unusable_init_model(stage_dir: Path, init_from: str, message: str) -> None:
    before = len(_runs(stage_dir))
    proc = _stage(stage_dir, init_from, "out_rejected")
    assert proc.returncode == 1
    assert message in proc.stderr
    assert not (stage_dir / "out_rejected" / "train.json").exists()
    assert len(_runs(stage_dir)) == before  # no training run was opened
