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

import logging
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from mitoseg.data.profile import PROFILE_FILE, ReferenceProfile
from mitoseg.inference.plan import InferencePlan
from mitoseg.serving.drift import (
    QUANTILES,
    SCORE_FEATURES,
    DriftWindow,
    SliceStats,
    drift_score,
    slice_stats,
    strided_stats,
    uncertain_fraction,
    view_stride,
)
from mitoseg.serving.review import ReviewWriter
from mitoseg.serving.settings import settings_from

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
    settings, source = settings_from(
        MonitorSettings, arguments, environ, "monitor_", MONITOR_ENV_PREFIX
    )
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
                s = view_stride(stack.shape, self.settings.max_side)
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
            self._record(strided_stats(stack, classes, self.plan, stride))
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
        score = drift_score(scores)
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
            "score": drift_score(scores),
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
