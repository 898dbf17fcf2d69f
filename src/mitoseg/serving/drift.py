"""Per-slice statistics of served requests and the drift window against the training data.

Pure numpy/scipy over arrays, no server state: :class:`~mitoseg.serving.monitoring.Monitor`
feeds :class:`DriftWindow` with :func:`slice_stats` of each request on its background
thread. What the score can and cannot detect: docs/MONITORING.md.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from mitoseg.data.profile import FEATURES, ReferenceProfile
from mitoseg.inference.normalize import dtype_range
from mitoseg.inference.plan import InferencePlan

__all__ = [
    "QUANTILES",
    "SCORE_FEATURES",
    "DriftWindow",
    "SliceStats",
    "slice_stats",
    "uncertain_fraction",
]

#: Features whose largest KS statistic is the drift score (the input's intensities; the
#: predicted foreground fraction has its own gauge and range alert).
SCORE_FEATURES = ("intensity_mean", "intensity_std")
#: Intensity percentiles exported per slice.
QUANTILES = (1.0, 50.0, 99.0)


def view_stride(shape: tuple[int, ...], max_side: int) -> int:
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
    s = view_stride(stack.shape, max_side)
    return strided_stats(stack[:, ::s, ::s], classes[:, ::s, ::s], plan, s)


def strided_stats(
    stack: np.ndarray, classes: np.ndarray, plan: InferencePlan, s: int
) -> SliceStats:
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
    s = view_stride(mask.shape, max_side)
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


def drift_score(scores: Mapping[str, float]) -> float | None:
    """The drift score: the largest KS statistic of :data:`SCORE_FEATURES`, or None."""
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
        return drift_score(self.scores())

    def window_mean(self) -> dict[str, float]:
        """Feature -> mean over the window (empty when the window is empty)."""
        with self._lock:
            rows = np.array(self._rows)
        if not len(rows):
            return {}
        return {name: float(v) for name, v in zip(FEATURES, rows.mean(axis=0), strict=True)}


# ----------------------------------------------------------------- review samples
