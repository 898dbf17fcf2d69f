"""Model hand-over from the MLflow registry to the BentoML model store, and Bento build.

:func:`import_model` loads a model by URI (``models:/name@alias``, ``models:/name/1``,
``runs:/id/model`` through :func:`mitoseg.tracking.load_model`, or a local ``.keras``
file), saves it as ``model.keras`` inside a BentoML model ``mitoseg-unet`` and records
its lineage and serving settings in the model's metadata. The service
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

from mitoseg.config import BaseConfig, ServeConfig

__all__ = [
    "BENTO_MODEL_NAME",
    "MODEL_FILE",
    "MODEL_TAG_ENV",
    "build_bento",
    "build_metadata",
    "find_imported",
    "import_model",
    "model_divisor",
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


def _load(uri: str) -> tuple[Any, dict[str, Any]]:
    """Load the Keras model and its registry info (empty info for a local file)."""
    if _is_local_file(uri):
        path = Path(uri)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: model file not found")
        if path.suffix != ".keras":
            raise ValueError(f"{path}: expected a .keras model file")
        import keras

        model = keras.saving.load_model(path, compile=False)
        info: dict[str, Any] = {"source_sha256": _file_sha256(path)}
        return model, info
    from mitoseg.tracking import load_model, model_info

    return load_model(uri), dict(model_info(uri))


def model_divisor(model: Any) -> int:
    """``2**depth`` of a UNet-like Keras model: 2 to the number of 2x down-sampling layers.

    Tiles fed to the model must have a side divisible by this.
    """
    import keras

    pools = (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D)

    def count(m: Any) -> int:
        n = 0
        for layer in getattr(m, "layers", []):
            n += 1 if isinstance(layer, pools) else count(layer)
        return n

    return 2 ** count(model)


def build_metadata(
    info: dict[str, Any],
    *,
    uri: str,
    n_channels: int,
    divisor: int,
    base: BaseConfig,
    serve: ServeConfig,
    threshold: float | None = None,
    min_object_size: int = 0,
) -> dict[str, Any]:
    """Metadata stored with the BentoML model (and returned by ``/metadata``).

    Args:
        info: :func:`mitoseg.tracking.model_info` output (``name``, ``version``,
            ``alias``, ``run_id``, ``tags``, ``metrics``); may be empty for a local file.
        uri: the model URI it was loaded from.
        n_channels: output channels of the model (1 = sigmoid binary).
        divisor: tile side divisor (:func:`model_divisor`).
        base: class table used to name the classes.
        serve: serving limits and batching settings.
        threshold: foreground threshold; ``None`` takes the registered model's
            ``threshold`` metric, else 0.5.
        min_object_size: smallest object counted by ``/stats``, pixels.

    Returns:
        A JSON-able dict; unknown lineage fields (``None``) are left out.

    Raises:
        ValueError: threshold outside [0, 1] or the class table does not match the model.
    """
    metrics = {k: float(v) for k, v in (info.get("metrics") or {}).items()}
    tags = {str(k): str(v) for k, v in (info.get("tags") or {}).items()}
    if threshold is None:
        threshold = metrics.get("threshold", 0.5)
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    n_classes = 2 if n_channels == 1 else n_channels
    if base.n_classes != n_classes:
        raise ValueError(
            f"the model predicts {n_classes} classes but base.classes lists "
            f"{base.n_classes} ({', '.join(base.class_names)})"
        )
    version = info.get("version")
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
        "threshold": float(threshold),
        "n_classes": n_classes,
        "class_names": base.class_names,
        "divisor": int(divisor),
        "min_object_size": int(min_object_size),
        "serve": serve.model_dump(),
    }
    # BentoML metadata cannot hold None: unknown fields are left out.
    return {k: v for k, v in meta.items() if v is not None}


def _labels(meta: dict[str, Any]) -> dict[str, str]:
    keys = ("name", "version", "alias", "run_id", "source_sha256", "threshold", "serve_hash")
    return {k: str(meta[k]) for k in keys if meta.get(k) is not None}


def _with_serve_hash(meta: dict[str, Any]) -> dict[str, Any]:
    import json

    settings = {k: meta[k] for k in ("serve", "threshold", "class_names", "min_object_size")}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return {**meta, "serve_hash": digest}


def find_imported(labels: dict[str, str]) -> str | None:
    """Tag of a stored ``mitoseg-unet`` model whose labels match, or ``None``.

    Only used for a registry version or a file hash, which identify the weights exactly.
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
    base: BaseConfig | None = None,
    serve: ServeConfig | None = None,
    threshold: float | None = None,
    min_object_size: int = 0,
    reuse: bool = True,
) -> tuple[str, dict[str, Any]]:
    """Copy a model into the BentoML model store with its lineage metadata.

    Args:
        uri: ``models:/name@alias``, ``models:/name/<version>``, ``runs:/<id>/model``
            or a local ``.keras`` file.
        base: class table (default :class:`BaseConfig` defaults).
        serve: serving settings stored with the model (default :class:`ServeConfig`).
        threshold: foreground threshold (default: the model's ``threshold`` metric, else
            0.5).
        min_object_size: smallest object counted by ``/stats``, pixels.
        reuse: return an already imported model with the same weights and settings
            instead of importing again.

    Returns:
        ``(tag, metadata)``: the BentoML model tag, e.g. ``mitoseg-unet:abc123``.

    Raises:
        FileNotFoundError: a local model file is missing.
        ValueError: bad threshold or class table, or the model output is not 4D.
    """
    import bentoml

    base = base or BaseConfig()
    serve = serve or ServeConfig()
    model, info = _load(uri)
    shape = tuple(model.output_shape)
    if len(shape) != 4:
        raise ValueError(f"{uri}: expected a (N, H, W, C) model output, got {shape}")
    meta = build_metadata(
        info,
        uri=uri,
        n_channels=int(shape[-1]),
        divisor=model_divisor(model),
        base=base,
        serve=serve,
        threshold=threshold,
        min_object_size=min_object_size,
    )
    meta = _with_serve_hash(meta)
    labels = _labels(meta)
    if reuse:
        found = find_imported(labels)
        if found is not None:
            return found, bentoml.models.get(found).info.metadata
    with bentoml.models.create(name=BENTO_MODEL_NAME, labels=labels, metadata=meta) as bm:
        model.save(os.path.join(bm.path, MODEL_FILE))
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


def build_bento(
    model_tag: str, bentofile: Path, build_ctx: Path, version: str | None = None
) -> str:
    """Build the Bento (``bentoml build``) around one stored model.

    Args:
        model_tag: BentoML model tag from :func:`import_model`; the Bento packs it.
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

    if not bentofile.is_file():
        raise FileNotFoundError(f"{bentofile}: bentofile not found")
    if not build_ctx.is_dir():
        raise FileNotFoundError(f"{build_ctx}: build context directory not found")
    bentoml.models.get(model_tag)  # fail early with BentoML's NotFound
    # The tag is stored as a Bento argument so the Bento serves exactly this model.
    with _env(MODEL_TAG_ENV, model_tag):
        bento = bentoml.bentos.build_bentofile(
            str(bentofile),
            build_ctx=str(build_ctx),
            version=version,
            reload=True,
            args={"model_tag": model_tag},
        )
    return str(bento.tag)
