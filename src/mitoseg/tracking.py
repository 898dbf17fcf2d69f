"""MLflow tracking, lineage and model registry for mitoseg.

Everything MLflow-related goes through this module so that train, evaluate, register,
``mitoseg predict`` and the service all resolve models against the same store.

Tracking store. :func:`configure_tracking` picks, in order, an explicit ``tracking_uri``,
``$MLFLOW_TRACKING_URI``, or the embedded default ``sqlite:///<root or cwd>/mlflow.db``
with run and model artifacts under ``<root or cwd>/mlartifacts`` (no server needed;
``mlflow ui --backend-store-uri sqlite:///mlflow.db`` shows it). Functions that need the
store call it lazily, so nothing is configured at import time and mlflow, keras and
tensorflow are only imported inside functions.

Registry rule (:func:`register_model`). Every registered version carries the tags
``eval_metric``, ``eval_value`` (``repr`` of the float, so it round-trips exactly) and
``test_data_id``. A new version becomes ``champion`` when

* there is no champion yet (``reason="first"``), or
* the champion was scored on the same metric and the same ``test_data_id`` and the new
  value is strictly greater (``reason="better"``), or
* the champion is *not comparable*: scored on a different ``test_data_id`` or metric, or
  it has no score tags (``reason="incomparable"``). Scores on different test sets cannot
  be ranked; the version scored on the current test data becomes the reference so that
  later models are compared against it (keeping the stale champion forever would block
  every future promotion).

Otherwise (worse, or a tie: ties keep the existing champion) the new version gets the
``challenger`` alias (``reason="not_better"``). A champion that is replaced keeps its
version and tags but loses the alias (aliases are unique per registered model).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    import keras
    from mlflow import ActiveRun, MlflowClient

    from mitoseg.config import RegisterConfig
    from mitoseg.plan import InferencePlan

__all__ = [
    "DEFAULT_ARTIFACT_PATH",
    "EXPERIMENT_NAME",
    "UNKNOWN",
    "ModelNotFoundError",
    "compute_test_data_id",
    "configure_tracking",
    "flatten_dict",
    "lineage_tags",
    "load_inference_plan",
    "load_model",
    "load_model_and_plan",
    "log_evaluation",
    "log_inference_plan",
    "log_keras_model",
    "log_training_outcome",
    "model_info",
    "register_model",
    "start_training_run",
]

#: MLflow experiment that holds every mitoseg run.
EXPERIMENT_NAME = "mitoseg"
#: Name (artifact path) of the model logged in each training run.
DEFAULT_ARTIFACT_PATH = "model"
#: Value of a lineage tag that could not be determined.
UNKNOWN = "unknown"
#: MLflow rejects longer parameter values.
_MAX_PARAM_LEN = 6000
#: Version tags written by :func:`register_model`.
_TAG_METRIC = "eval_metric"
_TAG_VALUE = "eval_value"
_TAG_TEST_DATA = "test_data_id"
#: Run tags copied onto a registered version (lineage and class table).
_LINEAGE_KEYS = (
    "git_commit",
    "git_dirty",
    "data_dvc_md5",
    "dvc_lock_md5",
    "n_classes",
    "class_names",
)

_MODELS_ALIAS_RE = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)$")
_MODELS_VERSION_RE = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$")
_RUNS_RE = re.compile(r"^runs:/(?P<run_id>[^/]+)/(?P<path>.+)$")
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")
_METRIC_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")


class ModelNotFoundError(LookupError):
    """A model URI names a file, run, registered model, version or alias that does not exist.

    The message always contains the URI.
    """


@dataclass
class _State:
    uri: str | None = None
    experiment_id: str | None = None


_STATE = _State()


# --------------------------------------------------------------------------- store


def _sqlite_path(uri: str) -> Path | None:
    """Database file of a ``sqlite:///`` URI, or None for other schemes."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :])


def configure_tracking(tracking_uri: str | None = None, root: Path | None = None) -> str:
    """Point MLflow at the mitoseg store and make sure experiment ``mitoseg`` exists.

    Args:
        tracking_uri: explicit tracking URI. When None, ``$MLFLOW_TRACKING_URI`` is used,
            else the embedded default ``sqlite:///<root>/mlflow.db``.
        root: directory of the embedded store (``mlflow.db`` and ``mlartifacts/``);
            the current directory when None. Created if missing.

    Returns:
        The tracking URI now in use.

    For a ``sqlite:`` store the experiment's artifact location is ``<root>/mlartifacts``
    (``root`` defaulting to the database's directory); for a server the server decides
    (e.g. ``--artifacts-destination``). Calling it again with the same arguments is a
    no-op apart from re-selecting the experiment.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    if uri is None:
        base = Path(root) if root is not None else Path.cwd()
        base = base.resolve()
        base.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{base / 'mlflow.db'}"
    db = _sqlite_path(uri)
    artifact_location: str | None = None
    if db is not None:
        art_root = Path(root).resolve() if root is not None else db.resolve().parent
        art_root.mkdir(parents=True, exist_ok=True)
        artifact_location = (art_root / "mlartifacts").as_uri()
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(EXPERIMENT_NAME)
    if exp is None:
        try:
            exp_id = client.create_experiment(EXPERIMENT_NAME, artifact_location=artifact_location)
        except MlflowException:  # created concurrently by another process
            exp = client.get_experiment_by_name(EXPERIMENT_NAME)
            if exp is None:
                raise
            exp_id = exp.experiment_id
    else:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    _STATE.uri = uri
    _STATE.experiment_id = exp_id
    return uri


def _ensure_configured(*, read_only: bool = False) -> str:
    """Configure the default store unless this process already did (or the env changed).

    With ``read_only`` a missing embedded sqlite database is an error instead of being
    created, so a lookup in the wrong directory does not leave an empty ``mlflow.db``.
    """
    import mlflow

    env_uri = os.environ.get("MLFLOW_TRACKING_URI") or None
    if _STATE.uri is not None and (env_uri is None or env_uri == _STATE.uri):
        current = mlflow.get_tracking_uri()
        if current == _STATE.uri:
            return _STATE.uri
        target: str | None = current  # set elsewhere with mlflow.set_tracking_uri
    else:
        target = env_uri
    if target is None:
        target = f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"
    db = _sqlite_path(target)
    if read_only and db is not None and not db.is_file():
        raise ModelNotFoundError(
            f"no MLflow tracking store at {db} (tracking URI {target}); run the pipeline "
            "in this directory or set MLFLOW_TRACKING_URI"
        )
    return configure_tracking(tracking_uri=target)


def _client() -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=_STATE.uri)


def _is_not_found(exc: Exception) -> bool:
    code = getattr(exc, "error_code", "")
    return code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


# ------------------------------------------------------------------------- lineage


def _git(repo_root: Path, *args: str) -> str | None:
    try:
        proc = subprocess.run(
            ["git", "-C", str(repo_root), *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    return proc.stdout


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None


def _stage_tag_key(name: str) -> str:
    return "dvc_stage_" + re.sub(r"[^A-Za-z0-9_\-.]", "_", name)


def _data_dvc_md5(root: Path) -> str:
    """md5 of the first output recorded in ``<root>/data.dvc``, or ``unknown``."""
    data_dvc = _read_yaml(root / "data.dvc")
    if isinstance(data_dvc, dict):
        outs = data_dvc.get("outs")
        if isinstance(outs, list) and outs and isinstance(outs[0], dict):
            md5 = outs[0].get("md5") or outs[0].get("hash")
            if isinstance(md5, str) and md5:
                return md5
    return UNKNOWN


def lineage_tags(repo_root: Path) -> dict[str, str]:
    """Lineage of a run: code version, data version and DVC stage state.

    Args:
        repo_root: root of the git/DVC repository (holds ``data.dvc`` and ``dvc.lock``).

    Returns:
        ``git_commit`` (HEAD sha), ``git_dirty`` (``"true"``/``"false"``: uncommitted
        changes to tracked files or new unignored files), ``data_dvc_md5`` (md5 of the
        first output in ``data.dvc``), ``dvc_lock_md5`` (md5 of ``dvc.lock``) and one
        ``dvc_stage_<name>`` per stage in ``dvc.lock`` (md5 of the stage's locked command,
        dependency, parameter and output hashes). Anything that cannot be determined
        (no git, not a repository, file missing or malformed) has the value ``"unknown"``;
        this function never raises for a missing or broken repository.
    """
    root = Path(repo_root)
    tags: dict[str, str] = {}
    head = _git(root, "rev-parse", "HEAD")
    tags["git_commit"] = head.strip() if head and head.strip() else UNKNOWN
    status = _git(root, "status", "--porcelain") if head else None
    tags["git_dirty"] = UNKNOWN if status is None else ("true" if status.strip() else "false")

    tags["data_dvc_md5"] = _data_dvc_md5(root)

    lock_path = root / "dvc.lock"
    try:
        tags["dvc_lock_md5"] = hashlib.md5(lock_path.read_bytes()).hexdigest()
    except OSError:
        tags["dvc_lock_md5"] = UNKNOWN
    lock = _read_yaml(lock_path)
    stages = lock.get("stages") if isinstance(lock, dict) else None
    if isinstance(stages, dict):
        for name, entry in stages.items():
            blob = json.dumps(entry, sort_keys=True, default=str).encode()
            tags[_stage_tag_key(str(name))] = hashlib.md5(blob).hexdigest()
    return tags


# ---------------------------------------------------------------------------- runs


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
    params: Mapping[str, Any], tags: Mapping[str, Any], run_name: str | None = None
) -> Iterator[ActiveRun]:
    """Open an MLflow run in experiment ``mitoseg`` and log params and tags.

    Args:
        params: (nested) parameters; logged flattened with dotted keys (``model.depth``).
            Lists are logged as JSON, everything else with ``str``.
        tags: run tags, e.g. :func:`lineage_tags`; values are converted with ``str``.
        run_name: display name of the run; MLflow generates one when None.

    Yields:
        The active run (``run.info.run_id``). It ends when the block exits; an exception
        marks it FAILED and propagates.
    """
    import mlflow

    _ensure_configured()
    flat = {k: _param_value(v) for k, v in flatten_dict(params).items()}
    with mlflow.start_run(
        experiment_id=_STATE.experiment_id,
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


def _get_run(client: MlflowClient, run_id: str, uri: str | None = None) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        if _is_not_found(exc):
            where = f" ({uri})" if uri else ""
            raise ModelNotFoundError(
                f"run {run_id!r}{where} not found in tracking store {_STATE.uri}"
            ) from None
        raise


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
    _ensure_configured()
    client = _client()
    _get_run(client, run_id)
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


# ------------------------------------------------------------------------ registry


def _md5_files(paths: list[Path]) -> str:
    digest = hashlib.md5()
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def compute_test_data_id(
    raw_dir: Path | None, run_id: str | None = None, repo_root: Path | None = None
) -> str:
    """Identify the test data a metric was measured on, for :func:`register_model`.

    Tried in order:

    1. ``test:<md5>`` over ``<raw_dir>/test/images.tif`` and ``masks.tif`` (the masks
       only when present): changes exactly when the test split changes, so models
       trained on different training data remain comparable;
    2. ``data.dvc:<md5>`` from the ``data_dvc_md5`` tag of run ``run_id``;
    3. ``data.dvc:<md5>`` from ``<repo_root>/data.dvc``.

    Args:
        raw_dir: canonical raw data directory (``data/raw``), or None to skip step 1.
        run_id: training run whose lineage tags to use in step 2, or None.
        repo_root: repository with ``data.dvc`` for step 3, or None to skip it.

    Returns:
        The identifier string.

    Raises:
        ValueError: none of the sources is available.
    """
    if raw_dir is not None:
        images = Path(raw_dir) / "test" / "images.tif"
        masks = Path(raw_dir) / "test" / "masks.tif"
        if images.is_file():
            return "test:" + _md5_files([images, *([masks] if masks.is_file() else [])])
    if run_id is not None:
        _ensure_configured()
        tag = _get_run(_client(), run_id).data.tags.get("data_dvc_md5", UNKNOWN)
        if tag != UNKNOWN:
            return f"data.dvc:{tag}"
    if repo_root is not None:
        md5 = _data_dvc_md5(Path(repo_root))
        if md5 != UNKNOWN:
            return f"data.dvc:{md5}"
    raise ValueError(
        f"cannot identify the test data: no {raw_dir}/test/images.tif, no data_dvc_md5 tag "
        f"on run {run_id!r} and no data.dvc in {repo_root}"
    )


def _logged_model(client: MlflowClient, run: Any, artifact_path: str) -> Any | None:
    models = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}' AND name = '{artifact_path}'",
    )
    return models[0] if len(models) else None


def _version_by_alias(client: MlflowClient, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if _is_not_found(exc):
            return None
        raise


def _describe_version(mv: Any) -> dict[str, Any]:
    tags = dict(mv.tags or {})
    try:
        value: float | None = float(tags[_TAG_VALUE])
    except (KeyError, ValueError):
        value = None
    return {
        "version": int(mv.version),
        "run_id": mv.run_id,
        "metric": tags.get(_TAG_METRIC),
        "value": value,
        "test_data_id": tags.get(_TAG_TEST_DATA),
    }


def register_model(
    run_id: str, metric: str, value: float, cfg: RegisterConfig, test_data_id: str
) -> dict[str, Any]:
    """Register the run's model as a new version and apply the champion/challenger rule.

    See the module docstring for the rule. The version is tagged with ``eval_metric``,
    ``eval_value``, ``test_data_id``, ``registration_reason`` and the run's lineage tags.

    Args:
        run_id: training run holding the model logged as ``model``.
        metric: metric name, e.g. ``cfg.metric`` (``iou``); higher is better.
        value: the metric on the test data (finite).
        cfg: registry settings (model name and alias names).
        test_data_id: identifier of the test data the value was measured on.

    Returns:
        ``{"model_name", "version", "alias", "metric", "value", "previous_champion",
        "test_data_id", "run_id", "reason"}``; ``previous_champion`` is ``{"version",
        "run_id", "metric", "value", "test_data_id"}`` of the champion before this call,
        or None.

    Raises:
        ValueError: non-finite value, empty metric or test_data_id.
        ModelNotFoundError: the run does not exist or has no logged ``model``.
    """
    import mlflow

    if not metric:
        raise ValueError("register_model: metric name is empty")
    if not test_data_id:
        raise ValueError("register_model: test_data_id is empty")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"register_model: {metric} value must be finite, got {value}")
    _ensure_configured()
    client = _client()
    run = _get_run(client, run_id)
    logged = _logged_model(client, run, DEFAULT_ARTIFACT_PATH)
    if logged is None:
        raise ModelNotFoundError(
            f"run {run_id!r} has no logged model {DEFAULT_ARTIFACT_PATH!r} "
            f"(runs:/{run_id}/{DEFAULT_ARTIFACT_PATH}); log it with log_keras_model"
        )

    champion = _version_by_alias(client, cfg.model_name, cfg.champion_alias)
    previous = _describe_version(champion) if champion is not None else None
    if previous is None:
        alias, reason = cfg.champion_alias, "first"
    elif (
        previous["metric"] != metric
        or previous["test_data_id"] != test_data_id
        or previous["value"] is None
    ):
        alias, reason = cfg.champion_alias, "incomparable"
    elif value > previous["value"]:
        alias, reason = cfg.champion_alias, "better"
    else:
        alias, reason = cfg.challenger_alias, "not_better"

    run_tags = run.data.tags
    tags = {k: run_tags[k] for k in _LINEAGE_KEYS if k in run_tags}
    tags.update(
        {
            _TAG_METRIC: metric,
            _TAG_VALUE: repr(value),
            _TAG_TEST_DATA: test_data_id,
            "registration_reason": reason,
        }
    )
    # MLflow 3 stores the model as a LoggedModel: register its models:/m-... URI directly
    # (registering runs:/<id>/model works too, but only through a warning fallback).
    mv = mlflow.register_model(f"models:/{logged.model_id}", cfg.model_name, tags=tags)
    client.set_registered_model_alias(cfg.model_name, alias, mv.version)
    client.update_model_version(
        cfg.model_name,
        mv.version,
        description=f"{metric}={value:.4f} on test data {test_data_id} ({reason})",
    )
    return {
        "model_name": cfg.model_name,
        "version": int(mv.version),
        "alias": alias,
        "metric": metric,
        "value": value,
        "previous_champion": previous,
        "test_data_id": test_data_id,
        "run_id": run_id,
        "reason": reason,
    }


# ------------------------------------------------------------------------- loading


@dataclass
class _Resolved:
    """A model URI checked against the store."""

    uri: str
    kind: str  # "path" | "registry" | "run"
    path: Path | None = None
    name: str | None = None
    alias: str | None = None
    version: Any = None  # mlflow ModelVersion
    run: Any = None  # mlflow Run


def _resolve(uri: str) -> _Resolved:
    """Classify and validate a model URI; raise a clear error naming it when it is unknown."""
    from mlflow.exceptions import MlflowException

    text = str(uri).strip()
    if not text:
        raise ValueError("model URI is empty")
    if not _SCHEME_RE.match(text) or text.startswith("file:/"):
        path = Path(text[len("file://") :] if text.startswith("file://") else text)
        if not path.exists():
            raise ModelNotFoundError(f"model file not found: {uri}")
        if path.is_file() and path.suffix in (".keras", ".h5"):
            return _Resolved(uri=text, kind="path", path=path)
        if path.is_dir() and (path / "MLmodel").is_file():
            return _Resolved(uri=text, kind="path", path=path)
        raise ValueError(f"{uri}: not a .keras file or an MLflow model directory")

    alias_m = _MODELS_ALIAS_RE.match(text)
    version_m = _MODELS_VERSION_RE.match(text)
    runs_m = _RUNS_RE.match(text)
    if not (alias_m or version_m or runs_m):
        raise ValueError(
            f"unsupported model URI {uri!r}; use a .keras path, models:/<name>@<alias>, "
            "models:/<name>/<version> or runs:/<run_id>/<path>"
        )
    _ensure_configured(read_only=True)
    client = _client()
    if runs_m:
        run = _get_run(client, runs_m["run_id"], text)
        if _logged_model(client, run, runs_m["path"]) is None:
            raise ModelNotFoundError(
                f"run {runs_m['run_id']!r} has no logged model {runs_m['path']!r} ({uri})"
            )
        return _Resolved(uri=text, kind="run", run=run)

    match = alias_m or version_m
    assert match is not None
    name = match["name"]
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if _is_not_found(exc):
            raise ModelNotFoundError(
                f"unknown registered model {name!r} ({uri}) in tracking store {_STATE.uri}"
            ) from None
        raise
    if alias_m:
        mv = _version_by_alias(client, name, alias_m["alias"])
        if mv is None:
            raise ModelNotFoundError(
                f"registered model {name!r} has no alias {alias_m['alias']!r} ({uri})"
            )
    else:
        try:
            mv = client.get_model_version(name, match["version"])
        except MlflowException as exc:
            if _is_not_found(exc):
                raise ModelNotFoundError(
                    f"registered model {name!r} has no version {match['version']} ({uri})"
                ) from None
            raise
    run = _get_run(client, mv.run_id, text) if mv.run_id else None
    return _Resolved(
        uri=text,
        kind="registry",
        name=name,
        alias=alias_m["alias"] if alias_m else None,
        version=mv,
        run=run,
    )


def _register_custom_objects() -> None:
    """Import mitoseg's Keras modules so their serializable losses/layers are registered."""
    import importlib

    for name in ("mitoseg.model.losses", "mitoseg.model.unet"):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def load_model(uri: str, compile: bool = False) -> keras.Model:
    """Load a segmentation model from a file, the registry or a run.

    Args:
        uri: a ``.keras`` file (or an MLflow model directory), ``models:/<name>@<alias>``,
            ``models:/<name>/<version>`` or ``runs:/<run_id>/<path>``. Registry and run
            URIs resolve against :func:`configure_tracking`'s store (the embedded
            ``./mlflow.db`` unless configured otherwise or ``$MLFLOW_TRACKING_URI``).
        compile: compile the model (needs the training losses); inference does not.

    Returns:
        The Keras model: input ``(N, H, W, 1) float32`` in [0, 1], output ``(N, H, W, C)``.

    Raises:
        ModelNotFoundError: unknown file, run, registered model, version or alias (the
            message names the URI), or no tracking store at the embedded default.
        ValueError: unsupported URI form, or a path that is not a model.
    """
    resolved = _resolve(uri)
    _register_custom_objects()
    if resolved.kind == "path" and resolved.path is not None and resolved.path.is_file():
        import keras

        return keras.saving.load_model(resolved.path, compile=compile)
    import mlflow.keras

    source = str(resolved.path) if resolved.path is not None else resolved.uri
    return mlflow.keras.load_model(source, load_model_kwargs={"compile": compile})


def model_info(uri: str) -> dict[str, Any]:
    """Describe a model: registry entry, source run, lineage and test metrics.

    Args:
        uri: any URI accepted by :func:`load_model`.

    Returns:
        ``{"uri", "name", "version", "alias", "aliases", "run_id", "git_commit",
        "git_dirty", "data_dvc_md5", "test_data_id", "n_classes", "class_names", "tags",
        "metrics", "threshold"}``. ``tags`` merges the run's tags (``mlflow.*`` omitted)
        with the version's tags; ``metrics`` are the run's latest metric values;
        ``threshold`` is the logged ``test_threshold`` (or ``threshold``) metric or None.
        For a plain file, everything but ``uri`` is None or empty.

    Raises:
        ModelNotFoundError, ValueError: as :func:`load_model`.
    """
    resolved = _resolve(uri)
    tags: dict[str, str] = {}
    metrics: dict[str, float] = {}
    run_id: str | None = None
    if resolved.run is not None:
        run_id = resolved.run.info.run_id
        tags.update(
            {k: v for k, v in resolved.run.data.tags.items() if not k.startswith("mlflow.")}
        )
        metrics = dict(resolved.run.data.metrics)
    version: int | None = None
    aliases: list[str] = []
    if resolved.version is not None:
        tags.update(resolved.version.tags or {})
        version = int(resolved.version.version)
        aliases = list(resolved.version.aliases or [])
    alias = resolved.alias or (aliases[0] if aliases else None)
    class_names: list[str] | None = None
    if "class_names" in tags:
        with contextlib.suppress(ValueError):
            class_names = list(json.loads(tags["class_names"]))
    n_classes = int(tags["n_classes"]) if tags.get("n_classes", "").isdigit() else None
    return {
        "uri": resolved.uri,
        "name": resolved.name,
        "version": version,
        "alias": alias,
        "aliases": aliases,
        "run_id": run_id,
        "git_commit": tags.get("git_commit"),
        "git_dirty": tags.get("git_dirty"),
        "data_dvc_md5": tags.get("data_dvc_md5"),
        "test_data_id": tags.get(_TAG_TEST_DATA),
        "n_classes": n_classes,
        "class_names": class_names,
        "tags": tags,
        "metrics": metrics,
    }


# ---------------------------------------------------------------- inference plan


def _logged_model_of(client: MlflowClient, resolved: _Resolved) -> Any | None:
    """The MLflow logged model behind a run or registry URI (None if it has none)."""
    if resolved.kind == "registry" and getattr(resolved.version, "model_id", None):
        return client.get_logged_model(resolved.version.model_id)
    if resolved.run is None:
        return None
    path = DEFAULT_ARTIFACT_PATH
    m = _RUNS_RE.match(resolved.uri)
    if m:
        path = m["path"]
    return _logged_model(client, resolved.run, path)


def log_inference_plan(run_id: str, plan_path: Path) -> None:
    """Attach an inference plan to a training run and to the model logged in it.

    The file goes into the run's artifacts (``inference_plan.json``, seen in the MLflow
    UI) and into the logged model's own artifacts, so every registry version of that
    model (``models:/mitoseg-unet@champion``) carries it.

    Args:
        run_id: the training run (its model is logged as ``model``).
        plan_path: the plan file written by the evaluate stage.

    Raises:
        FileNotFoundError: ``plan_path`` does not exist.
        ModelNotFoundError: unknown run, or the run has no logged model.
    """
    from mitoseg.plan import PLAN_FILE, InferencePlan

    plan_path = Path(plan_path)
    if not plan_path.is_file():
        raise FileNotFoundError(f"log_inference_plan: {plan_path} not found")
    plan = InferencePlan.read(plan_path)  # validates, and loads its calibration file
    _ensure_configured()
    client = _client()
    run = _get_run(client, run_id)
    model = _logged_model(client, run, DEFAULT_ARTIFACT_PATH)
    if model is None:
        raise ModelNotFoundError(f"run {run_id!r} has no logged model {DEFAULT_ARTIFACT_PATH!r}")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        plan.write(Path(tmp) / PLAN_FILE)  # canonical names, calibration file beside it
        for staged in sorted(Path(tmp).iterdir()):
            client.log_artifact(run_id, str(staged))
            client.log_model_artifact(model.model_id, str(staged))


def load_inference_plan(uri: str) -> InferencePlan | None:
    """The inference plan stored with a model, or None when it has none.

    Args:
        uri: a ``.keras`` file (plan beside it, see :func:`mitoseg.plan.plan_path_for`),
            an MLflow model directory (``inference_plan.json`` inside), or a
            ``models:/`` / ``runs:/`` URI (the logged model's ``inference_plan.json``).

    Raises:
        ModelNotFoundError, ValueError: as :func:`load_model`.
        mitoseg.io.DataError: a plan that exists but is invalid (named).
    """
    import tempfile

    from mitoseg.plan import CALIBRATION_FILE, PLAN_FILE, InferencePlan, plan_path_for

    resolved = _resolve(uri)
    if resolved.kind == "path" and resolved.path is not None:
        path = resolved.path
        found = path / PLAN_FILE if path.is_dir() else plan_path_for(path)
        return InferencePlan.read(found) if found is not None and found.is_file() else None
    client = _client()
    model = _logged_model_of(client, resolved)
    if model is None:
        return None
    names = {Path(f.path).name for f in client.list_logged_model_artifacts(model.model_id)}
    if PLAN_FILE not in names:
        return None
    import mlflow.artifacts

    base = model.artifact_location.rstrip("/")
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{base}/{PLAN_FILE}", dst_path=tmp
        )
        if CALIBRATION_FILE in names:
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"{base}/{CALIBRATION_FILE}", dst_path=tmp
            )
        return InferencePlan.read(local)


def load_model_and_plan(uri: str) -> tuple[keras.Model, InferencePlan]:
    """Load a model and the plan to run it with.

    A model without a stored plan gets :func:`mitoseg.model.analysis.default_plan`
    (``plan.source == "default"``: derived from the network, threshold 0.5).

    Returns:
        ``(keras model, plan)``.

    Raises:
        ModelNotFoundError, ValueError, mitoseg.io.DataError: as :func:`load_model` and
            :func:`load_inference_plan`; a plan that does not match the network's output.
    """
    from mitoseg.model.analysis import check_plan_matches, default_plan

    model = load_model(uri)
    plan = load_inference_plan(uri)
    if plan is None:
        return model, default_plan(model)
    check_plan_matches(model, plan, str(uri))
    return model, plan
