"""Production monitoring of the segmentation service: domain metrics, drift, review samples.

What the service exports on ``/metrics`` (Prometheus text, through BentoML's metrics
set-up: BentoML points ``PROMETHEUS_MULTIPROC_DIR`` at one directory for all its
processes and its ``/metrics`` merges them; ``bentoml.metrics`` is a deprecated alias of
``prometheus_client`` in BentoML 1.4.39, so this module imports ``prometheus_client``
itself, inside the functions, after BentoML has set the directory). Every series has the
labels ``model`` and ``version`` (the registry name and version, else the BentoML tag):

* ``mitoseg_model_info{engine, threshold}`` 1: the plan the model runs with;
* ``mitoseg_slices_total``, ``mitoseg_blank_slices_total``: slices segmented and those
  blank by the plan's normalisation rule (segmented as background without the network);
* ``mitoseg_input_intensity{quantile}``: histograms of the 1st, 50th and 99th intensity
  percentile of each slice, as a fraction of its dtype's range;
* ``mitoseg_foreground_fraction`` and ``mitoseg_objects``: histograms of the predicted
  non-background fraction and of the object count of each non-blank slice;
* ``mitoseg_uncertain_fraction`` (from the runner process): histogram of the fraction of
  each slice's predicted foreground pixels whose probability lies within
  ``confidence_margin`` of the threshold (multiclass: top-two margin below twice it);
* drift gauges against the model's reference profile
  (:class:`mitoseg.data.profile.ReferenceProfile`): ``mitoseg_drift_ks{feature}`` the
  two-sample Kolmogorov-Smirnov statistic (``scipy.stats.ks_2samp``) between the last
  ``window`` non-blank slices and the training slices, ``mitoseg_drift_score`` the
  largest of the intensity features' (:data:`SCORE_FEATURES`; the foreground fraction
  varies legitimately across a volume and differs by the model's bias from the ground
  truth the profile holds, so it is watched by its range instead),
  ``mitoseg_drift_window_slices``, ``mitoseg_window_foreground_fraction`` (the
  window's mean) and ``mitoseg_reference_foreground_fraction{bound="low"|"high"}`` (the
  training range), ``mitoseg_reference_loaded`` (0: the model has no profile).

Every statistic is computed on a strided view of at most ``max_side`` pixels a side
(vectorised over the slices), so the object count is approximate (objects thinner than
the stride can vanish or merge). A request only copies that view (tens of microseconds);
one background thread computes the statistics and the drift scores and updates the
metrics (``/drift`` waits for it), and another writes the review samples (opt-in).

Settings: Bento arguments ``monitor_<field>`` over ``MITOSEG_MONITOR_<FIELD>``
(:func:`resolve_monitor_settings`).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mitoseg.data.profile import FEATURES, PROFILE_FILE, ReferenceProfile
from mitoseg.inference.normalize import dtype_range
from mitoseg.inference.plan import InferencePlan

__all__ = [
    "MONITOR_ENV_PREFIX",
    "ConfidenceMonitor",
    "DriftWindow",
    "Monitor",
    "MonitorSettings",
    "ReviewWriter",
    "SliceStats",
    "drift_app",
    "model_labels",
    "read_profile",
    "resolve_monitor_settings",
    "slice_stats",
]

logger = logging.getLogger("mitoseg.serving")

#: Environment variables ``MITOSEG_MONITOR_<FIELD>`` set the monitor settings.
MONITOR_ENV_PREFIX = "MITOSEG_MONITOR_"
#: Features whose largest KS statistic is the drift score (the input's intensities; the
#: predicted foreground fraction has its own gauge and range alert).
SCORE_FEATURES = ("intensity_mean", "intensity_std")
#: Intensity percentiles exported per slice.
QUANTILES = (1.0, 50.0, 99.0)
_FRACTION_BUCKETS = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0)
_INTENSITY_BUCKETS = tuple(round(0.05 * i, 2) for i in range(21))
_OBJECT_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
_LABELS = ("model", "version")


class MonitorSettings(BaseModel):
    """Monitoring settings of a service.

    Attributes:
        enabled: export the domain metrics and drift (False: the service runs as without
            this module; ``/drift`` says monitoring is off).
        window: slices in the drift window (the most recent non-blank slices).
        min_window: slices needed before a drift score is reported.
        max_side: longest side of the strided view the statistics are computed on.
        queue: requests waiting for their statistics (computed by one background thread)
            before new ones are left out (counted in ``mitoseg_monitor_dropped_slices``).
        confidence_margin: probability distance from the threshold counted as uncertain.
        review_uri: local folder or ``s3://bucket/prefix`` for review samples (None: off).
        review_fraction: fraction of requests kept for review (0: off).
        review_queue: review samples waiting to be written before new ones are dropped.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    window: int = Field(200, ge=2)
    min_window: int = Field(20, ge=2)
    max_side: int = Field(256, ge=16)
    queue: int = Field(64, ge=1)
    confidence_margin: float = Field(0.1, gt=0, lt=0.5)
    review_uri: str | None = None
    review_fraction: float = Field(0.0, ge=0, le=1)
    review_queue: int = Field(16, ge=1)


def resolve_monitor_settings(
    arguments: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> MonitorSettings:
    """Settings from Bento arguments ``monitor_<field>`` over ``MITOSEG_MONITOR_<FIELD>``
    (empty strings count as unset).

    Raises:
        ValueError: an invalid value (the message names the argument or variable), or
            ``min_window`` above ``window``.
    """
    env = os.environ if environ is None else environ
    args = arguments or {}
    data: dict[str, Any] = {}
    source: dict[str, str] = {}
    for name in MonitorSettings.model_fields:
        var, arg = f"{MONITOR_ENV_PREFIX}{name.upper()}", f"monitor_{name}"
        for key, value in ((var, env.get(var)), (arg, args.get(arg))):
            if value is not None and value != "":
                data[name], source[name] = value, key
    try:
        settings = MonitorSettings.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else ""
        raise ValueError(f"{source.get(field, field)}: {err['msg']}") from None
    if settings.min_window > settings.window:
        raise ValueError(
            f"{source.get('min_window', 'min_window')}: {settings.min_window} is above the "
            f"drift window of {settings.window} slices"
        )
    return settings


def model_labels(tag: str, metadata: Mapping[str, Any]) -> dict[str, str]:
    """``{"model", "version"}`` of a served model: the registry name and version from its
    BentoML metadata, else the BentoML tag's name and version."""
    name, _, bento_version = str(tag).partition(":")
    return {
        "model": str(metadata.get("name") or name),
        "version": str(metadata.get("version") or bento_version or "unknown"),
    }


def read_profile(model_dir: Path) -> ReferenceProfile | None:
    """The reference profile stored in a model directory, or None when it has none.

    Raises:
        mitoseg.io.DataError: a profile that exists but is invalid (named).
    """
    path = Path(model_dir) / PROFILE_FILE
    return ReferenceProfile.read(path) if path.is_file() else None


# ----------------------------------------------------------------- statistics


def _stride(shape: tuple[int, ...], max_side: int) -> int:
    return max(1, math.ceil(max(shape[-2:]) / max_side))


@dataclass(frozen=True)
class SliceStats:
    """Statistics of the slices of one request (strided view), one entry per slice.

    Attributes:
        quantiles: ``(Z, len(QUANTILES))`` float64 intensity percentiles / dtype range.
        mean: ``(Z,)`` mean intensity / dtype range.
        std: ``(Z,)`` intensity standard deviation / dtype range.
        blank: ``(Z,)`` bool, blank by the plan's normalisation rule.
        foreground: ``(Z,)`` predicted non-background fraction.
        objects: ``(Z,)`` int64 connected components of the predicted foreground.
    """

    quantiles: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    blank: np.ndarray
    foreground: np.ndarray
    objects: np.ndarray

    def features(self) -> np.ndarray:
        """``(Z, 3)`` drift features (:data:`mitoseg.data.profile.FEATURES` order)."""
        return np.stack([self.mean, self.std, self.foreground], axis=1)


def slice_stats(
    stack: np.ndarray, classes: np.ndarray, plan: InferencePlan, max_side: int = 256
) -> SliceStats:
    """Statistics of a request's slices, on a strided view (vectorised over slices).

    Args:
        stack: ``(Z, H, W)`` raw intensities (uint8, uint16 or float32), as decoded.
        classes: ``(Z, H, W)`` uint8 predicted class indexes.
        plan: the model's plan (normalisation percentiles and blank rule,
            ``min_object_size``).
        max_side: longest side of the strided view.

    Raises:
        ValueError: ``stack`` and ``classes`` differ in shape or are not 3D.
    """

    if stack.ndim != 3 or stack.shape != classes.shape:
        raise ValueError(
            f"slice_stats: expected (Z, H, W) stack and classes of one shape, got "
            f"{stack.shape} and {classes.shape}"
        )
    s = _stride(stack.shape, max_side)
    return _stats(stack[:, ::s, ::s], classes[:, ::s, ::s], plan, s)


def _stats(stack: np.ndarray, classes: np.ndarray, plan: InferencePlan, s: int) -> SliceStats:
    """:func:`slice_stats` of views already strided by ``s``."""
    from scipy import ndimage

    view = stack.reshape(stack.shape[0], -1).astype(np.float64)
    scale = dtype_range(stack.dtype)
    norm = plan.normalization
    pcts = np.percentile(view, [norm.low_pct, norm.high_pct, *QUANTILES], axis=1).T / scale
    fg = classes != 0
    min_size = plan.min_object_size / (s * s)
    objects = np.zeros(stack.shape[0], dtype=np.int64)
    eight = np.ones((3, 3), dtype=bool)
    for z in range(stack.shape[0]):
        labels, n = ndimage.label(fg[z], structure=eight)
        if n and min_size > 1:
            sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
            n = int((sizes >= min_size).sum())
        objects[z] = n
    return SliceStats(
        quantiles=pcts[:, 2:],
        mean=view.mean(axis=1) / scale,
        std=view.std(axis=1) / scale,
        blank=(pcts[:, 1] - pcts[:, 0]) <= norm.blank_range,
        foreground=fg.reshape(fg.shape[0], -1).mean(axis=1),
        objects=objects,
    )


def uncertain_fraction(
    probs: np.ndarray, mask: np.ndarray, plan: InferencePlan, margin: float, max_side: int = 256
) -> float | None:
    """Fraction of a slice's predicted foreground pixels that are near the decision.

    Args:
        probs: ``(H, W, C)`` float32 probabilities of one slice.
        mask: ``(H, W)`` uint8 classes decided from them.
        plan: the model's plan (its threshold for a sigmoid output).
        margin: binary: ``|p - threshold| < margin``; multiclass: top-two probability
            difference below ``2 * margin``.
        max_side: longest side of the strided view.

    Returns:
        The fraction, or None when no pixel of the view is foreground.
    """
    s = _stride(mask.shape, max_side)
    fg = mask[::s, ::s] != 0
    if not fg.any():
        return None
    p = probs[::s, ::s][fg]
    if p.shape[-1] == 1:
        near = np.abs(p[:, 0] - float(plan.threshold or 0.5)) < margin
    else:
        top2 = np.sort(p, axis=-1)[:, -2:]
        near = (top2[:, 1] - top2[:, 0]) < 2 * margin
    return float(near.mean())


# ----------------------------------------------------------------- drift


def _score(scores: Mapping[str, float]) -> float | None:
    values = [scores[f] for f in SCORE_FEATURES if f in scores]
    return max(values) if values else None


class DriftWindow:
    """The most recent non-blank slices' features against a reference profile.

    Thread-safe. The score of a feature is the two-sample Kolmogorov-Smirnov statistic
    (``scipy.stats.ks_2samp``: the largest distance between the two empirical CDFs, 0 to
    1) between the window and the profile's training slices.

    Args:
        profile: the reference, or None (no scores, ``reference: false``).
        size: slices kept.
        min_size: slices needed before scores are reported.
    """

    def __init__(self, profile: ReferenceProfile | None, size: int, min_size: int) -> None:
        self.profile = profile
        self.min_size = int(min_size)
        self._rows: deque[np.ndarray] = deque(maxlen=int(size))
        self._lock = threading.Lock()

    def add(self, features: np.ndarray) -> None:
        """Append ``(Z, 3)`` feature rows (oldest rows fall out)."""
        with self._lock:
            self._rows.extend(np.asarray(features, dtype=np.float64))

    def __len__(self) -> int:
        with self._lock:
            return len(self._rows)

    def scores(self) -> dict[str, float]:
        """Feature -> KS statistic; empty without a profile or below ``min_size`` slices."""
        from scipy.stats import ks_2samp

        with self._lock:
            rows = np.array(self._rows) if self._rows else np.zeros((0, len(FEATURES)))
        if self.profile is None or len(rows) < self.min_size:
            return {}
        out = {}
        for i, name in enumerate(FEATURES):
            ref = self.profile.values(name)
            if ref.size:
                out[name] = float(ks_2samp(rows[:, i], ref).statistic)
        return out

    def score(self) -> float | None:
        """The drift score: the largest KS statistic of :data:`SCORE_FEATURES`, or None."""
        return _score(self.scores())

    def window_mean(self) -> dict[str, float]:
        """Feature -> mean over the window (empty when the window is empty)."""
        with self._lock:
            rows = np.array(self._rows)
        if not len(rows):
            return {}
        return {name: float(v) for name, v in zip(FEATURES, rows.mean(axis=0), strict=True)}


# ----------------------------------------------------------------- review samples


def _encode_png(mask: np.ndarray) -> bytes:
    from mitoseg.serving.codec import encode_png

    return encode_png(mask)


class ReviewWriter:
    """Keeps a sampled fraction of requests for review: the upload, its mask and a JSON
    record, under ``<uri>/<model>/<version>/<YYYY-MM-DD>/<id>/``.

    Files are written by one background thread (``submit`` never blocks; beyond
    ``queue`` waiting samples new ones are dropped and counted). Local files are written
    to a temporary name and renamed; S3 objects (``s3://``, through s3fs) appear whole.
    ``record.json`` is written last: a sample without it is incomplete.

    Args:
        uri: local folder or ``s3://bucket/prefix``.
        fraction: probability that a request is kept.
        labels: ``{"model", "version"}``.
        queue: most samples waiting to be written.
        seed: random seed of the sampling (None: fresh entropy).
    """

    def __init__(
        self,
        uri: str,
        fraction: float,
        labels: Mapping[str, str],
        queue: int = 16,
        seed: int | None = None,
    ) -> None:
        self.uri = uri.rstrip("/")
        self.fraction = float(fraction)
        self.labels = dict(labels)
        self._rng = np.random.default_rng(seed)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mitoseg-review")
        self._pending = threading.BoundedSemaphore(queue)
        self._lock = threading.Lock()
        self.dropped = 0
        self.written = 0

    def sampled(self) -> bool:
        """Whether the next request is kept (one draw)."""
        with self._lock:
            return bool(self._rng.random() < self.fraction)

    def submit(self, upload: bytes, mask: np.ndarray, record: Mapping[str, Any]) -> bool:
        """Queue one sample; returns False when it was dropped (queue full)."""
        if not self._pending.acquire(blocking=False):
            with self._lock:
                self.dropped += 1
            return False
        self._pool.submit(self._write, upload, np.array(mask), dict(record))
        return True

    def close(self, wait: bool = True) -> None:
        """Stop the writer thread (after the queued samples when ``wait``)."""
        self._pool.shutdown(wait=wait)

    def _write(self, upload: bytes, mask: np.ndarray, record: dict[str, Any]) -> None:
        try:
            day = time.strftime("%Y-%m-%d", time.gmtime())
            sample_id = f"{time.strftime('%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:12]}"
            key = f"{self.labels['model']}/{self.labels['version']}/{day}/{sample_id}"
            record = {**record, **self.labels, "id": sample_id, "time": time.time()}
            files = {
                "upload.bin": upload,
                "mask.png" if mask.ndim == 2 else "mask.tif": _mask_bytes(mask),
                "record.json": json.dumps(record, indent=2).encode(),
            }
            self._put(key, files)
            with self._lock:
                self.written += 1
        except Exception:
            logger.exception("review sample not written to %s", self.uri)
        finally:
            self._pending.release()

    def _put(self, key: str, files: dict[str, bytes]) -> None:
        if self.uri.startswith("s3://"):
            import s3fs

            from mitoseg.volume.store import s3_storage_options

            fs = s3fs.S3FileSystem(**s3_storage_options())
            for name, data in files.items():  # record.json last (dicts keep order)
                fs.pipe_file(f"{self.uri}/{key}/{name}", data)
            return
        from mitoseg.io import atomic_path

        folder = Path(self.uri) / key
        for name, data in files.items():
            with atomic_path(folder / name) as tmp:
                tmp.write_bytes(data)


def _mask_bytes(mask: np.ndarray) -> bytes:
    if mask.ndim == 2:
        return _encode_png(mask)
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, mask, compression="zlib")
    return buf.getvalue()


# ----------------------------------------------------------------- the monitors


def _gauge(name: str, doc: str, labels: tuple[str, ...], registry: Any) -> Any:
    from prometheus_client import Gauge

    kw = {} if registry is None else {"registry": registry}
    return Gauge(name, doc, labels, multiprocess_mode="livemostrecent", **kw)


def _histogram(
    name: str, doc: str, labels: tuple[str, ...], buckets: tuple[float, ...], registry: Any
) -> Any:
    from prometheus_client import Histogram

    kw = {} if registry is None else {"registry": registry}
    return Histogram(name, doc, labels, buckets=buckets, **kw)


class Monitor:
    """Domain metrics, drift and review sampling of the API process.

    Args:
        settings: the monitor settings.
        plan: the model's inference plan.
        labels: ``{"model", "version"}`` (:func:`model_labels`).
        profile: the model's reference profile, or None.
        registry: a ``prometheus_client.CollectorRegistry`` (None: the default one, which
            BentoML's ``/metrics`` reads).
    """

    def __init__(
        self,
        settings: MonitorSettings,
        plan: InferencePlan,
        labels: Mapping[str, str],
        profile: ReferenceProfile | None,
        registry: Any = None,
    ) -> None:
        from prometheus_client import Counter

        self.settings, self.plan, self.labels = settings, plan, dict(labels)
        self.window = DriftWindow(profile, settings.window, settings.min_window)
        self.review = (
            ReviewWriter(
                settings.review_uri, settings.review_fraction, labels, settings.review_queue
            )
            if settings.review_uri and settings.review_fraction > 0
            else None
        )
        if not settings.enabled:
            return
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mitoseg-monitor")
        self._pending = threading.BoundedSemaphore(settings.queue)
        kw = {} if registry is None else {"registry": registry}
        lab = _LABELS
        info = _gauge(
            "mitoseg_model_info",
            "The served model and its plan's engine",
            (*lab, "engine", "threshold"),
            registry,
        )
        info.labels(
            **self.labels, engine=f"{plan.runtime}/{plan.precision}", threshold=str(plan.threshold)
        ).set(1)
        self._slices = Counter("mitoseg_slices", "Slices segmented", lab, **kw)
        self._blank = Counter("mitoseg_blank_slices", "Slices blank by the plan's rule", lab, **kw)
        self._intensity = _histogram(
            "mitoseg_input_intensity",
            "Intensity percentiles of each slice, as a fraction of its dtype's range",
            (*lab, "quantile"),
            _INTENSITY_BUCKETS,
            registry,
        )
        self._fg = _histogram(
            "mitoseg_foreground_fraction",
            "Predicted non-background fraction of each non-blank slice",
            lab,
            _FRACTION_BUCKETS,
            registry,
        )
        self._objects = _histogram(
            "mitoseg_objects",
            "Predicted objects per non-blank slice",
            lab,
            _OBJECT_BUCKETS,
            registry,
        )
        self._drift = _gauge(
            "mitoseg_drift_ks",
            "KS statistic of the drift window against the training slices",
            (*lab, "feature"),
            registry,
        )
        self._score = _gauge("mitoseg_drift_score", "Largest drift KS statistic", lab, registry)
        self._size = _gauge(
            "mitoseg_drift_window_slices", "Slices in the drift window", lab, registry
        )
        self._window_fg = _gauge(
            "mitoseg_window_foreground_fraction",
            "Mean predicted foreground fraction over the drift window",
            lab,
            registry,
        )
        ref = _gauge(
            "mitoseg_reference_loaded", "1 when the model has a reference profile", lab, registry
        )
        ref.labels(**self.labels).set(0 if profile is None else 1)
        if profile is not None and profile.foreground_range is not None:
            bounds = _gauge(
                "mitoseg_reference_foreground_fraction",
                "Range of the training slices' foreground fraction",
                (*lab, "bound"),
                registry,
            )
            for bound, value in zip(("low", "high"), profile.foreground_range, strict=True):
                bounds.labels(**self.labels, bound=bound).set(value)
        self._dropped = Counter(
            "mitoseg_monitor_dropped_slices",
            "Slices left out of the statistics: the monitor's queue was full",
            lab,
            **kw,
        )
        self._reviewed = Counter("mitoseg_review_samples", "Review samples queued", lab, **kw)

    def observe(
        self, stack: np.ndarray, classes: np.ndarray, upload: bytes | None = None, route: str = ""
    ) -> None:
        """Record one request: its metrics, drift window and (sampled) review copy.

        Never raises: a failure is logged (a request must not fail for its metrics).

        Args:
            stack: ``(Z, H, W)`` decoded upload.
            classes: ``(Z, H, W)`` uint8 predicted classes.
            upload: the uploaded bytes (for a review sample).
            route: the endpoint, recorded with a review sample.
        """
        try:
            if self.settings.enabled:
                s = _stride(stack.shape, self.settings.max_side)
                views = (stack[:, ::s, ::s].copy(), classes[:, ::s, ::s].copy())
                if self._pending.acquire(blocking=False):
                    self._worker.submit(self._work, *views, s)
                else:
                    self._dropped.labels(**self.labels).inc(len(stack))
            if self.review is not None and upload is not None and self.review.sampled():
                from mitoseg.inference.predict import mask_to_image

                mask = mask_to_image(classes, self.plan.n_classes)
                queued = self.review.submit(
                    upload,
                    mask[0] if len(mask) == 1 else mask,
                    {"route": route, "shape": list(stack.shape), "dtype": str(stack.dtype)},
                )
                if queued and self.settings.enabled:
                    self._reviewed.labels(**self.labels).inc()
        except Exception:
            logger.exception("monitoring: the request's statistics failed")

    def _work(self, stack: np.ndarray, classes: np.ndarray, stride: int) -> None:
        try:
            self._record(_stats(stack, classes, self.plan, stride))
        except Exception:
            logger.exception("monitoring: the request's statistics failed")
        finally:
            self._pending.release()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until the statistics of every observed request are recorded; returns
        False when ``timeout`` seconds passed first."""
        if not self.settings.enabled:
            return True
        from concurrent.futures import TimeoutError as FutureTimeout

        try:
            self._worker.submit(lambda: None).result(timeout)
        except FutureTimeout:
            return False
        return True

    def _record(self, stats: SliceStats) -> None:
        lab = self.labels
        self._slices.labels(**lab).inc(len(stats.blank))
        self._blank.labels(**lab).inc(int(stats.blank.sum()))
        for qi, q in enumerate(QUANTILES):
            hist = self._intensity.labels(**lab, quantile=f"{q / 100:g}")
            for v in stats.quantiles[:, qi]:
                hist.observe(float(v))
        keep = ~stats.blank
        for fg, n in zip(stats.foreground[keep], stats.objects[keep], strict=True):
            self._fg.labels(**lab).observe(float(fg))
            self._objects.labels(**lab).observe(int(n))
        if keep.any():
            self.window.add(stats.features()[keep])
        self._size.labels(**lab).set(len(self.window))
        means = self.window.window_mean()
        if "foreground_fraction" in means:
            self._window_fg.labels(**lab).set(means["foreground_fraction"])
        scores = self.window.scores()
        for name, value in scores.items():
            self._drift.labels(**lab, feature=name).set(value)
        score = _score(scores)
        if score is not None:
            self._score.labels(**lab).set(score)

    def drift_summary(self) -> dict[str, Any]:
        """The ``/drift`` JSON: model labels, whether a reference exists, window size,
        per-feature KS statistics, their maximum, window means and the reference's
        per-feature median and foreground range."""
        self.flush()
        profile = self.window.profile
        scores = self.window.scores()
        out: dict[str, Any] = {
            **self.labels,
            "monitoring": self.settings.enabled,
            "reference": profile is not None,
            "method": "ks_2samp",
            "window_slices": len(self.window),
            "window_size": self.settings.window,
            "min_window": self.settings.min_window,
            "scores": scores,
            "score": _score(scores),
            "score_features": list(SCORE_FEATURES),
            "window_mean": self.window.window_mean(),
        }
        if profile is None:
            out["message"] = "the model has no reference profile: no drift score"
            return out
        out["reference_slices"] = profile.n_slices
        out["reference_median"] = {
            name: float(np.median(profile.values(name))) for name in profile.features
        }
        fg_range = profile.foreground_range
        out["reference_foreground_range"] = list(fg_range) if fg_range else None
        return out

    def close(self) -> None:
        """Finish the queued statistics and review samples."""
        if self.settings.enabled:
            self._worker.shutdown(wait=True)
        if self.review is not None:
            self.review.close()


class ConfidenceMonitor:
    """The runner's share: segments a stack like :func:`mitoseg.inference.segment_stack`
    and records how much of each slice's predicted foreground is near the decision.

    Args:
        settings: the monitor settings.
        plan: the model's plan.
        labels: ``{"model", "version"}``.
        registry: as :class:`Monitor`.
    """

    def __init__(
        self,
        settings: MonitorSettings,
        plan: InferencePlan,
        labels: Mapping[str, str],
        registry: Any = None,
    ) -> None:
        self.settings, self.plan, self.labels = settings, plan, dict(labels)
        self._hist = (
            _histogram(
                "mitoseg_uncertain_fraction",
                "Fraction of each slice's predicted foreground near the threshold",
                _LABELS,
                _FRACTION_BUCKETS,
                registry,
            )
            if settings.enabled
            else None
        )

    def segment(self, predict: Callable[[np.ndarray], np.ndarray], stack: np.ndarray) -> np.ndarray:
        """``(Z, H, W)`` raw -> ``(Z, H, W)`` uint8 classes by the plan, as
        :func:`mitoseg.inference.segment_stack`, observing each slice's probabilities."""
        from mitoseg.inference.predict import decide_mask, iter_stack_probabilities, segment_stack

        if self._hist is None:
            return segment_stack(predict, stack, self.plan)
        stack = stack if stack.ndim == 3 else stack[None]
        out = np.zeros(stack.shape, dtype=np.uint8)
        for z, p in enumerate(iter_stack_probabilities(predict, stack, self.plan)):
            out[z] = decide_mask(p, self.plan)
            self._observe(p, out[z])
        return out

    def _observe(self, probs: np.ndarray, mask: np.ndarray) -> None:
        try:
            value = uncertain_fraction(
                probs, mask, self.plan, self.settings.confidence_margin, self.settings.max_side
            )
            if value is not None and self._hist is not None:
                self._hist.labels(**self.labels).observe(value)
        except Exception:
            logger.exception("monitoring: the confidence summary failed")


def drift_app(summary: Callable[[], dict[str, Any] | None]) -> Any:
    """A Starlette app answering ``GET`` with ``summary()`` as JSON (mounted at
    ``/drift``); 503 while ``summary()`` is None (the service is not up yet)."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def drift(request: Any) -> Any:
        data = summary()
        if data is None:
            return JSONResponse(
                {"error": "not_ready", "message": "the service is starting", "status": 503},
                status_code=503,
            )
        return JSONResponse(data)

    return Starlette(routes=[Route("/", drift, methods=["GET"])])


def service_monitor(deployment: Any, arguments: Mapping[str, Any]) -> Monitor:
    """The API process's :class:`Monitor` for a
    :class:`~mitoseg.serving.service.Deployment` (its profile read from the model
    directory).

    Raises:
        ValueError: invalid monitor settings.
        mitoseg.io.DataError: an invalid stored profile.
    """
    settings = resolve_monitor_settings(arguments)
    profile = read_profile(deployment.path)
    labels = model_labels(deployment.tag, deployment.metadata)
    if profile is None:
        logger.info("monitoring: %s has no reference profile; no drift score", deployment.tag)
    return Monitor(settings, deployment.plan, labels, profile)


def runner_monitor(deployment: Any, arguments: Mapping[str, Any]) -> ConfidenceMonitor:
    """The runner process's :class:`ConfidenceMonitor` for a deployment."""
    settings = resolve_monitor_settings(arguments)
    return ConfidenceMonitor(
        settings, deployment.plan, model_labels(deployment.tag, deployment.metadata)
    )


def current_drift_summary() -> dict[str, Any] | None:
    """:meth:`Monitor.drift_summary` of this process's running service (BentoML holds the
    instance), or None before it exists."""
    import bentoml

    try:
        service = bentoml.get_current_service()
    except bentoml.exceptions.BentoMLException:
        return None
    monitor = getattr(service, "monitor", None)
    return monitor.drift_summary() if monitor is not None else None
