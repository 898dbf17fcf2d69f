"""Test helper: leave MLflow's process state as a fresh process has it.

Importable as ``tracking_state`` (pytest puts ``tests/`` on ``sys.path``). ``mitoseg.tracking``
keeps no state of its own; this only ends active MLflow runs and unsets the tracking URI
that ``mlflow.set_tracking_uri`` stores (and mirrors into ``$MLFLOW_TRACKING_URI``) and
the experiment ``mlflow.set_experiment`` selects (and mirrors into
``$MLFLOW_EXPERIMENT_ID``).
"""

from __future__ import annotations


def reset_tracking() -> None:
    """End active MLflow runs and forget the tracking URI and the experiment selected in
    this process."""
    import os

    import mlflow
    from mlflow.tracking import fluent

    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
    # mlflow.set_experiment stores the id in the module and mirrors it into
    # $MLFLOW_EXPERIMENT_ID (inherited by subprocesses); MLflow has no public call to undo it
    fluent._active_experiment_id = None
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
