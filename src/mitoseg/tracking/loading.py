"""Model resolution and loading: ``.keras`` files, ``models:/`` and ``runs:/`` URIs, and the
inference plan stored with a model.

Registry and run URIs resolve against a store handed in or opened per call read-only
(:func:`mitoseg.tracking.store.open_store`), so a lookup in the wrong directory raises
:class:`ModelNotFoundError` instead of creating an empty ``mlflow.db``.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mitoseg.tracking.registry import TAG_TEST_DATA, logged_run_model
from mitoseg.tracking.store import (
    DEFAULT_ARTIFACT_PATH,
    ModelNotFoundError,
    TrackingStore,
    is_not_found,
    open_store,
)

if TYPE_CHECKING:
    import keras

    from mitoseg.inference.plan import InferencePlan

__all__ = [
    "load_inference_plan",
    "load_model",
    "load_model_and_plan",
    "log_inference_plan",
    "log_model_file",
    "model_file",
    "model_info",
]

_MODELS_ALIAS_RE = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)$")
_MODELS_VERSION_RE = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$")
_RUNS_RE = re.compile(r"^runs:/(?P<run_id>[^/]+)/(?P<path>.+)$")
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")


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
    store: TrackingStore | None = None  # None for files


def _resolve(uri: str, store: TrackingStore | None = None) -> _Resolved:
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
    store = store or open_store(read_only=True)
    client = store.client()
    if runs_m:
        run = store.get_run(runs_m["run_id"], text)
        if store.logged_model(run, runs_m["path"]) is None:
            raise ModelNotFoundError(
                f"run {runs_m['run_id']!r} has no logged model {runs_m['path']!r} ({uri})"
            )
        return _Resolved(uri=text, kind="run", run=run, store=store)

    match = alias_m or version_m
    assert match is not None
    name = match["name"]
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if is_not_found(exc):
            raise ModelNotFoundError(
                f"unknown registered model {name!r} ({uri}) in tracking store {store.uri}"
            ) from None
        raise
    if alias_m:
        mv = store.version_by_alias(name, alias_m["alias"])
        if mv is None:
            raise ModelNotFoundError(
                f"registered model {name!r} has no alias {alias_m['alias']!r} ({uri})"
            )
    else:
        try:
            mv = client.get_model_version(name, match["version"])
        except MlflowException as exc:
            if is_not_found(exc):
                raise ModelNotFoundError(
                    f"registered model {name!r} has no version {match['version']} ({uri})"
                ) from None
            raise
    run = store.get_run(mv.run_id, text) if mv.run_id else None
    return _Resolved(
        uri=text,
        kind="registry",
        name=name,
        alias=alias_m["alias"] if alias_m else None,
        version=mv,
        run=run,
        store=store,
    )


def _register_custom_objects() -> None:
    """Import mitoseg's Keras modules so their serializable losses/layers are registered."""
    import importlib

    for name in ("mitoseg.model.losses", "mitoseg.model.unet"):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def load_model(
    uri: str, compile: bool = False, *, store: TrackingStore | None = None
) -> keras.Model:
    """Load a segmentation model from a file, the registry or a run.

    Args:
        uri: a ``.keras`` file (or an MLflow model directory), ``models:/<name>@<alias>``,
            ``models:/<name>/<version>`` or ``runs:/<run_id>/<path>``. Registry and run
            URIs resolve against ``store``.
        compile: compile the model (needs the training losses); inference does not.
        store: where registry and run URIs live; when None, :func:`open_store` read-only
            (``$MLFLOW_TRACKING_URI`` or the embedded ``./mlflow.db``).

    Returns:
        The Keras model: input ``(N, H, W, 1) float32`` in [0, 1], output ``(N, H, W, C)``.

    Raises:
        ModelNotFoundError: unknown file, run, registered model, version or alias (the
            message names the URI), or no tracking store at the embedded default.
        ValueError: unsupported URI form, or a path that is not a model.
    """
    resolved = _resolve(uri, store)
    _register_custom_objects()
    if resolved.kind == "path" and resolved.path is not None and resolved.path.is_file():
        import keras

        return keras.saving.load_model(resolved.path, compile=compile)
    import mlflow
    import mlflow.keras

    if resolved.store is not None:
        mlflow.set_tracking_uri(resolved.store.uri)  # models:/ and runs:/ downloads
    source = str(resolved.path) if resolved.path is not None else resolved.uri
    return mlflow.keras.load_model(source, load_model_kwargs={"compile": compile})


def model_info(uri: str, *, store: TrackingStore | None = None) -> dict[str, Any]:
    """Describe a model: registry entry, source run, lineage and test metrics.

    Args:
        uri: any URI accepted by :func:`load_model`.
        store: as :func:`load_model`.

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
    resolved = _resolve(uri, store)
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
        "test_data_id": tags.get(TAG_TEST_DATA),
        "n_classes": n_classes,
        "class_names": class_names,
        "tags": tags,
        "metrics": metrics,
    }


# ---------------------------------------------------------------- inference plan


def _logged_model_of(store: TrackingStore, resolved: _Resolved) -> Any | None:
    """The MLflow logged model behind a run or registry URI (None if it has none)."""
    if resolved.kind == "registry" and getattr(resolved.version, "model_id", None):
        return store.client().get_logged_model(resolved.version.model_id)
    if resolved.run is None:
        return None
    path = DEFAULT_ARTIFACT_PATH
    m = _RUNS_RE.match(resolved.uri)
    if m:
        path = m["path"]
    return store.logged_model(resolved.run, path)


def log_inference_plan(run_id: str, plan_path: Path, *, store: TrackingStore | None = None) -> None:
    """Attach an inference plan to a training run and to the model logged in it.

    The file goes into the run's artifacts (``inference_plan.json``, seen in the MLflow
    UI) and into the logged model's own artifacts, so every registry version of that
    model (``models:/mitoseg-unet@champion``) carries it.

    Args:
        run_id: the training run (its model is logged as ``model``).
        plan_path: the plan file written by the evaluate stage.
        store: the run's store; :func:`open_store` when None.

    Raises:
        FileNotFoundError: ``plan_path`` does not exist.
        ModelNotFoundError: unknown run, or the run has no logged model.
    """
    from mitoseg.inference.plan import PLAN_FILE, InferencePlan

    plan_path = Path(plan_path)
    if not plan_path.is_file():
        raise FileNotFoundError(f"log_inference_plan: {plan_path} not found")
    plan = InferencePlan.read(plan_path)  # validates, and loads its calibration file
    store = store or open_store()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        plan.write(Path(tmp) / PLAN_FILE)  # canonical names, calibration file beside it
        for staged in sorted(Path(tmp).iterdir()):
            log_model_file(run_id, staged, store=store)


def log_model_file(run_id: str, path: Path, *, store: TrackingStore | None = None) -> None:
    """Attach a file to a training run and to the model logged in it (as
    :func:`log_inference_plan` does for the plan), e.g. the reference profile
    (:data:`mitoseg.data.profile.PROFILE_FILE`).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ModelNotFoundError: unknown run, or the run has no logged model.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"log_model_file: {path} not found")
    store = store or open_store()
    _, model = logged_run_model(store, run_id)
    client = store.client()
    client.log_artifact(run_id, str(path))
    client.log_model_artifact(model.model_id, str(path))


def model_file(
    uri: str, name: str, dst: Path, *, store: TrackingStore | None = None
) -> Path | None:
    """Copy the file ``name`` stored with a model into the folder ``dst``.

    Args:
        uri: a ``.keras`` file (the file beside it), an MLflow model directory (inside
            it) or a ``models:/`` / ``runs:/`` URI (the logged model's artifacts).
        name: the file name, e.g. ``reference_profile.json``.
        dst: an existing folder.
        store: as :func:`load_model`.

    Returns:
        The copy's path, or None when the model has no such file.

    Raises:
        ModelNotFoundError, ValueError: as :func:`load_model`.
    """
    import shutil

    resolved = _resolve(uri, store)
    if resolved.kind == "path" and resolved.path is not None:
        path = resolved.path
        found = path / name if path.is_dir() else path.with_name(name)
        return Path(shutil.copy(found, Path(dst) / name)) if found.is_file() else None
    assert resolved.store is not None
    model = _logged_model_of(resolved.store, resolved)
    if model is None:
        return None
    client = resolved.store.client()
    if name not in {Path(f.path).name for f in client.list_logged_model_artifacts(model.model_id)}:
        return None
    import mlflow.artifacts

    base = model.artifact_location.rstrip("/")
    local = mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/{name}", dst_path=str(dst))
    return Path(local)


def load_inference_plan(uri: str, *, store: TrackingStore | None = None) -> InferencePlan | None:
    """The inference plan stored with a model, or None when it has none.

    Args:
        uri: a ``.keras`` file (plan beside it, see :func:`mitoseg.inference.plan.plan_path_for`),
            an MLflow model directory (``inference_plan.json`` inside), or a
            ``models:/`` / ``runs:/`` URI (the logged model's ``inference_plan.json``).
        store: as :func:`load_model`.

    Raises:
        ModelNotFoundError, ValueError: as :func:`load_model`.
        mitoseg.io.DataError: a plan that exists but is invalid (named).
    """
    import tempfile

    from mitoseg.inference.plan import CALIBRATION_FILE, PLAN_FILE, InferencePlan, plan_path_for

    resolved = _resolve(uri, store)
    if resolved.kind == "path" and resolved.path is not None:
        path = resolved.path
        found = path / PLAN_FILE if path.is_dir() else plan_path_for(path)
        return InferencePlan.read(found) if found is not None and found.is_file() else None
    assert resolved.store is not None
    client = resolved.store.client()
    model = _logged_model_of(resolved.store, resolved)
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


def load_model_and_plan(
    uri: str, *, store: TrackingStore | None = None
) -> tuple[keras.Model, InferencePlan]:
    """Load a model and the plan to run it with.

    A model without a stored plan gets :func:`mitoseg.model.analysis.default_plan`
    (``plan.source == "default"``: derived from the network, threshold 0.5).

    Args:
        uri: as :func:`load_model`.
        store: as :func:`load_model`.

    Returns:
        ``(keras model, plan)``.

    Raises:
        ModelNotFoundError, ValueError, mitoseg.io.DataError: as :func:`load_model` and
            :func:`load_inference_plan`; a plan that does not match the network's output.
    """
    from mitoseg.model.analysis import check_plan_matches, default_plan

    model = load_model(uri, store=store)
    plan = load_inference_plan(uri, store=store)
    if plan is None:
        return model, default_plan(model)
    check_plan_matches(model, plan, str(uri))
    return model, plan
