"""A training run killed with SIGKILL after an epoch resumes from its backup.

The first run executes in a subprocess that sleeps after each epoch's backup is written;
the test kills it as soon as the epoch-1 backup exists, checks that a run with a different
configuration starts from scratch (and leaves that backup alone), then reruns the original
configuration and checks that it continued from epoch 2. Every run is tracked in a real
sqlite MLflow store: the killed run stays RUNNING until the resumed one ends it as KILLED
and logs the full history (all three epochs) into its own run. Finally an uninterrupted run
of the same configuration must give the same history and weights, bit for bit.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from tracking_state import seed_store

pytestmark = pytest.mark.integration

DRIVER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path

    import keras
    from mlflow import MlflowClient

    from mitoseg import tracking
    from mitoseg.config import AugmentConfig, resolve_train_config
    from mitoseg.model.callbacks import MlflowEpochLogger
    from mitoseg.train import train_model

    # patches, checkpoint root, seconds to sleep after each epoch, then runs "out:lr" ...
    patches, ck, sleep, *runs = sys.argv[1:]

    class Sleep(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            time.sleep(float(sleep))

    tracking.configure_tracking()  # MLFLOW_TRACKING_URI
    for spec in runs:  # one after another in this process, as separate `dvc repro`s would
        out, lr = spec.rsplit(":", 1)
        cfg = resolve_train_config({
            "model": {"depth": 2, "base_filters": 4},
            "crop_size": 32, "batch_size": 2, "steps_per_epoch": 2, "epochs": 3,
            "learning_rate": float(lr), "early_stopping_patience": 10,
        })
        with tracking.start_training_run(cfg.model_dump(mode="json"), {}, "resume-test") as run:
            print("RUN " + run.info.run_id, flush=True)
            result = train_model(Path(patches), AugmentConfig(), cfg, 2, 0, Path(out), Path(ck),
                                 progress=False, callbacks=[MlflowEpochLogger(), Sleep()])
        runs_now = MlflowClient().search_runs([run.info.experiment_id])
        print("RESULT " + json.dumps({
            "resumed": result.resumed, "epochs_run": result.epochs_run, "run_key": result.run_key,
            "history": result.history, "best_epoch": result.best_epoch,
            "run_id": run.info.run_id,
            "backups": sorted(p.name for p in Path(ck).iterdir()),  # after this run
            "statuses": {r.info.run_id: r.info.status for r in runs_now},
        }), flush=True)
    """
)


def _make_patches(d: Path, n: int = 4, size: int = 32) -> Path:
    rng = np.random.default_rng(0)
    d.mkdir(parents=True)
    yy, xx = np.mgrid[:size, :size]
    for split in ("train", "val"):
        masks = np.stack(
            [
                (((yy - rng.uniform(8, 24)) / 6) ** 2 + ((xx - rng.uniform(8, 24)) / 5) ** 2 < 1)
                for _ in range(n)
            ]
        ).astype(np.uint8)
        images = np.clip(rng.normal(0.3, 0.1, masks.shape) + 0.4 * masks, 0, 1)
        np.save(d / f"{split}_images.npy", (images * 255).astype(np.uint8))
        np.save(d / f"{split}_masks.npy", masks)
    return d


def _run(script: Path, args: list[str], env: dict[str, str], timeout: float = 300) -> list[dict]:
    """Run the driver to its end; one result per run, in order."""
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [x[len("RESULT ") :] for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    return [json.loads(x) for x in lines]


@pytest.mark.slow  # 70 s beside the other worker on a 2-core AMD EPYC (AVX2)
def test_killed_training_resumes(tmp_path, empty_mlflow_db):
    from mlflow import MlflowClient

    patches = _make_patches(tmp_path / "patches")
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    out, ck = tmp_path / "out", tmp_path / "ck"
    uri = f"sqlite:///{seed_store(empty_mlflow_db, tmp_path)}"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "MLFLOW_TRACKING_URI": uri}

    proc = subprocess.Popen(
        [sys.executable, str(script), str(patches), str(ck), "60", f"{out}:0.001"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    deadline = time.monotonic() + 240  # a loaded machine (xdist workers, CI) is slow
    backup: Path | None = None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            metas = list(ck.glob("*/training_metadata.json"))
            if metas and json.loads(metas[0].read_text() or "{}").get("epoch") == 1:
                backup = metas[0].parent
                break
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert backup is not None, proc.stderr.read().decode()[-3000:] if proc.stderr else ""
    assert proc.returncode == -signal.SIGKILL
    stdout = proc.stdout.read().decode() if proc.stdout else ""
    killed_run = next(x for x in stdout.splitlines() if x.startswith("RUN ")).split()[1]
    with (backup / "history.csv").open() as f:  # the history lives beside the backup
        killed_rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in killed_rows] == ["1"]
    assert not (out / "model.keras").exists()  # the best weights are kept in the backup
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(killed_run).info.status == "RUNNING"  # what SIGKILL leaves

    # In one fresh process: a different configuration, which must not pick up that backup
    # (nor close that run); the original one, which resumes; then an uninterrupted run of
    # it into another directory (the reference, below).
    other, resumed, ref = _run(
        script,
        [str(patches), str(ck), "0", f"{tmp_path / 'other'}:0.002", f"{out}:0.001",
         f"{tmp_path / 'ref'}:0.001"],
        env,
    )  # fmt: skip
    assert other["resumed"] is False and other["epochs_run"] == 3
    assert other["backups"] == [backup.name]  # the interrupted run's backup is untouched
    assert other["statuses"][killed_run] == "RUNNING"
    assert resumed["resumed"] is True and resumed["backups"] == []
    assert resumed["run_key"] == backup.name and other["run_key"] != backup.name
    assert [r["epoch"] for r in resumed["history"]] == [1, 2, 3]
    assert resumed["epochs_run"] == 3
    first = resumed["history"][0]
    assert first["loss"] == pytest.approx(float(killed_rows[0]["loss"]), rel=1e-12)
    assert first["val_loss"] == pytest.approx(float(killed_rows[0]["val_loss"]), rel=1e-12)
    assert not backup.exists() and list(ck.iterdir()) == []
    assert (out / "model.keras").is_file()
    with (out / "history.csv").open() as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2", "3"]

    # MLflow: the killed run is closed, the new one holds every epoch.
    killed, new = client.get_run(killed_run), client.get_run(resumed["run_id"])
    assert killed.info.status == "KILLED"
    assert killed.data.tags["superseded_by"] == new.info.run_id
    assert new.info.status == "FINISHED" and new.data.tags["supersedes"] == killed_run
    for key in ("loss", "val_loss", "accuracy", "val_iou", "lr"):
        steps = sorted(m.step for m in client.get_metric_history(new.info.run_id, key))
        assert steps == [0, 1, 2], key
    val_loss = {m.step: m.value for m in client.get_metric_history(new.info.run_id, "val_loss")}
    assert val_loss[0] == pytest.approx(float(killed_rows[0]["val_loss"]), rel=1e-12)
    assert val_loss[2] == pytest.approx(resumed["history"][2]["val_loss"], rel=1e-12)

    # Bit for bit what an uninterrupted run of the same configuration gives.
    assert ref["resumed"] is False and ref["history"] == resumed["history"]
    import keras

    want = keras.saving.load_model(tmp_path / "ref" / "model.keras").get_weights()
    got = keras.saving.load_model(out / "model.keras").get_weights()
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(a, b)
