"""Model registry: test-data identity, the champion/challenger rule and registration.

Registry rule (:func:`decide_alias`, applied by :func:`register_model`): **a new version
becomes champion only when it beats the champion on the same test data**, so a worse
round of training never replaces a better model. Every registered version carries the
tags ``eval_metric``, ``eval_value`` (``repr`` of the float, so it round-trips exactly)
and ``test_data_id`` (a fingerprint of the test images and labels,
:func:`compute_test_data_id`). A new version becomes ``champion`` when

* there is no champion yet (``reason="first"``), or
* it is strictly better than the champion's score on the same metric and the same
  ``test_data_id`` (``reason="better"``): the champion's tagged score, or, when the
  champion was scored on other test data (or another metric, or has no score tags), its
  score **re-evaluated on this test data** (``rescore``; the record's
  ``champion_rescored``). Numbers measured on different test sets are never compared.

Otherwise it gets the ``challenger`` alias: ``reason="not_better"`` (worse, or a tie:
ties keep the existing champion), or ``reason="incomparable"`` when the champion was
scored on other test data and could not be re-evaluated on this one (no ``rescore``, or
it failed: the record's ``message`` says why). A champion that is replaced keeps its
version and tags but loses the alias (aliases are unique per registered model).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mitoseg.tracking.lineage import data_dvc_md5
from mitoseg.tracking.store import (
    DEFAULT_ARTIFACT_PATH,
    UNKNOWN,
    ModelNotFoundError,
    TrackingStore,
    open_store,
)

if TYPE_CHECKING:
    from mitoseg.config import RegisterConfig

__all__ = [
    "Reason",
    "comparable",
    "compute_test_data_id",
    "decide_alias",
    "register_model",
]

#: Why a version got its alias.
Reason = Literal["first", "better", "incomparable", "not_better"]

#: Version tags written by :func:`register_model`.
TAG_METRIC = "eval_metric"
TAG_VALUE = "eval_value"
TAG_TEST_DATA = "test_data_id"
#: Run tags copied onto a registered version (lineage and class table).
_LINEAGE_KEYS = (
    "git_commit",
    "git_dirty",
    "data_dvc_md5",
    "dvc_lock_md5",
    "n_classes",
    "class_names",
)


def comparable(previous: Mapping[str, Any], metric: str, test_data_id: str) -> bool:
    """Whether the champion's tagged score was measured on ``metric`` and this test data."""
    return (
        previous.get("metric") == metric
        and previous.get("test_data_id") == test_data_id
        and previous.get("value") is not None
    )


def decide_alias(
    previous: Mapping[str, Any] | None,
    metric: str,
    value: float,
    test_data_id: str,
    rescored: float | None = None,
) -> tuple[bool, Reason]:
    """The registry rule (module docstring), without MLflow.

    Args:
        previous: the current champion's ``{"metric", "value", "test_data_id"}``
            (``value`` None when it has no score tag), or None when there is none.
        metric: the new version's metric name.
        value: its value on the test data (higher is better).
        test_data_id: the test data it was measured on.
        rescored: the champion's ``metric`` re-evaluated on ``test_data_id``, or None;
            used only when its tagged score is not :func:`comparable`.

    Returns:
        ``(becomes_champion, reason)``: ``(True, "first")``, ``(True, "better")``,
        ``(False, "not_better")`` (ties included) or ``(False, "incomparable")`` (the
        champion has no score on this test data).
    """
    if previous is None:
        return True, "first"
    reference = previous["value"] if comparable(previous, metric, test_data_id) else rescored
    if reference is None:
        return False, "incomparable"
    if value > reference:
        return True, "better"
    return False, "not_better"


def _md5_files(paths: list[Path]) -> str:
    digest = hashlib.md5()
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def compute_test_data_id(
    raw_dir: Path | None,
    run_id: str | None = None,
    repo_root: Path | None = None,
    *,
    store: TrackingStore | None = None,
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
        store: where run ``run_id`` lives; :func:`open_store` when None.

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
        store = store or open_store()
        tag = store.get_run(run_id).data.tags.get("data_dvc_md5", UNKNOWN)
        if tag != UNKNOWN:
            return f"data.dvc:{tag}"
    if repo_root is not None:
        md5 = data_dvc_md5(Path(repo_root))
        if md5 != UNKNOWN:
            return f"data.dvc:{md5}"
    raise ValueError(
        f"cannot identify the test data: no {raw_dir}/test/images.tif, no data_dvc_md5 tag "
        f"on run {run_id!r} and no data.dvc in {repo_root}"
    )


def _describe_version(mv: Any) -> dict[str, Any]:
    tags = dict(mv.tags or {})
    try:
        value: float | None = float(tags[TAG_VALUE])
    except (KeyError, ValueError):
        value = None
    return {
        "version": int(mv.version),
        "run_id": mv.run_id,
        "metric": tags.get(TAG_METRIC),
        "value": value,
        "test_data_id": tags.get(TAG_TEST_DATA),
    }


def _rescore_champion(
    previous: dict[str, Any],
    uri: str,
    metric: str,
    test_data_id: str,
    rescore: Callable[[str], float] | None,
) -> tuple[dict[str, Any] | None, str]:
    """Re-evaluate a champion whose score is not on this test data.

    Returns:
        ``(champion_rescored, note)``: ``{"uri", "metric", "value", "test_data_id",
        "error"}`` (``value`` None and ``error`` the reason when it failed) or None
        without ``rescore``, and the text explaining why the tagged score was not used.
    """
    was = (
        "has no score tags"
        if previous.get("value") is None
        else f"was scored {previous.get('metric')}={previous['value']:.4f} on test data "
        f"{previous.get('test_data_id')}"
    )
    note = f"the champion v{previous['version']} {was}; this model {metric} on {test_data_id}"
    if rescore is None:
        return None, note
    try:
        value: float | None = float(rescore(uri))
        error = None
        if not math.isfinite(value):
            value, error = None, f"its {metric} is not finite"
    except Exception as exc:  # any failure means: no number on this test data
        value, error = None, f"{type(exc).__name__}: {exc}"
    record = {
        "uri": uri,
        "metric": metric,
        "value": value,
        "test_data_id": test_data_id,
        "error": error,
    }
    return record, note


def _message(
    reason: Reason,
    metric: str,
    value: float,
    previous: dict[str, Any] | None,
    rescored: dict[str, Any] | None,
    note: str,
    cfg: RegisterConfig,
) -> str:
    """One sentence saying why the new version got its alias."""
    if previous is None:
        return "no champion yet: this version is the first"
    if rescored is None and reason != "incomparable":
        ref = f"the champion v{previous['version']}'s {metric}={previous['value']:.4f}"
        verb = "beats" if reason == "better" else "does not beat"
        return f"{metric}={value:.4f} {verb} {ref} on the same test data"
    if reason == "incomparable":
        why = (
            "it was not re-evaluated on this test data"
            if rescored is None
            else f"re-evaluating it on this test data failed ({rescored['error']})"
        )
        return (
            f"not promoted: {note}; numbers from different test sets are not compared, and "
            f"{why}. Move the alias by hand if this model is to be the champion "
            f"(MlflowClient().set_registered_model_alias({cfg.model_name!r}, "
            f"{cfg.champion_alias!r}, VERSION))"
        )
    assert rescored is not None
    verb = "beats" if reason == "better" else "does not beat"
    return (
        f"{metric}={value:.4f} {verb} the champion v{previous['version']} re-evaluated on "
        f"this test data ({metric}={rescored['value']:.4f}; {note})"
    )


def logged_run_model(store: TrackingStore, run_id: str) -> tuple[Any, Any]:
    """``(run, logged model)`` of a training run whose model is logged as ``model``.

    Raises:
        ModelNotFoundError: unknown run, or the run has no logged ``model`` (names the run).
    """
    run = store.get_run(run_id)
    logged = store.logged_model(run, DEFAULT_ARTIFACT_PATH)
    if logged is None:
        raise ModelNotFoundError(
            f"run {run_id!r} has no logged model {DEFAULT_ARTIFACT_PATH!r} "
            f"(runs:/{run_id}/{DEFAULT_ARTIFACT_PATH}); log it with log_keras_model"
        )
    return run, logged


def _version_tags(
    run_tags: dict[str, str],
    metric: str,
    value: float,
    test_data_id: str,
    reason: str,
    message: str,
) -> dict[str, str]:
    """The new version's tags: the run's lineage tags plus the score and the decision."""
    tags = {k: run_tags[k] for k in _LINEAGE_KEYS if k in run_tags}
    tags.update(
        {
            TAG_METRIC: metric,
            TAG_VALUE: repr(value),
            TAG_TEST_DATA: test_data_id,
            "registration_reason": reason,
            "registration_message": message[:5000],
        }
    )
    return tags


def register_model(
    run_id: str,
    metric: str,
    value: float,
    cfg: RegisterConfig,
    test_data_id: str,
    *,
    rescore: Callable[[str], float] | None = None,
    store: TrackingStore | None = None,
) -> dict[str, Any]:
    """Register the run's model as a new version and apply the champion/challenger rule.

    See the module docstring and :func:`decide_alias` for the rule. The version is tagged
    with ``eval_metric``, ``eval_value``, ``test_data_id``, ``registration_reason`` and the
    run's lineage tags.

    Args:
        run_id: training run holding the model logged as ``model``.
        metric: metric name, e.g. ``cfg.metric`` (``iou``); higher is better.
        value: the metric on the test data (finite).
        cfg: registry settings (model name and alias names).
        test_data_id: identifier of the test data the value was measured on.
        rescore: ``rescore(model_uri) -> metric`` of a registered model on *this* test
            data (e.g. :func:`mitoseg.gate.score_on_test`), called only when the
            champion's tagged score is on other test data; None: such a champion is not
            re-evaluated and the new version is not promoted (``incomparable``). Any
            exception it raises is recorded, and the new version is not promoted.
        store: the run's store (and registry); :func:`open_store` when None.

    Returns:
        ``{"model_name", "version", "alias", "metric", "value", "previous_champion",
        "champion_rescored", "test_data_id", "run_id", "reason", "message"}``;
        ``previous_champion`` is ``{"version", "run_id", "metric", "value",
        "test_data_id"}`` of the champion before this call, or None;
        ``champion_rescored`` is ``{"uri", "metric", "value", "test_data_id", "error"}``
        when the champion was re-evaluated on this test data, else None; ``message``
        says why the version got its alias.

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
    store = store or open_store()
    client = store.client()
    run, logged = logged_run_model(store, run_id)

    champion = store.version_by_alias(cfg.model_name, cfg.champion_alias)
    previous = _describe_version(champion) if champion is not None else None
    rescored, note = None, ""
    if previous is not None and not comparable(previous, metric, test_data_id):
        uri = f"models:/{cfg.model_name}/{previous['version']}"
        rescored, note = _rescore_champion(previous, uri, metric, test_data_id, rescore)
    promote, reason = decide_alias(
        previous, metric, value, test_data_id, None if rescored is None else rescored["value"]
    )
    alias = cfg.champion_alias if promote else cfg.challenger_alias
    message = _message(reason, metric, value, previous, rescored, note, cfg)

    tags = _version_tags(run.data.tags, metric, value, test_data_id, reason, message)
    # MLflow 3 stores the model as a LoggedModel: register its models:/m-... URI directly
    # (registering runs:/<id>/model works too, but only through a warning fallback).
    mlflow.set_tracking_uri(store.uri)  # mlflow.register_model uses the fluent registry
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
        "champion_rescored": rescored,
        "test_data_id": test_data_id,
        "run_id": run_id,
        "reason": reason,
        "message": message,
    }
