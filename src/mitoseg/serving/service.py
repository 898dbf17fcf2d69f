"""BentoML 1.4 service: mitochondria segmentation over HTTP.

Two services, one process each under ``bentoml serve``:

* :class:`UNetRunner` holds the Keras model (``resources={"gpu": 1}``: TensorFlow
  uses the GPU when the machine has one, the CPU otherwise) and exposes one batchable
  API, ``predict_tiles`` ``(B, T, T, 1) float32 -> (B, T, T, C) float32``. BentoML's
  adaptive batcher merges the tile batches of concurrent requests up to
  ``serve.max_batch_size`` tiles, waiting at most ``serve.max_latency_ms``.
* :class:`MitoSeg` is the public API. It decodes and validates uploads
  (:mod:`mitoseg.serving.codec`) and runs the one tiled-inference implementation,
  :func:`mitoseg.inference.segment_stack`, with the runner as its batch predictor.

Endpoints (all ``POST``; uploads are multipart ``image`` fields):
``/segment`` (one TIFF/PNG -> PNG or TIFF mask, ``format`` field), ``/segment_stack``
(multi-page TIFF -> multi-page TIFF), ``/stats`` (object count, area fraction,
per-object area and centroid), ``/metadata`` (model lineage). BentoML adds ``/livez``,
``/readyz``, ``/metrics`` and the OpenAPI page ``/docs.json``. Bad input gets a JSON
4xx ``{"error": code, "message": ..., "status": ...}``. With ``MITOSEG_API_TOKEN`` set,
everything but health, readiness and docs needs ``Authorization: Bearer <token>``.

The model comes from the BentoML model store: Bento argument ``model_tag``, else
``$MITOSEG_BENTO_MODEL``, else ``mitoseg-unet:latest``; imported by
:func:`mitoseg.serving.bento.import_model`, whose metadata carries the threshold,
classes and the ``serve:`` settings.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import bentoml
import numpy as np
from bentoml.validators import ContentType
from starlette.responses import JSONResponse, Response

from mitoseg.config import ServeConfig
from mitoseg.inference import mask_to_image, segment_stack
from mitoseg.serving.analysis import foreground_index, mask_stats
from mitoseg.serving.bento import BENTO_MODEL_NAME, MODEL_FILE, MODEL_TAG_ENV
from mitoseg.serving.codec import Limits, UploadError, decode_upload, encode_png, encode_tiff
from mitoseg.serving.middleware import GuardMiddleware
from mitoseg.serving.settings import tile_batch

logger = logging.getLogger("mitoseg.serving")

#: Environment variable holding the optional API token.
TOKEN_ENV = "MITOSEG_API_TOKEN"
#: Retries of a runner call whose pooled connection was closed under it.
RUNNER_RETRIES = 2
#: Slack for multipart framing on top of ``serve.max_bytes`` for the whole request body.
MULTIPART_SLACK = 1024 * 1024


def _model_tag() -> str:
    """The model to serve: Bento argument ``model_tag`` (baked in by ``mitoseg bento
    build``), else ``$MITOSEG_BENTO_MODEL`` (set by ``mitoseg serve``), else the latest
    ``mitoseg-unet``."""
    args = bentoml.use_arguments()
    return (
        getattr(args, "model_tag", None)
        or os.environ.get(MODEL_TAG_ENV)
        or f"{BENTO_MODEL_NAME}:latest"
    )


MODEL_REF = bentoml.models.BentoModel(_model_tag())


def _stored_metadata() -> dict[str, Any]:
    stored = MODEL_REF.stored
    if stored is None:
        raise bentoml.exceptions.NotFound(
            f"model {MODEL_REF.tag} is not in the BentoML model store; import one with "
            "`mitoseg bento build` or `mitoseg serve`"
        )
    return dict(stored.info.metadata)


META: dict[str, Any] = _stored_metadata()
BENTO_TAG = str(MODEL_REF.stored.tag) if MODEL_REF.stored is not None else str(MODEL_REF.tag)
CFG = ServeConfig.model_validate(META["serve"])
LIMITS = Limits.from_config(CFG)
#: Tiles per call to the runner: small enough that concurrent requests share batches.
TILE_BATCH = tile_batch(CFG.max_batch_size)


@bentoml.service(
    name="mitoseg-unet-runner",
    resources={"gpu": 1},
    workers=1,
    traffic={"timeout": 600},
)
class UNetRunner:
    """Keras UNet behind an adaptively batched tile API."""

    model_ref = MODEL_REF

    def __init__(self) -> None:
        import keras

        import mitoseg.model.unet  # noqa: F401  (registers custom objects, if any)

        self.model = keras.saving.load_model(self.model_ref.path_of(MODEL_FILE), compile=False)

    @bentoml.api(
        batchable=True,
        batch_dim=0,
        max_batch_size=CFG.max_batch_size,
        max_latency_ms=CFG.max_latency_ms,
    )
    def predict_tiles(self, tiles: np.ndarray) -> np.ndarray:
        """Predict a batch of tiles.

        Args:
            tiles: ``(B, T, T, 1)`` float32 in ``[0, 1]``.

        Returns:
            ``(B, T, T, C)`` float32 probabilities.
        """
        batch = np.ascontiguousarray(tiles, dtype=np.float32)
        return np.asarray(self.model.predict_on_batch(batch), dtype=np.float32)


def _error(exc: UploadError) -> JSONResponse:
    return JSONResponse(exc.to_json(), status_code=exc.status)


def _read_upload(image: Path, max_pages: int | None) -> np.ndarray:
    size = image.stat().st_size
    if size > LIMITS.max_bytes:
        raise UploadError(
            413, "too_large", f"the upload is {size} bytes; the limit is {LIMITS.max_bytes} bytes"
        )
    return decode_upload(image.read_bytes(), LIMITS, max_pages=max_pages)


TiffOrPng = Annotated[Path, ContentType("image/tiff")]


@bentoml.service(
    name="mitoseg",
    workers=1,
    threads=32,
    traffic={"timeout": 600, "max_concurrency": 64},
)
class MitoSeg:
    """Public segmentation API (see the module docstring)."""

    runner = bentoml.depends(UNetRunner)

    def _predict_tiles(self, tiles: np.ndarray) -> np.ndarray:
        """Call the batched runner; retry a dropped keep-alive connection (the call is
        idempotent), which the runner's HTTP server may close between requests."""
        import aiohttp

        for attempt in range(RUNNER_RETRIES + 1):
            try:
                return self.runner.predict_tiles(tiles)
            except aiohttp.ClientConnectionError:
                if attempt == RUNNER_RETRIES:
                    raise
                logger.warning("runner connection dropped; retrying (%d)", attempt + 1)
        raise AssertionError("unreachable")

    def _segment(self, stack: np.ndarray) -> np.ndarray:
        """``(Z, H, W)`` raw intensities -> ``(Z, H, W)`` uint8 class indexes."""
        return segment_stack(
            self._predict_tiles,
            stack,
            tile_size=CFG.tile_size,
            overlap=CFG.overlap,
            batch_size=TILE_BATCH,
            threshold=META["threshold"],
            divisor=META["divisor"],
        )

    @bentoml.api(route="/segment")
    def segment(self, image: TiffOrPng, format: Literal["png", "tiff"] = "png") -> Path:
        """Segment one image (TIFF or PNG, 8/16-bit or float32, grayscale or RGB).

        Returns the mask as PNG (default) or TIFF: 0/255 for binary models, class
        indexes for multiclass ones.
        """
        try:
            stack = _read_upload(image, max_pages=1)
        except UploadError as exc:
            return _error(exc)  # type: ignore[return-value]
        mask = mask_to_image(self._segment(stack), META["n_classes"])
        if format == "tiff":
            return Response(encode_tiff(mask[0]), media_type="image/tiff")  # type: ignore[return-value]
        return Response(encode_png(mask[0]), media_type="image/png")  # type: ignore[return-value]

    @bentoml.api(route="/segment_stack")
    def segment_stack(self, image: TiffOrPng) -> Path:
        """Segment every page of a (multi-page) TIFF; returns a multi-page TIFF mask."""
        try:
            stack = _read_upload(image, max_pages=None)
        except UploadError as exc:
            return _error(exc)  # type: ignore[return-value]
        mask = mask_to_image(self._segment(stack), META["n_classes"])
        return Response(encode_tiff(mask), media_type="image/tiff")  # type: ignore[return-value]

    @bentoml.api(route="/stats")
    def stats(self, image: TiffOrPng) -> dict[str, Any]:
        """Segment one image and measure its mitochondria.

        Returns ``count``, ``area_fraction``, ``foreground_pixels`` and ``objects``
        (``id``, ``area`` in pixels, ``centroid`` ``[y, x]``, ``bbox``).
        """
        try:
            stack = _read_upload(image, max_pages=1)
        except UploadError as exc:
            return _error(exc)  # type: ignore[return-value]
        classes = self._segment(stack)[0]
        fg = foreground_index(META["class_names"])
        out = mask_stats(classes, fg, META["min_object_size"])
        return {"class": META["class_names"][fg], "min_object_size": META["min_object_size"], **out}

    @bentoml.api(route="/metadata")
    def metadata(self) -> dict[str, Any]:
        """Model lineage: name, version, alias, run id, git commit, data hash, metrics,
        threshold, classes and serving limits."""
        keys = (
            "name",
            "version",
            "alias",
            "run_id",
            "git_commit",
            "data_hash",
            "metrics",
            "threshold",
            "n_classes",
            "class_names",
            "source_uri",
            "serve",
        )
        return {"bento_model": BENTO_TAG, **{k: META.get(k) for k in keys}}


MitoSeg.add_asgi_middleware(
    GuardMiddleware,
    token_env=TOKEN_ENV,
    max_bytes=CFG.max_bytes + MULTIPART_SLACK,
    upload_paths=("/segment", "/segment_stack", "/stats"),
)
