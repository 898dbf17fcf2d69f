"""The `train` stage script end to end (subprocess, tiny model, embedded MLflow store)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_train import TINY, make_patches

from mitoseg.config import AugmentConfig
from tracking_state import seed_store

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "pipelines" / "train.py"


def _run(cwd: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--patches",
        "patches",
        "--augment",
        "augment.json",
        "--checkpoints",
        "ckpt",
        "--out",
        "out",
        "--no-progress",
        *extra,
    ]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def stage_dir(tmp_path: Path, empty_mlflow_db: Path) -> Path:
    seed_store(empty_mlflow_db, tmp_path)  # the stage's embedded store, migrated already
    make_patches(tmp_path / "patches")
    (tmp_path / "augment.json").write_text(
        json.dumps({"seed": 0, "augment": AugmentConfig().model_dump(mode="json")})
    )
    params = {"base": {"seed": 0}, "train": {"preset": "default", **TINY}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def test_train_stage_writes_outputs_and_logs_run(stage_dir: Path) -> None:
    """With a wall-clock budget beside the steps (steps alone: tests/unit/test_finetune.py)."""
    params = yaml.safe_load((stage_dir / "params.yaml").read_text())
    params["train"]["max_train_seconds"] = 3600
    (stage_dir / "params.yaml").write_text(yaml.safe_dump(params))
    proc = _run(stage_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((stage_dir / "out" / "train.json").read_text())
    assert info["n_classes"] == 2 and info["class_names"] == ["background", "class1"]
    assert info["epochs_run"] == 2 and (stage_dir / "out" / "model.keras").is_file()

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{stage_dir / 'mlflow.db'}")
    run = client.get_run(info["run_id"])
    assert run.data.tags["class_names"] == json.dumps(["background", "class1"])
    assert run.data.tags["stop_reason"] == info["stop_reason"]
    assert run.data.metrics["epochs_run"] == 2
    assert [a.path for a in client.list_artifacts(info["run_id"])] == ["history.csv"]
    for key in ("val_loss", "accuracy", "val_accuracy", "val_iou", "lr"):
        assert sorted(m.step for m in client.get_metric_history(info["run_id"], key)) == [0, 1]
    assert run.data.tags["train_budget"] == "steps+wall_clock:3600s"
    assert len(run.data.tags["resume_key"]) == 16 and info["params"]["max_train_seconds"] == 3600
    assert run.data.params["max_train_seconds"] == "3600.0"
    assert run.data.params["deterministic"] == "True"
    assert info["run_key"] and info["init_from"] is None
    with (stage_dir / "out" / "history.csv").open() as f:
        header = f.readline().strip().split(",")
    assert header[:5] == ["epoch", "loss", "val_loss", "accuracy", "val_accuracy"]


def test_train_stage_rejects_mismatched_patches(stage_dir: Path) -> None:
    params = yaml.safe_load((stage_dir / "params.yaml").read_text())
    params["base"]["classes"] = {"background": 0, "a": 1, "b": 2}
    (stage_dir / "params.yaml").write_text(yaml.safe_dump(params))
    proc = _run(stage_dir)
    assert proc.returncode == 1
    assert (
        f"train: {Path('patches') / 'meta.json'}: n_classes 2 differs from base.classes (3); "
        "rerun the patchify stage"
    ) in proc.stderr
    assert not (stage_dir / "out" / "train.json").exists()


def test_train_stage_missing_meta(stage_dir: Path) -> None:
    (stage_dir / "patches" / "meta.json").unlink()
    proc = _run(stage_dir)
    assert proc.returncode == 1
    assert "patches/meta.json: patch metadata not found" in (proc.stderr)
