"""Training runs: open a run, log the Keras model, the training outcome and test metrics.

Every function opens the store per call (:func:`mitoseg.tracking.store.open_store`) unless
it is handed one; mlflow and keras are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mitoseg.tracking.store import DEFAULT_ARTIFACT_PATH, TrackingStore, open_store

if TYPE_CHECKING:
    import keras
    from mlflow import ActiveRun

__all__ = [
    "flatten_dict",
    "log_evaluation",
    "log_keras_model",
    "log_training_outcome",
    "start_training_run",
]

#: MLflow rejects longer parameter values.
_MAX_PARAM_LEN = 6000
_METRIC_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")


def flatten_dict(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings with dotted keys: ``{"model": {"depth": 4}}`` -> ``model.depth``."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_dict(value, prefix=f"{name}."))
        else:
            out[name] = value
    return out


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    if len(text) > _MAX_PARAM_LEN:
        text = text[: _MAX_PARAM_LEN - 3] + "..."
    return text


@contextlib.contextmanager
def start_training_run(
    params: Mapping[str, Any],
    tags: Mapping[str, Any],
    run_name: str | None = None,
    *,
    store: TrackingStore | None = None,
) -> Iterator[ActiveRun]:
    """Open an MLflow run in experiment ``mitoseg`` and log params and tags.

    Args:
        params: (nested) parameters; logged flattened with dotted keys (``model.depth``).
            Lists are logged as JSON, everything else with ``str``.
        tags: run tags, e.g. :func:`lineage_tags`; values are converted with ``str``.
        run_name: display name of the run; MLflow generates one when None.
        store: where to log; :func:`open_store` (environment / cwd default) when None.

    Yields:
        The active run (``run.info.run_id``). It ends when the block exits; an exception
        marks it FAILED and propagates.
    """
    import mlflow

    store = store or open_store()
    mlflow.set_tracking_uri(store.uri)
    flat = {k: _param_value(v) for k, v in flatten_dict(params).items()}
    with mlflow.start_run(
        experiment_id=store.experiment_id,
        run_name=run_name,
        tags={str(k): str(v) for k, v in tags.items()},
    ) as run:
        if flat:
            mlflow.log_params(flat)
        yield run


def _to_float(value: Any) -> float | None:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return None
    try:
        import numpy as np

        arr = np.asarray(value)
        if arr.size != 1:
            return None
        return float(arr.reshape(()))
    except (TypeError, ValueError):
        return None


def _model_signature(out_channels: int) -> Any:
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype("float32"), (-1, -1, -1, 1), "image")]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, -1, -1, out_channels), "probs")]),
    )


def _pip_requirements() -> list[str]:
    import keras
    import mlflow.keras

    reqs = list(mlflow.keras.get_default_pip_requirements())
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        reqs.append(f"tensorflow=={tf.__version__}")
    return reqs


def log_keras_model(
    model: keras.Model,
    n_classes: int,
    artifact_path: str = DEFAULT_ARTIFACT_PATH,
    class_names: list[str] | None = None,
) -> str:
    """Log a Keras model (keras flavour, with signature) into the active run.

    The signature is input ``(-1, -1, -1, 1) float32`` -> output ``(-1, -1, -1, C)
    float32`` with ``C = 1`` for binary (``n_classes == 2``), else ``C = n_classes``.
    ``n_classes`` and ``class_names`` (JSON list) are set as run tags and model tags.

    Args:
        model: Keras model with a single ``(N, H, W, C)`` output.
        n_classes: number of classes including background (>= 2).
        artifact_path: name of the logged model in the run.
        class_names: class names in index order; ``class_0..`` when None.

    Returns:
        The model URI ``runs:/<run_id>/<artifact_path>``.

    Raises:
        ValueError: ``n_classes`` < 2, ``class_names`` of the wrong length, or the model's
            output channels do not match ``n_classes``.
        RuntimeError: no active MLflow run.
    """
    import mlflow
    import mlflow.keras

    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 2:
        raise ValueError(f"log_keras_model: n_classes must be an int >= 2, got {n_classes!r}")
    names = (
        list(class_names) if class_names is not None else [f"class_{i}" for i in range(n_classes)]
    )
    if len(names) != n_classes:
        raise ValueError(
            f"log_keras_model: {len(names)} class_names given for n_classes={n_classes}"
        )
    expected = 1 if n_classes == 2 else n_classes
    out_shape = model.output_shape
    channels = out_shape[-1] if isinstance(out_shape, tuple) else None
    if channels != expected:
        raise ValueError(
            f"log_keras_model: model output shape {out_shape} has {channels} channels but "
            f"n_classes={n_classes} needs {expected}"
        )
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError(
            "log_keras_model: no active MLflow run; call it inside start_training_run(...)"
        )
    tags = {"n_classes": str(n_classes), "class_names": json.dumps(names)}
    mlflow.keras.log_model(
        model,
        name=artifact_path,
        signature=_model_signature(expected),
        pip_requirements=_pip_requirements(),
        tags=tags,
    )
    mlflow.set_tags(tags)
    return f"runs:/{run.info.run_id}/{artifact_path}"


def log_training_outcome(
    result: Any,
    history_csv: Path,
    n_classes: int,
    class_names: list[str] | None = None,
) -> str:
    """Log a finished training into the active run: summary metrics, stop tags, the
    per-epoch ``history.csv`` and the best model (via :func:`log_keras_model`).

    Args:
        result: :class:`mitoseg.train.TrainResult`.
        history_csv: the per-epoch curves written by training.
        n_classes: classes including background.
        class_names: class names in index order.

    Returns:
        The logged model URI ``runs:/<run_id>/model``.
    """
    import keras
    import mlflow

    mlflow.log_metrics(
        {
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            "train_seconds": result.train_seconds,
            "patches_per_second": result.patches_per_second,
        }
    )
    mlflow.set_tags({"resumed": str(result.resumed), "stop_reason": result.stop_reason})
    mlflow.log_artifact(str(history_csv))
    model = keras.models.load_model(result.model_path, compile=False)
    return log_keras_model(model, n_classes, class_names=class_names)


def log_evaluation(
    run_id: str,
    metrics: Mapping[str, Any],
    artifacts: list[Path],
    prefix: str = "test_",
    *,
    store: TrackingStore | None = None,
) -> dict[str, float]:
    """Log final test metrics and figures into the (finished) training run.

    Nested mappings are flattened with dots (``objects.f1`` -> ``test_objects.f1``);
    non-numeric leaves (strings, None, booleans, lists) are skipped. The prefix keeps test
    metrics apart from the per-epoch training metrics of the same name (``iou``).
    Files are logged under ``evaluation/``; a directory under ``evaluation/<dir name>/``.

    Args:
        run_id: the training run.
        metrics: e.g. the content of ``metrics.json``.
        artifacts: files or directories to attach.
        prefix: prepended to every metric key.
        store: the run's store; :func:`open_store` when None.

    Returns:
        The metrics logged, ``{key: value}``.

    Raises:
        FileNotFoundError: an artifact path does not exist (nothing is logged then).
        ModelNotFoundError: the run does not exist.
    """
    import time

    from mlflow.entities import Metric

    missing = [str(p) for p in artifacts if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"log_evaluation: artifact(s) not found: {', '.join(missing)}")
    store = store or open_store()
    store.get_run(run_id)
    client = store.client()
    logged: dict[str, float] = {}
    for key, value in flatten_dict(metrics).items():
        number = _to_float(value)
        if number is None:
            continue
        logged[_METRIC_KEY_BAD.sub("_", f"{prefix}{key}")] = number
    stamp = int(time.time() * 1000)
    items = [Metric(k, v, stamp, 0) for k, v in logged.items()]
    for start in range(0, len(items), 500):
        client.log_batch(run_id, metrics=items[start : start + 500])
    for path in map(Path, artifacts):
        if path.is_dir():
            client.log_artifacts(run_id, str(path), artifact_path=f"evaluation/{path.name}")
        else:
            client.log_artifact(run_id, str(path), artifact_path="evaluation")
    return logged
