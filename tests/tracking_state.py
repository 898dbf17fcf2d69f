"""Test helper: leave MLflow's process state as a fresh process has it.

Importable as ``tracking_state`` (pytest puts ``tests/`` on ``sys.path``). ``mitoseg.tracking``
keeps no state of its own; this only ends active MLflow runs and unsets the tracking URI
that ``mlflow.set_tracking_uri`` stores (and mirrors into ``$MLFLOW_TRACKING_URI``) and
the experiment ``mlflow.set_experiment`` selects (and mirrors into
``$MLFLOW_EXPERIMENT_ID``).
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

import pytest


def reset_tracking() -> None:
    """End active MLflow runs and forget the tracking URI and the experiment selected in
    this process."""
    import mlflow
    from mlflow.tracking import fluent

    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
    # mlflow.set_experiment stores the id in the module and mirrors it into
    # $MLFLOW_EXPERIMENT_ID (inherited by subprocesses); MLflow has no public call to undo it
    fluent._active_experiment_id = None
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty embedded MLflow store (``mlflow.db``, every migration applied: seconds of
    work), made once per test session and shared by the pytest-xdist workers. Copy it
    where a test's store goes (:func:`seed_store`) instead of migrating a new one; the
    tests of how a store is created (``test_tracking.py``'s ``configure_tracking`` tests)
    keep making their own. Read-only: tests must not open it in place."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the session's folder, above each worker's own
    path = shared / "empty_mlflow" / "mlflow.db"
    with (shared / "empty_mlflow.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one worker makes it, the others wait
        if not path.is_file():
            from mlflow import MlflowClient

            path.parent.mkdir(exist_ok=True)
            tmp = path.with_name("making.db")
            MlflowClient(tracking_uri=f"sqlite:///{tmp}").search_experiments()
            os.replace(tmp, path)
    return path


def seed_store(empty_db: Path, root: Path, name: str = "mlflow.db") -> Path:
    """Copy :func:`empty_mlflow_db`'s store to ``root/name`` (by default the embedded
    store's place, as ``configure_tracking(root=root)`` and the stage scripts expect it);
    returns the copy."""
    root.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copyfile(empty_db, root / name))
