"""The MLflow store mitoseg tracks into, as an explicit value.

:func:`open_store` picks, in order, an explicit ``tracking_uri``, ``$MLFLOW_TRACKING_URI``,
or the embedded default ``sqlite:///<root or cwd>/mlflow.db`` with run and model artifacts
under ``<root or cwd>/mlartifacts`` (no server needed; ``mlflow ui --backend-store-uri
sqlite:///mlflow.db`` shows it), makes sure experiment ``mitoseg`` exists and returns a
:class:`TrackingStore`. Nothing is remembered in this package: every function that is not
handed a store opens one per call from the environment. ``mlflow.set_tracking_uri`` (which
MLflow mirrors into ``$MLFLOW_TRACKING_URI``) is how the choice reaches MLflow's own fluent
API and later calls in the same process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow import MlflowClient

#: MLflow experiment that holds every mitoseg run.
EXPERIMENT_NAME = "mitoseg"
#: Name (artifact path) of the model logged in each training run.
DEFAULT_ARTIFACT_PATH = "model"
#: Value of a lineage tag that could not be determined.
UNKNOWN = "unknown"


class ModelNotFoundError(LookupError):
    """A model URI names a file, run, registered model, version or alias that does not exist.

    The message always contains the URI.
    """


def is_not_found(exc: Exception) -> bool:
    """Whether an ``MlflowException`` means "no such run / model / version / alias"."""
    code = getattr(exc, "error_code", "")
    return code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


def sqlite_path(uri: str) -> Path | None:
    """Database file of a ``sqlite:///`` URI, or None for other schemes."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :])


@dataclass(frozen=True)
class TrackingStore:
    """An MLflow tracking store with experiment ``mitoseg`` in it.

    Attributes:
        uri: tracking URI (``sqlite:///...`` or ``http://...``).
        experiment_id: id of experiment ``mitoseg`` in that store.
    """

    uri: str
    experiment_id: str

    def client(self) -> MlflowClient:
        """An ``MlflowClient`` bound to this store (tracking and registry)."""
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def get_run(self, run_id: str, uri: str | None = None) -> Any:
        """The run ``run_id``.

        Raises:
            ModelNotFoundError: no such run (names ``uri`` when given, and the store).
        """
        from mlflow.exceptions import MlflowException

        try:
            return self.client().get_run(run_id)
        except MlflowException as exc:
            if is_not_found(exc):
                where = f" ({uri})" if uri else ""
                raise ModelNotFoundError(
                    f"run {run_id!r}{where} not found in tracking store {self.uri}"
                ) from None
            raise

    def logged_model(self, run: Any, artifact_path: str = DEFAULT_ARTIFACT_PATH) -> Any | None:
        """The MLflow ``LoggedModel`` named ``artifact_path`` of ``run``, or None."""
        models = self.client().search_logged_models(
            experiment_ids=[run.info.experiment_id],
            filter_string=f"source_run_id = '{run.info.run_id}' AND name = '{artifact_path}'",
        )
        return models[0] if len(models) else None

    def version_by_alias(self, name: str, alias: str) -> Any | None:
        """The ``ModelVersion`` of registered model ``name`` holding ``alias``, or None."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client().get_model_version_by_alias(name, alias)
        except MlflowException as exc:
            if is_not_found(exc):
                return None
            raise


def open_store(
    tracking_uri: str | None = None,
    root: Path | None = None,
    *,
    read_only: bool = False,
) -> TrackingStore:
    """Open the mitoseg store and point MLflow's fluent API at it.

    Args:
        tracking_uri: explicit tracking URI. When None, ``$MLFLOW_TRACKING_URI`` is used,
            else the URI ``mlflow.set_tracking_uri`` set in this process, else the
            embedded default ``sqlite:///<root>/mlflow.db``.
        root: directory of the embedded store (``mlflow.db`` and ``mlartifacts/``);
            the current directory when None. Created if missing (unless ``read_only``).
        read_only: a missing embedded sqlite database is an error instead of being
            created, so a lookup in the wrong directory leaves no empty ``mlflow.db``.

    Returns:
        The store. For a ``sqlite:`` store the experiment's artifact location is
        ``<root>/mlartifacts`` (``root`` defaulting to the database's directory); for a
        server the server decides (e.g. ``--artifacts-destination``).

    Raises:
        ModelNotFoundError: ``read_only`` and the sqlite database does not exist.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    if uri is None and mlflow.is_tracking_uri_set():
        uri = mlflow.get_tracking_uri()  # set in this process (env since unset)
    if uri is None:
        base = (Path(root) if root is not None else Path.cwd()).resolve()
        uri = f"sqlite:///{base / 'mlflow.db'}"
    db = sqlite_path(uri)
    if read_only and db is not None and not db.is_file():
        raise ModelNotFoundError(
            f"no MLflow tracking store at {db} (tracking URI {uri}); run the pipeline "
            "in this directory or set MLFLOW_TRACKING_URI"
        )
    artifact_location: str | None = None
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
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
    return TrackingStore(uri=uri, experiment_id=str(exp_id))


def configure_tracking(tracking_uri: str | None = None, root: Path | None = None) -> str:
    """Open the store (:func:`open_store`) and select experiment ``mitoseg`` in MLflow.

    Args:
        tracking_uri: explicit tracking URI (else ``$MLFLOW_TRACKING_URI``, else the
            embedded default under ``root``).
        root: directory of the embedded store; the current directory when None.

    Returns:
        The tracking URI now in use. Calling it again with the same arguments is a no-op
        apart from re-selecting the experiment.
    """
    import mlflow

    store = open_store(tracking_uri, root)
    mlflow.set_experiment(experiment_id=store.experiment_id)
    return store.uri
