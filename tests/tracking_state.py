"""Test helper: reset ``mitoseg.tracking``'s process state between tests.

Importable as ``tracking_state`` (pytest puts ``tests/`` on ``sys.path``). Goes away
with the module-global store state (issue: tracking package without global state).
"""

from __future__ import annotations

from mitoseg import tracking


def reset_tracking() -> None:
    """End active MLflow runs and forget the configured store."""
    import mlflow

    while mlflow.active_run() is not None:
        mlflow.end_run()
    tracking._STATE.uri = None
    tracking._STATE.experiment_id = None
    mlflow.set_tracking_uri(None)
