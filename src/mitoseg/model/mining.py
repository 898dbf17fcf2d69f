"""Hard negatives mined from the model's own confident false positives (issue 19).

The ``dark`` rule of :class:`mitoseg.train_data.CropSampler` centres hard-negative crops on
background darker than the median mitochondrion: a guess at what a model confuses. With
``train.hard_negative_source: mined`` the guess is replaced by what the model being
trained actually gets wrong: every ``mine_every`` epochs :class:`HardNegativeMiner` runs
the network on all training patches and keeps the labelled background pixels it calls
foreground with probability above ``threshold`` (whole dark processes, glia, the rim
outside a mitochondrion's membrane); hard-negative crops are then centred on one of those
pixels, drawn uniformly over all patches.

Determinism: the crops of epoch ``e`` read the candidates mined at the end of the latest
scheduled epoch ``<= e - lag``, so ``tf.data``'s prefetching (which may start epoch ``e``
before epoch ``e - 1`` ends) never races the miner: a crop is a pure
function of its element index and the mined candidates, the same on every run with the
same seed. The candidates are saved next to the run's backup, so a resumed run sees the
same crops.

A crop whose candidates are not mined yet waits for them inside ``tf.data``. That is safe
only while the stream computes less than ``(lag - 1)`` epochs ahead of the fit loop:
otherwise waiting crops can hold every worker thread while the loop still needs the
crops of the epoch whose end would mine them (a deadlock; it hung the 4-crop epochs of
the unit tests). So the stream is bounded (:func:`mitoseg.train_data.stream_lookahead`)
and :func:`mitoseg.train_data.mined_lag` makes the lag long enough for it: 2 for any real
epoch.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import keras
import numpy as np

from mitoseg.io import atomic_path

__all__ = ["HardNegativeMiner", "MinedNegatives", "false_positive_candidates"]


def false_positive_candidates(
    foreground: np.ndarray, masks: np.ndarray, threshold: float
) -> np.ndarray:
    """Flat indices of the confident false positives of a set of patches.

    Args:
        foreground: ``(N, P, P) float32`` probability of "not background" per pixel.
        masks: ``(N, P, P) uint8`` class indices (unlabelled pixels are never class 0).
        threshold: a pixel counts when its probability is above this, in ``(0, 1)``.

    Returns:
        ``(K,) int64`` indices into the flattened ``(N, P, P)`` array of the labelled
        background pixels (class 0) whose probability exceeds ``threshold``, ascending.

    Raises:
        ValueError: shapes differ, or ``threshold`` outside ``(0, 1)``.
    """
    if foreground.shape != masks.shape or foreground.ndim != 3:
        raise ValueError(
            f"false_positive_candidates: foreground {foreground.shape} and masks "
            f"{masks.shape} must be the same (N, P, P)"
        )
    if not 0 < threshold < 1:
        raise ValueError(f"false_positive_candidates: threshold must be in (0, 1), got {threshold}")
    hit = (masks == 0) & (foreground > threshold)
    return np.flatnonzero(hit).astype(np.int64)


class MinedNegatives:
    """Thread-safe store of mined candidates, by the epoch that mined them.

    Args:
        every: mining runs at the end of epochs ``every - 1, 2 * every - 1, ...``
            (0-based), ``>= 1``.
        lag: epoch ``e`` reads the candidates of the latest mining epoch ``<= e - lag``
            (``>= 1``; 2 keeps prefetching deterministic, see the module doc).
        timeout_s: how long a crop waits for candidates that are due.

    Raises:
        ValueError: ``every < 1``, ``lag < 1`` or ``timeout_s <= 0``.
    """

    def __init__(self, every: int, lag: int = 2, timeout_s: float = 900.0) -> None:
        if every < 1 or lag < 1 or timeout_s <= 0:
            raise ValueError(
                f"MinedNegatives: need every >= 1, lag >= 1, timeout_s > 0; got every={every}, "
                f"lag={lag}, timeout_s={timeout_s}"
            )
        self.every, self.lag, self.timeout_s = int(every), int(lag), float(timeout_s)
        self._by_epoch: dict[int, np.ndarray] = {}
        self._closed = False
        self._cond = threading.Condition()

    def scheduled(self, epoch: int) -> bool:
        """Whether mining runs at the end of 0-based ``epoch``."""
        return (epoch + 1) % self.every == 0

    def source_epoch(self, epoch: int) -> int | None:
        """The mining epoch whose candidates epoch ``epoch``'s crops read (None: none yet)."""
        last = epoch - self.lag
        if last < self.every - 1:
            return None
        return last - (last + 1) % self.every

    def put(self, epoch: int, candidates: np.ndarray) -> None:
        """Store the candidates mined at the end of ``epoch`` and wake waiting crops."""
        with self._cond:
            self._by_epoch[int(epoch)] = np.asarray(candidates, dtype=np.int64)
            self._cond.notify_all()

    def close(self) -> None:
        """Training ended: crops still waiting for candidates (prefetched past the last
        epoch, never trained on) get ``None`` instead of waiting."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def for_epoch(self, epoch: int) -> np.ndarray | None:
        """The candidates epoch ``epoch`` reads, waiting until they are mined; ``None``
        before the first mining is due, or when due and the store is closed.

        Raises:
            TimeoutError: they were due and did not come within ``timeout_s``.
        """
        source = self.source_epoch(epoch)
        if source is None:
            return None
        with self._cond:
            ready = lambda: source in self._by_epoch or self._closed  # noqa: E731
            if not self._cond.wait_for(ready, self.timeout_s):
                raise TimeoutError(
                    f"hard-negative mining: the candidates of epoch {source + 1} (needed by "
                    f"epoch {epoch + 1}) did not come within {self.timeout_s:.0f} s"
                )
            return self._by_epoch.get(source)

    def save(self, path: Path) -> None:
        """Write every mining epoch's candidates to ``path`` (``.npz``, atomically)."""
        with self._cond:
            arrays = {f"e{e}": c for e, c in sorted(self._by_epoch.items())}
        with atomic_path(Path(path), suffix=".npz") as tmp:
            np.savez(tmp, **arrays)

    @classmethod
    def resumed(cls, every: int, path: Path, lag: int = 2) -> MinedNegatives:
        """A store holding what :meth:`save` wrote to ``path`` (a resumed run); empty
        when there is no such file (a fresh run)."""
        store = cls(every, lag)
        if Path(path).is_file():
            with np.load(path) as data:
                for name in data.files:
                    store.put(int(name[1:]), data[name])
        return store


class HardNegativeMiner(keras.callbacks.Callback):
    """Mine confident false positives on the training patches every ``store.every`` epochs.

    Runs at ``on_epoch_end`` after validation, so BatchNorm uses the statistics that
    :class:`mitoseg.model.callbacks.PreciseBatchNorm` re-estimated for this epoch's weights.

    Args:
        images: ``(N, P, P)`` or ``(N, P, P, C)`` uint8 training patches.
        masks: ``(N, P, P)`` uint8 class indices.
        store: where the candidates go (read by the crop sampler).
        threshold: probability above which a background pixel is a false positive.
        path: ``.npz`` the candidates are saved to after each mining (resume).
        batch_size: patches per forward pass.
    """

    def __init__(
        self,
        images: np.ndarray,
        masks: np.ndarray,
        store: MinedNegatives,
        threshold: float,
        path: Path,
        batch_size: int = 8,
    ) -> None:
        super().__init__()
        self.images, self.masks, self.store = images, masks, store
        self.threshold, self.path, self.batch_size = float(threshold), Path(path), batch_size
        #: candidates found per mining epoch (logs and tests)
        self.counts: dict[int, int] = {}

    def foreground(self) -> np.ndarray:
        """``(N, P, P) float32``: the model's probability of "not background" per pixel."""
        out = []
        for i in range(0, len(self.images), self.batch_size):
            x = self.images[i : i + self.batch_size].astype(np.float32) / np.float32(255.0)
            if x.ndim == 3:
                x = x[..., None]
            y = keras.ops.convert_to_numpy(self.model(x, training=False))
            out.append(y[..., 0] if y.shape[-1] == 1 else 1.0 - y[..., 0])
        return np.concatenate(out).astype(np.float32)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if not self.store.scheduled(epoch):
            return
        cands = false_positive_candidates(self.foreground(), self.masks, self.threshold)
        self.counts[epoch] = int(cands.size)
        self.store.put(epoch, cands)
        self.store.save(self.path)
