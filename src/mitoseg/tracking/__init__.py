"""MLflow tracking, lineage and model registry for mitoseg.

Everything MLflow-related goes through this package so that train, evaluate, register,
``mitoseg predict`` and the service all resolve models against the same store.

Modules (imports go downwards only; mlflow, keras and tensorflow are imported inside
functions):

* :mod:`~mitoseg.tracking.store`: :class:`TrackingStore` (URI + experiment id) and
  :func:`open_store` / :func:`configure_tracking`. No store is remembered in the package:
  functions take ``store=`` or open one per call from ``$MLFLOW_TRACKING_URI`` (which
  ``mlflow.set_tracking_uri`` keeps in step) or the embedded ``./mlflow.db``.
* :mod:`~mitoseg.tracking.lineage`: git / ``data.dvc`` / ``dvc.lock`` tags (no MLflow).
* :mod:`~mitoseg.tracking.runs`: training runs, the logged Keras model, test metrics.
* :mod:`~mitoseg.tracking.registry`: test-data identity, the pure promotion rule
  :func:`decide_alias` and :func:`register_model`.
* :mod:`~mitoseg.tracking.loading`: model URIs, :func:`load_model`, :func:`model_info` and
  the inference plan stored with a model.

The per-epoch Keras callback that logs into MLflow is
:class:`mitoseg.model.callbacks.MlflowEpochLogger`.
"""

from __future__ import annotations

from mitoseg.tracking.lineage import lineage_tags
from mitoseg.tracking.loading import (
    load_inference_plan,
    load_model,
    load_model_and_plan,
    log_inference_plan,
    log_model_file,
    model_file,
    model_info,
)
from mitoseg.tracking.registry import compute_test_data_id, decide_alias, register_model
from mitoseg.tracking.runs import (
    flatten_dict,
    log_evaluation,
    log_keras_model,
    log_training_outcome,
    start_training_run,
)
from mitoseg.tracking.store import (
    DEFAULT_ARTIFACT_PATH,
    EXPERIMENT_NAME,
    UNKNOWN,
    ModelNotFoundError,
    TrackingStore,
    configure_tracking,
    open_store,
)

__all__ = [
    "DEFAULT_ARTIFACT_PATH",
    "EXPERIMENT_NAME",
    "UNKNOWN",
    "ModelNotFoundError",
    "TrackingStore",
    "compute_test_data_id",
    "configure_tracking",
    "decide_alias",
    "flatten_dict",
    "lineage_tags",
    "load_inference_plan",
    "load_model",
    "load_model_and_plan",
    "log_evaluation",
    "log_inference_plan",
    "log_keras_model",
    "log_model_file",
    "log_training_outcome",
    "model_file",
    "model_info",
    "open_store",
    "register_model",
    "start_training_run",
]
