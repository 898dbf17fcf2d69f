"""Model hand-over from the MLflow registry to the BentoML model store, and Bento build.

:func:`import_model` loads a model and its inference plan by URI (``models:/name@alias``,
``models:/name/1``, ``runs:/id/model`` or a local ``.keras`` file, through
:func:`mitoseg.tracking.load_model_and_plan`), saves them as ``model.keras`` and
``inference_plan.json`` inside a BentoML model ``mitoseg-unet`` and records its lineage
and serving settings in the model's metadata. The service
(:mod:`mitoseg.serving.service`) reads everything it needs from that metadata, so a
Bento is self-contained. :func:`build_bento` runs ``bentoml build`` with the repository's
``bentofile.yaml``.

BentoML, Keras and MLflow are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mitoseg.config import ServeConfig
from mitoseg.inference.plan import PLAN_FILE, InferencePlan
from mitoseg.inference.runtime import OPENVINO_FILE

__all__ = [
    "BENTO_MODEL_NAME",
    "MODEL_FILE",
    "MODEL_TAG_ENV",
    "build_bento",
    "build_metadata",
    "check_build_inputs",
    "find_imported",
    "import_model",
]

#: Name of the model in the BentoML model store.
BENTO_MODEL_NAME = "mitoseg-unet"
#: File name of the Keras model inside the BentoML model directory.
MODEL_FILE = "model.keras"
#: Environment variable naming the BentoML model tag the service loads.
MODEL_TAG_ENV = "MITOSEG_BENTO_MODEL"


def _is_local_file(uri: str) -> bool:
    return "://" not in uri and not uri.startswith(("models:", "runs:"))


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load(uri: str) -> tuple[Any, Any, dict[str, Any]]:
    """Load the Keras model, its inference plan and registry info (file hash for a file)."""
    from mitoseg.tracking import load_model_and_plan, model_info

    if _is_local_file(uri):
        path = Path(uri)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: model file not found")
        if path.suffix != ".keras":
            raise ValueError(f"{path}: expected a .keras model file")
        model, plan = load_model_and_plan(str(path))
        return model, plan, {"source_sha256": _file_sha256(path)}
    model, plan = load_model_and_plan(uri)
    return model, plan, dict(model_info(uri))


def _profile_bytes(uri: str) -> bytes | None:
    """The reference profile stored with the model (validated), or None without one."""
    import tempfile

    from mitoseg.data.profile import PROFILE_FILE, ReferenceProfile
    from mitoseg.tracking import model_file

    with tempfile.TemporaryDirectory() as tmp:
        found = model_file(uri, PROFILE_FILE, Path(tmp))
        if found is None:
            return None
        ReferenceProfile.read(found)
        return found.read_bytes()


def build_metadata(
    info: dict[str, Any], *, uri: str, plan: InferencePlan, serve: ServeConfig
) -> dict[str, Any]:
    """Metadata stored with the BentoML model (and returned by ``/metadata``).

    The plan itself travels as the file :data:`mitoseg.inference.plan.PLAN_FILE` in the model
    directory; the metadata repeats its decisions for display and its hash for identity.

    Args:
        info: :func:`mitoseg.tracking.model_info` output (``name``, ``version``,
            ``alias``, ``run_id``, ``tags``, ``metrics``); may be just
            ``{"source_sha256"}`` for a local file.
        uri: the model URI it was loaded from.
        plan: the inference plan the service will run.
        serve: serving limits and batching settings.

    Returns:
        A JSON-able dict; unknown lineage fields (``None``) are left out.
    """
    import json

    metrics = {k: float(v) for k, v in (info.get("metrics") or {}).items()}
    tags = {str(k): str(v) for k, v in (info.get("tags") or {}).items()}
    version = info.get("version")
    plan_json = json.dumps(plan.model_dump(mode="json"), sort_keys=True)
    meta = {
        "name": info.get("name") or BENTO_MODEL_NAME,
        "version": str(version) if version is not None else None,
        "alias": info.get("alias"),
        "run_id": info.get("run_id"),
        "source_uri": uri,
        "source_sha256": info.get("source_sha256"),
        "git_commit": tags.get("git_commit"),
        "data_hash": tags.get("data_dvc_md5"),
        "metrics": metrics,
        "threshold": plan.threshold,
        "threshold_source": plan.threshold_source,
        "plan_source": plan.source,
        "engine": f"{plan.runtime}/{plan.precision}",
        "n_classes": plan.n_classes,
        "class_names": list(plan.class_names),
        "plan_sha256": hashlib.sha256(plan_json.encode()).hexdigest(),
        "serve": serve.model_dump(),
    }
    # BentoML metadata cannot hold None: unknown fields are left out.
    return {k: v for k, v in meta.items() if v is not None}


def _labels(meta: dict[str, Any]) -> dict[str, str]:
    keys = ("name", "version", "alias", "run_id", "source_sha256", "threshold", "serve_hash")
    keys += ("openvino_file",)
    return {k: str(meta[k]) for k in keys if meta.get(k) is not None}


def _with_serve_hash(meta: dict[str, Any]) -> dict[str, Any]:
    import json

    keys = ("serve", "plan_sha256", "profile_sha256")
    settings = {k: meta[k] for k in keys if k in meta}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return {**meta, "serve_hash": digest}


def find_imported(labels: dict[str, str]) -> str | None:
    """Tag of a stored ``mitoseg-unet`` model whose labels match, or ``None``.

    Only used for a registry version or a file hash, which identify the weights exactly
    (the labels also hold the hash of the plan and serving settings).
    """
    import bentoml

    if not (("version" in labels and "name" in labels) or "source_sha256" in labels):
        return None
    try:
        stored = bentoml.models.list(BENTO_MODEL_NAME)
    except bentoml.exceptions.NotFound:
        return None
    for m in sorted(stored, key=lambda m: m.creation_time, reverse=True):
        if all(m.info.labels.get(k) == v for k, v in labels.items()):
            return str(m.tag)
    return None


def import_model(
    uri: str,
    *,
    serve: ServeConfig | None = None,
    overrides: dict[str, Any] | None = None,
    reuse: bool = True,
) -> tuple[str, dict[str, Any]]:
    """Copy a model and its inference plan into the BentoML model store.

    The model directory holds ``model.keras`` and ``inference_plan.json`` (the plan the
    evaluate stage stored with the model, with ``overrides`` applied), for a plan on
    OpenVINO the converted model (``model_openvino.xml``/``.bin``,
    :func:`mitoseg.inference.runtime.export_openvino`: the runner then needs no
    TensorFlow) and, when the model has one, ``reference_profile.json``
    (:mod:`mitoseg.data.profile`, for drift monitoring); the metadata holds the
    lineage. The service reads them from there and decides nothing itself.

    Args:
        uri: ``models:/name@alias``, ``models:/name/<version>``, ``runs:/<id>/model``
            or a local ``.keras`` file (plan beside it).
        serve: serving settings stored with the model (default :class:`ServeConfig`).
        overrides: plan fields to replace, e.g. ``{"threshold": 0.7}`` from
            ``--threshold`` (None values are ignored).
        reuse: return an already imported model with the same weights, plan and
            settings instead of importing again.

    Returns:
        ``(tag, metadata)``: the BentoML model tag, e.g. ``mitoseg-unet:abc123``.

    Raises:
        FileNotFoundError: a local model file is missing.
        ValueError: an invalid override, or a plan that does not fit the model.
        mitoseg.io.DataError: an invalid stored reference profile (named).
    """
    import bentoml

    serve = serve or ServeConfig()
    model, plan, info = _load(uri)
    if overrides and overrides.get("threshold") is not None:
        overrides = {**overrides, "threshold_source": "params"}
    plan = plan.with_overrides(**(overrides or {}))
    meta = build_metadata(info, uri=uri, plan=plan, serve=serve)
    if plan.runtime == "openvino":
        # the runner compiles the saved OpenVINO model and never imports TensorFlow
        meta["openvino_file"] = OPENVINO_FILE
    profile = _profile_bytes(uri)
    if profile is not None:
        meta["profile_sha256"] = hashlib.sha256(profile).hexdigest()
    meta = _with_serve_hash(meta)
    labels = _labels(meta)
    if reuse:
        found = find_imported(labels)
        if found is not None:
            return found, bentoml.models.get(found).info.metadata
    with bentoml.models.create(name=BENTO_MODEL_NAME, labels=labels, metadata=meta) as bm:
        model.save(os.path.join(bm.path, MODEL_FILE))
        plan.write(os.path.join(bm.path, PLAN_FILE))
        if plan.runtime == "openvino":
            from mitoseg.inference.runtime import export_openvino

            export_openvino(model, plan, os.path.join(bm.path, OPENVINO_FILE))
        if profile is not None:
            from mitoseg.data.profile import PROFILE_FILE

            Path(bm.path, PROFILE_FILE).write_bytes(profile)
    return str(bm.tag), meta


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def check_build_inputs(bentofile: Path, build_ctx: Path) -> None:
    """Fail early (before any model is loaded) on a missing bentofile or build context.

    Raises:
        FileNotFoundError: ``bentofile`` is not a file or ``build_ctx`` not a directory.
    """
    if not bentofile.is_file():
        raise FileNotFoundError(f"{bentofile}: bentofile not found")
    if not build_ctx.is_dir():
        raise FileNotFoundError(f"{build_ctx}: build context directory not found")


def build_bento(
    model_tag: str,
    bentofile: Path,
    build_ctx: Path,
    version: str | None = None,
    serve: ServeConfig | None = None,
) -> str:
    """Build the Bento (``bentoml build``) around one stored model.

    Args:
        model_tag: BentoML model tag from :func:`import_model`; the Bento packs it.
        serve: serving limits baked into the Bento as arguments (read by the service at
            import, before any store access); default :class:`ServeConfig`.
        bentofile: path of ``bentofile.yaml``.
        build_ctx: directory the ``include`` patterns are relative to (the repo's
            ``src``, so ``mitoseg`` is importable inside the Bento).
        version: Bento version (default: generated by BentoML).

    Returns:
        The Bento tag, e.g. ``mitoseg:xyz``.

    Raises:
        FileNotFoundError: missing bentofile or build context.
    """
    import bentoml

    check_build_inputs(bentofile, build_ctx)
    bentoml.models.get(model_tag)  # fail early with BentoML's NotFound
    # The tag is stored as a Bento argument so the Bento serves exactly this model.
    with _env(MODEL_TAG_ENV, model_tag):
        bento = bentoml.bentos.build_bentofile(
            str(bentofile),
            build_ctx=str(build_ctx),
            version=version,
            reload=True,
            args={"model_tag": model_tag, **(serve or ServeConfig()).model_dump()},
        )
    return str(bento.tag)
