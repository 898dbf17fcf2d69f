"""Test helper: leave MLflow's process state as a fresh process has it.

Importable as ``tracking_state`` (pytest puts ``tests/`` on ``sys.path``). ``mitoseg.tracking``
keeps no state of its own; this only ends active MLflow runs and unsets the tracking URI
that ``mlflow.set_tracking_uri`` stores (and mirrors into ``$MLFLOW_TRACKING_URI``),
through MLflow's public API.
"""

from __future__ import annotations


def reset_tracking() -> None:
    """End active MLflow runs and forget the tracking URI set in this process."""
    import mlflow

    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
