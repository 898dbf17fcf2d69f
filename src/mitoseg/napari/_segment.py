"""Segmentation for the napari widget, without napari or Qt: a local model or an endpoint.

* :func:`segment_local`: a model URI (``.keras`` path, ``models:/name@alias``,
  ``models:/name/1``, ``runs:/id/model``) loaded with its inference plan
  (:func:`mitoseg.tracking.load_model_and_plan`) and run by
  :func:`mitoseg.inference.predict.segment_stack`, exactly as ``mitoseg predict`` runs it.
  The widget calls it through its own :class:`SegmentWorker`: one spawned worker process
  that keeps the models it loaded between calls. TensorFlow never loads into the napari
  process: TensorFlow and Mesa's software OpenGL (llvmpipe, used by napari under Xvfb,
  in VMs and on machines without a GPU driver) each carry LLVM, and whichever loads
  second crashes the process in LLVM's static initialisers.
* :func:`segment_remote`: a running mitoseg service (``mitoseg serve``): the stack goes as
  a multi-page TIFF to ``POST /segment_stack``; ``POST /metadata`` says how to read the
  returned mask (binary 0/255 or class indexes).
* :func:`mask_layers`: the class mask and its instance labels
  (:func:`mitoseg.inference.objects.instance_labels`) as napari layer data tuples on the scale of
  the source image.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from mitoseg.checks import check_stack

__all__ = [
    "MASK_COLOR",
    "SegmentWorker",
    "as_stack",
    "endpoint_model",
    "mask_layers",
    "segment_local",
    "segment_remote",
]

#: Colour of the foreground class in the mask layer (RGBA, 0..1): magenta.
MASK_COLOR = (1.0, 0.0, 1.0, 1.0)
#: Seconds a request to an endpoint may take.
REQUEST_TIMEOUT_S = 600


def as_stack(data: Any, rgb: bool = False) -> np.ndarray:
    """Image layer data -> ``(Z, H, W)`` raw intensities.

    Args:
        data: ``(H, W)``, ``(Z, H, W)`` (or ``(..., 3|4)`` with ``rgb``) array-like, or a
            list of pyramid levels (the first, full-resolution level is used).
        rgb: the layer is RGB(A): converted to luma.

    Raises:
        ValueError: not a 2D image or a 3D stack.
    """
    from mitoseg.pixels import to_gray

    if isinstance(data, list | tuple):
        data = data[0]
    arr = np.asarray(data)
    if rgb:
        arr = to_gray(arr)
    return check_stack(arr, "image layer")


#: A cache of loaded models: ``{model URI: (Keras model, InferencePlan)}``.
Models = dict[str, tuple[Any, Any]]


def segment_local(
    stack: np.ndarray, model_uri: str, models: Models | None = None
) -> tuple[np.ndarray, Any]:
    """Segment a stack with a model and its inference plan, in this process.

    Args:
        stack: ``(Z, H, W)`` raw intensities (uint8, uint16 or float).
        model_uri: ``.keras`` path or MLflow model URI.
        models: the caller's cache of loaded models (the worker process keeps one), or
            None to load the model for this call only.

    Returns:
        ``((Z, H, W) uint8 class indexes, the InferencePlan)``.

    Raises:
        ValueError: empty URI or bad stack.
        mitoseg.tracking.ModelNotFoundError: unknown model URI.
    """
    from mitoseg.inference.predict import segment_stack
    from mitoseg.tracking import load_model_and_plan

    uri = model_uri.strip()
    if not uri:
        raise ValueError("model URI is empty: give a .keras path or a models:/ URI")
    models = {} if models is None else models
    if uri not in models:
        models[uri] = load_model_and_plan(uri)
    model, plan = models[uri]
    return segment_stack(model, stack, plan), plan


def _serve(conn: Any) -> None:
    """The worker process: answer ``(stack, model URI)`` requests until the pipe closes,
    keeping every model it loaded."""
    models: Models = {}
    while True:
        try:
            stack, uri = conn.recv()
        except (EOFError, OSError):
            return
        try:
            classes, plan = segment_local(stack, uri, models)
            answer = (True, (classes, list(plan.class_names), int(plan.min_object_size)))
        except Exception as exc:  # raised again in the caller
            answer = (False, exc)
        try:
            conn.send(answer)
        except OSError:  # the caller has gone
            return
        except Exception:  # an exception that does not pickle: send its text
            conn.send((False, RuntimeError(f"{type(answer[1]).__name__}: {answer[1]}")))


class SegmentWorker:
    """One spawned worker process running :func:`segment_local` (the model stays loaded
    there; TensorFlow never loads into this process).

    Started on the first :meth:`segment`, restarted on the next call after it died, and
    stopped by :meth:`close` or when this process exits (a daemon process). Requests are
    served one at a time. Each widget owns one.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: Any = None
        self._conn: Any = None

    def _start(self) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        ours, theirs = ctx.Pipe()
        proc = ctx.Process(target=_serve, args=(theirs,), daemon=True, name="mitoseg-segment")
        proc.start()
        theirs.close()
        self._proc, self._conn = proc, ours

    def _stop(self) -> None:
        proc, conn, self._proc, self._conn = self._proc, self._conn, None, None
        if conn is not None:
            conn.close()  # the worker's recv ends: it returns
        if proc is not None:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)

    def segment(
        self, stack: np.ndarray, model_uri: str, timeout: float | None = None
    ) -> tuple[np.ndarray, list[str], int]:
        """:func:`segment_local` in the worker process.

        Args:
            stack: ``(Z, H, W)`` raw intensities.
            model_uri: ``.keras`` path or MLflow model URI.
            timeout: seconds to wait, or None; the worker is stopped when it runs over.

        Returns:
            ``((Z, H, W) uint8 class indexes, class names, min_object_size)`` of the plan.

        Raises:
            ValueError, mitoseg.tracking.ModelNotFoundError: as :func:`segment_local`,
                raised here.
            RuntimeError: the worker process died (it is restarted on the next call).
            TimeoutError: no answer within ``timeout`` seconds.
        """
        if not model_uri.strip():
            raise ValueError("model URI is empty: give a .keras path or a models:/ URI")
        with self._lock:
            if self._proc is None or not self._proc.is_alive():
                self._stop()
                self._start()
            try:
                self._conn.send((np.asarray(stack), model_uri))
                if not self._conn.poll(timeout):
                    self._stop()
                    raise TimeoutError(f"the segmentation worker did not answer within {timeout} s")
                ok, value = self._conn.recv()
            except (EOFError, OSError):
                self._stop()
                raise RuntimeError(
                    f"the segmentation worker died while running {model_uri}"
                ) from None
        if not ok:
            raise value
        return value

    def close(self) -> None:
        """Stop the worker process (a later :meth:`segment` starts a new one)."""
        with self._lock:
            self._stop()


def _tiff(stack: np.ndarray) -> bytes:
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, stack, photometric="minisblack", compression="zlib")
    return buf.getvalue()


def _check(response: Any, url: str) -> None:
    if response.status_code == 200:
        return
    try:
        message = response.json().get("message", response.text)
    except ValueError:
        message = response.text
    raise RuntimeError(f"{url}: HTTP {response.status_code}: {message}")


def segment_remote(
    stack: np.ndarray, url: str, token: str | None = None, timeout: float = REQUEST_TIMEOUT_S
) -> tuple[np.ndarray, dict[str, Any]]:
    """Segment a stack on a running mitoseg endpoint.

    Args:
        stack: ``(Z, H, W)`` uint8/uint16/float32 raw intensities.
        url: base URL of the service, e.g. ``http://127.0.0.1:3000``.
        token: bearer token when the service has ``MITOSEG_API_TOKEN`` set.
        timeout: seconds per request.

    Returns:
        ``((Z, H, W) uint8 class indexes, the service's /metadata)``.

    Raises:
        ValueError: empty or non-HTTP URL.
        RuntimeError: the service answered with an error (its message included).
        requests.RequestException: the service cannot be reached.
    """
    import requests
    import tifffile

    base = url.strip().rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise ValueError(f"endpoint URL must start with http:// or https://, got {url!r}")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    r = requests.post(base + "/metadata", headers=headers, timeout=timeout)
    _check(r, base + "/metadata")
    meta = r.json()
    files = {"image": ("stack.tif", _tiff(stack), "image/tiff")}
    r = requests.post(base + "/segment_stack", files=files, headers=headers, timeout=timeout)
    _check(r, base + "/segment_stack")
    mask = tifffile.imread(io.BytesIO(r.content)).reshape(stack.shape)
    classes = (mask == 255).astype(np.uint8) if int(meta["n_classes"]) == 2 else mask
    return classes.astype(np.uint8, copy=False), meta


def endpoint_model(url: str, meta: dict[str, Any]) -> str:
    """The model an endpoint serves, from its ``/metadata``: ``models:/NAME/VERSION``
    when registered, else its Bento model tag, else the URL.

    Args:
        url: the endpoint's base URL.
        meta: its ``POST /metadata`` answer.
    """
    if meta.get("name") and meta.get("version"):
        return f"models:/{meta['name']}/{meta['version']}"
    return str(meta.get("bento_model") or url.strip())


def mask_layers(
    classes: np.ndarray,
    class_names: Sequence[str],
    min_object_size: int,
    scale: Sequence[float],
    name: str,
    squeeze: bool = False,
    model: str | None = None,
) -> list[tuple[np.ndarray, dict[str, Any], str]]:
    """The mask and instance layers of a segmentation.

    Args:
        classes: ``(Z, H, W)`` uint8 class indexes.
        class_names: the plan's class names (background first).
        min_object_size: smallest counted object, voxels (the plan's).
        scale: scale of the source image layer (one entry per image dimension).
        name: source layer name (layers are named ``"<name> mask"``, ``"<name> instances"``).
        squeeze: the source was 2D: return ``(H, W)`` layers.
        model: the model that segmented (URI, or the endpoint's model and version), kept
            in the layers' ``metadata["model"]`` (the label store's provenance).

    Returns:
        ``[(classes, kwargs, "labels"), (uint32 instance labels, kwargs, "labels")]``.
    """
    from mitoseg.inference.objects import instance_labels
    from mitoseg.inference.plan import foreground_class

    fg = foreground_class(list(class_names))
    instances, n = instance_labels(
        classes == fg if fg is not None else np.zeros(classes.shape, bool), min_object_size
    )
    colors: dict[int | None, Any] = {0: "transparent", None: "transparent"}
    if len(class_names) == 2:
        colors[1] = MASK_COLOR
    if squeeze:
        classes, instances = classes[0], instances[0]
    meta = {"class_names": list(class_names), "n_objects": int(n), "model": model}
    mask_kwargs: dict[str, Any] = {
        "name": f"{name} mask",
        "scale": tuple(scale),
        "opacity": 0.5,
        "metadata": meta,
    }
    if len(class_names) == 2:
        mask_kwargs["colormap"] = colors
    inst_kwargs = {
        "name": f"{name} instances",
        "scale": tuple(scale),
        "opacity": 0.6,
        "visible": False,
        "metadata": meta,
    }
    return [(classes, mask_kwargs, "labels"), (instances, inst_kwargs, "labels")]
