"""Keras callbacks of the training loop (small pieces composed with Keras' own).

:func:`mitoseg.train.train_model` composes, in this order, :class:`BudgetCosineDecay`
(only with a wall-clock budget), :class:`EpochSeeds`, :class:`LearningRateLogger`,
:class:`TimeBudget`, :class:`HistoryCSVLogger`, ``keras.callbacks.ModelCheckpoint``,
:class:`ResumableEarlyStopping`, :class:`ResumableReduceLROnPlateau` (``plateau``
schedule), ``keras.callbacks.BackupAndRestore`` and then the caller's callbacks, such as
:class:`MlflowEpochLogger`.

Resuming. ``BackupAndRestore`` restores the weights, the optimizer (learning rate and step
count) and the epoch, but not the state of other callbacks. The ``Resumable*`` classes
replay the epoch logs of the interrupted run through Keras' own ``on_epoch_end`` (against a
stand-in model) so that patience counters and best values continue exactly where they
stopped; :class:`TimeBudget` persists the elapsed seconds beside the backup;
:class:`EpochSeeds` makes dropout's random numbers depend on the epoch only. With op
determinism a resumed run ends with the same weights as an uninterrupted one.

Importing this module imports keras (and tensorflow): import it only from training code.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import keras
import numpy as np

from mitoseg.io import write_json

__all__ = [
    "BudgetCosineDecay",
    "EpochSeeds",
    "HistoryCSVLogger",
    "LearningRateLogger",
    "MlflowEpochLogger",
    "PreciseBatchNorm",
    "ResumableEarlyStopping",
    "ResumableReduceLROnPlateau",
    "TimeBudget",
    "read_elapsed",
]

_METRIC_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")


def _to_float(value: Any) -> float | None:
    """A finite-or-not Python float from a scalar log value; None for anything else."""
    if isinstance(value, (bool, str)) or value is None:
        return None
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError):
        return None
    if arr.size != 1 or not np.issubdtype(arr.dtype, np.number):
        return None
    return float(arr.reshape(()))


def _optimizer_lr(model: Any) -> float | None:
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        return None
    try:
        return _to_float(keras.ops.convert_to_numpy(optimizer.learning_rate))
    except (AttributeError, TypeError, ValueError):
        return None


# ------------------------------------------------------------------ learning rate


class LearningRateLogger(keras.callbacks.Callback):
    """Adds ``lr`` to the epoch logs: the learning rate of the epoch's first step.

    It reads the optimizer at ``on_epoch_begin`` (after any callback placed before it has
    set the rate, and with a ``LearningRateSchedule`` the value at that step) and writes
    it at ``on_epoch_end``, so callbacks placed after it (CSV, MLflow) see ``lr``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._lr: float | None = None

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._lr = _optimizer_lr(self.model)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if logs is not None and self._lr is not None:
            logs["lr"] = self._lr


class BudgetCosineDecay(keras.callbacks.Callback):
    """Cosine decay that also ends on time: for training under a wall-clock budget.

    Before every step the rate is ``lr_min + (lr0 - lr_min) * (1 + cos(pi * p)) / 2`` with
    progress ``p = min(1, max(step / total_steps, elapsed / max_seconds))``: the larger of
    the step fraction and the fraction of the budget used, so the schedule reaches
    ``lr_min`` when the budget ends however fast the machine is. Without a budget use
    ``keras.optimizers.schedules.CosineDecay`` (the same curve over steps only); this one
    is not reproducible across machines.

    Args:
        lr0: initial learning rate.
        lr_min: final learning rate (``<= lr0``).
        total_steps: steps of the whole run (``epochs * steps_per_epoch``).
        max_seconds: the wall-clock budget.
        timer: the :class:`TimeBudget` measuring elapsed seconds (resumed runs included).
        warmup_fraction: share of the progress ``p`` spent on a linear warm-up from
            ``lr_min`` to ``lr0``; the cosine then runs over the rest.

    Raises:
        ValueError: ``total_steps < 1``, ``max_seconds <= 0`` or ``lr_min > lr0``.
    """

    def __init__(
        self,
        lr0: float,
        lr_min: float,
        total_steps: int,
        max_seconds: float,
        timer: TimeBudget,
        warmup_fraction: float = 0.0,
    ) -> None:
        super().__init__()
        if total_steps < 1:
            raise ValueError(f"BudgetCosineDecay: total_steps must be >= 1, got {total_steps}")
        if not max_seconds > 0:
            raise ValueError(f"BudgetCosineDecay: max_seconds must be > 0, got {max_seconds}")
        if lr_min > lr0:
            raise ValueError(f"BudgetCosineDecay: lr_min ({lr_min}) exceeds lr0 ({lr0})")
        self.lr0, self.lr_min = float(lr0), float(lr_min)
        self.total_steps, self.max_seconds = int(total_steps), float(max_seconds)
        self.timer = timer
        if not 0 <= warmup_fraction < 1:
            raise ValueError(
                f"BudgetCosineDecay: warmup_fraction must be in [0, 1), got {warmup_fraction}"
            )
        self.warmup = float(warmup_fraction)

    def learning_rate(self, step: int, elapsed: float) -> float:
        """The rate before step ``step`` (0-based) after ``elapsed`` seconds."""
        progress = min(1.0, max(step / self.total_steps, elapsed / self.max_seconds))
        if progress < self.warmup:  # linear warm-up from lr_min, as CosineDecay's
            return self.lr_min + (self.lr0 - self.lr_min) * progress / self.warmup
        progress = (progress - self.warmup) / (1.0 - self.warmup)
        return self.lr_min + 0.5 * (self.lr0 - self.lr_min) * (1.0 + math.cos(math.pi * progress))

    def _update(self) -> None:
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        self.model.optimizer.learning_rate = self.learning_rate(step, self.timer.elapsed)

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._update()

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if batch:  # batch 0 was set at on_epoch_begin
            self._update()


# -------------------------------------------------------------------- batch norm


def batch_norm_layers(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    """The model's ``BatchNormalization`` layers, in graph order."""
    return [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]


class PreciseBatchNorm(keras.callbacks.Callback):
    """Re-estimate BatchNorm statistics from training batches ("precise BN").

    BatchNorm keeps moving averages of its batch statistics (momentum 0.99: about the last
    100 batches) for inference. While the weights move fast at the peak learning rate those
    averages describe weights of many steps ago, so a validation in the middle of training
    measures the lag as much as the model: the patch validation IoU jumped by up to 0.3
    between epochs, and the checkpoint picked by it was a draw. Following Wu & Johnson
    (2021), *Rethinking "Batch" in BatchNorm*, this callback replaces each layer's moving
    mean and variance by the average batch mean and variance of its inputs over training
    batches, computed with the current weights and dropout off:

    * before every validation (``on_test_begin``) from the first ``n_batches`` batches of
      the epoch that just ran (all of them when it has fewer);
    * when training ends (after Keras swaps in the weight average of ``use_ema``) from the
      first ``final_batches`` batches of the last epoch: the statistics that are saved.

    The batches come from the training stream itself (``draw``), so the statistics keep the
    distribution the network was trained to normalise with; statistics of other images
    (whole unbiased patches instead of the recipe's centred crops) shifted the output
    towards foreground (benchmarks/results/stability.json, recipe ``unbiased_bn``). Training
    is unchanged: in training mode BatchNorm normalises with the statistics of the batch,
    and the moving averages are only read at inference.

    Args:
        draw: ``draw(epoch, b)`` -> batch ``b`` of training epoch ``epoch`` (0-based),
            ``(B, H, W, C) float32``, the network's input.
        n_batches: batches per validation (``>= 1``).
        final_batches: batches at the end (``>= 1``): the epoch's steps.

    Raises:
        ValueError: ``n_batches < 1`` or ``final_batches < 1``.
    """

    def __init__(
        self, draw: Callable[[int, int], np.ndarray], n_batches: int, final_batches: int
    ) -> None:
        super().__init__()
        if n_batches < 1 or final_batches < 1:
            raise ValueError(
                f"PreciseBatchNorm: n_batches and final_batches must be >= 1, got {n_batches}, "
                f"{final_batches}"
            )
        self.draw = draw
        self.n_batches = int(n_batches)
        self.final_batches = int(final_batches)
        self._epoch = 0
        self._fn: Any = None
        self._layers: list[keras.layers.BatchNormalization] = []
        #: validations that used re-estimated statistics (for tests and logs)
        self.calls = 0

    def _stats_fn(self) -> Any:
        import tensorflow as tf

        self._layers = batch_norm_layers(self.model)
        features = keras.Model(self.model.inputs, [bn.input for bn in self._layers])

        @tf.function(reduce_retracing=True)
        def stats(x: Any) -> Any:
            outs = features(x, training=True)
            outs = outs if isinstance(outs, (list, tuple)) else [outs]
            return [tf.nn.moments(o, axes=[0, 1, 2]) for o in outs]

        return stats

    def estimate(self, batches: Iterable[np.ndarray]) -> None:
        """Set every BatchNorm layer's moving statistics from ``batches``
        (``(B, H, W, C) float32`` each; their average batch moments)."""
        dropouts = [la for la in self.model.layers if isinstance(la, keras.layers.Dropout)]
        rates = [la.rate for la in dropouts]
        try:
            for la in dropouts:  # traced with dropout off; reset on every call anyway
                la.rate = 0.0
            if self._fn is None:
                self._fn = self._stats_fn()
            if not self._layers:
                return
            sums = [[0.0, 0.0] for _ in self._layers]
            count = 0
            for x in batches:
                for acc, (mean, var) in zip(sums, self._fn(x), strict=True):
                    acc[0] = acc[0] + mean.numpy()
                    acc[1] = acc[1] + var.numpy()
                count += 1
            if count == 0:
                return
            for layer, (mean, var) in zip(self._layers, sums, strict=True):
                layer.moving_mean.assign(mean / count)
                layer.moving_variance.assign(var / count)
        finally:
            for la, rate in zip(dropouts, rates, strict=True):
                la.rate = rate

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch = epoch

    def on_test_begin(self, logs: dict[str, Any] | None = None) -> None:
        # never past the epoch's own batches (``final_batches`` = its steps): a later
        # epoch's crops may not exist yet (mined hard negatives wait for their epoch)
        n = min(self.n_batches, self.final_batches)
        self.estimate(self.draw(self._epoch, b) for b in range(n))
        self.calls += 1

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self.estimate(self.draw(self._epoch, b) for b in range(self.final_batches))


# -------------------------------------------------------------------------- seeds


class EpochSeeds(keras.callbacks.Callback):
    """Re-seeds the model's random layers (dropout) at every epoch from the epoch number.

    Every ``keras.random.SeedGenerator`` state of the model is ``[s, counter]``: ``s`` is
    fixed when the layer is built (from ``keras.utils.set_random_seed``), the counter
    advances with every draw and is not part of the saved weights. Setting the counter to
    ``epoch * 2**20`` at the start of each epoch makes the random numbers of an epoch a
    function of the seed and the epoch only, so a resumed run draws what an uninterrupted
    run would have drawn.
    """

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        for var in self.model.variables:
            if var.name == "seed_generator_state":
                state = np.asarray(keras.ops.convert_to_numpy(var))
                dtype = state.dtype
                counter = (int(epoch) << 20) % int(np.iinfo(dtype).max)
                var.assign(np.array([state[0], counter], dtype=dtype))


# --------------------------------------------------------------------------- time


def read_elapsed(path: Path) -> float:
    """Seconds saved by :class:`TimeBudget` in ``path``; 0.0 when missing or unreadable."""
    try:
        return float(json.loads(Path(path).read_text())["elapsed"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0


class TimeBudget(keras.callbacks.Callback):
    """Wall-clock accounting and optional budget; resumable.

    Measures the seconds of ``fit`` (``prior_seconds`` of the interrupted parts plus this
    session) and, per epoch, the training phase alone (up to the start of validation).
    After every epoch it saves ``{"epoch", "elapsed"}`` to ``state_path`` and, when
    ``max_seconds`` is set and used up, stops training (``stopped`` becomes True).

    Args:
        max_seconds: budget in seconds, or None to only measure.
        prior_seconds: seconds spent before this session (see :func:`read_elapsed`).
        state_path: JSON file updated after every epoch, or None.
    """

    def __init__(
        self,
        max_seconds: float | None = None,
        prior_seconds: float = 0.0,
        state_path: Path | None = None,
    ) -> None:
        super().__init__()
        self.max_seconds = max_seconds
        self.prior_seconds = float(prior_seconds)
        self.state_path = state_path
        self.stopped = False
        #: Training-phase seconds of each epoch run in this session.
        self.epoch_train_seconds: list[float] = []
        self._t0: float | None = None
        self._epoch_t0 = 0.0
        self._train_phase: float | None = None

    @property
    def elapsed(self) -> float:
        """Seconds of training so far, interrupted parts included."""
        if self._t0 is None:
            return self.prior_seconds
        return self.prior_seconds + (time.perf_counter() - self._t0)

    @property
    def exhausted(self) -> bool:
        """True when a budget is set and used up."""
        return self.max_seconds is not None and self.elapsed >= self.max_seconds

    def crops_per_second(self, samples_per_epoch: int) -> float:
        """Training crops per second, without the first epoch of this session (it includes
        tracing and compilation) when more than one epoch ran; 0 when none did."""
        timed = self.epoch_train_seconds
        if len(timed) > 1:
            timed = timed[1:]
        seconds = sum(timed)
        return len(timed) * samples_per_epoch / seconds if seconds > 0 else 0.0

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._t0 = time.perf_counter()

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch_t0 = time.perf_counter()
        self._train_phase = None

    def on_test_begin(self, logs: dict[str, Any] | None = None) -> None:
        if self._train_phase is None:
            self._train_phase = time.perf_counter() - self._epoch_t0

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        phase = self._train_phase
        self.epoch_train_seconds.append(
            time.perf_counter() - self._epoch_t0 if phase is None else phase
        )
        if self.state_path is not None:
            write_json(self.state_path, {"epoch": epoch + 1, "elapsed": self.elapsed})
        if self.exhausted:
            self.stopped = True
            self.model.stop_training = True

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self.prior_seconds = self.elapsed
        self._t0 = None


# ------------------------------------------------------------------------ history


class HistoryCSVLogger(keras.callbacks.CSVLogger):
    """``keras.callbacks.CSVLogger`` with fixed columns and 1-based epochs, appending.

    Every row has exactly ``columns`` (the first must be ``epoch``); a value missing from
    the logs (e.g. ``val_loss`` without validation data) is written as an empty field.
    The file is appended to, so a resumed run continues the interrupted run's rows (the
    caller removes rows past the restored epoch first).

    Args:
        filename: the CSV file.
        columns: header, ``("epoch", ...)``.

    Raises:
        ValueError: ``columns`` does not start with ``epoch``.
    """

    def __init__(self, filename: str | Path, columns: Sequence[str]) -> None:
        if not columns or columns[0] != "epoch":
            raise ValueError(f"HistoryCSVLogger: columns must start with 'epoch', got {columns}")
        super().__init__(str(filename), append=True)
        self.columns = tuple(columns)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = logs or {}
        self.keys = list(self.columns[1:])
        row = {k: ("" if (v := _to_float(logs.get(k))) is None else v) for k in self.keys}
        super().on_epoch_end(epoch + 1, row)


# ------------------------------------------------------------- resumable stoppers


def _replay(
    callback: keras.callbacks.Callback,
    base: type,
    history: Sequence[Mapping[str, Any]],
    learning_rate: float,
) -> bool:
    """Run ``history`` (one logs dict per epoch) through ``base``'s own hooks.

    A stand-in model takes the side effects (``stop_training``, learning rate changes).

    Returns:
        True when the replayed epochs would have stopped training.
    """
    stub = SimpleNamespace(
        stop_training=False, optimizer=SimpleNamespace(learning_rate=float(learning_rate))
    )
    callback.set_model(stub)
    base.on_train_begin(callback)
    with warnings.catch_warnings():  # epochs without the monitored value warn, as live
        warnings.simplefilter("ignore")
        for epoch, row in enumerate(history):
            logs = {k: v for k, v in row.items() if k != "epoch" and _to_float(v) is not None}
            base.on_epoch_end(callback, epoch, logs)
    return bool(stub.stop_training)


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """``keras.callbacks.EarlyStopping`` that can continue an interrupted run.

    Takes the arguments of ``EarlyStopping``. Call :meth:`restore` with the interrupted
    run's epoch logs before ``fit``: ``on_train_begin`` then starts from the patience
    counter and best value those epochs leave behind instead of from scratch.
    """

    _STATE = ("wait", "stopped_epoch", "best", "best_epoch")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._restored: dict[str, Any] | None = None

    def restore(self, history: Sequence[Mapping[str, Any]]) -> bool:
        """Replay ``history`` (epoch logs, oldest first).

        Returns:
            True when those epochs already triggered early stopping.
        """
        stopped = _replay(self, keras.callbacks.EarlyStopping, history, 0.0)
        self._restored = {k: getattr(self, k) for k in self._STATE}
        return stopped

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        super().on_train_begin(logs)
        if self._restored is not None:
            for key, value in self._restored.items():
                setattr(self, key, value)


class ResumableReduceLROnPlateau(keras.callbacks.ReduceLROnPlateau):
    """``keras.callbacks.ReduceLROnPlateau`` that can continue an interrupted run.

    Like :class:`ResumableEarlyStopping`: :meth:`restore` replays the interrupted epochs so
    the patience, cooldown and best value continue. The learning rate itself comes back
    with the optimizer (``BackupAndRestore``).
    """

    _STATE = ("wait", "best", "cooldown_counter")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._restored: dict[str, Any] | None = None

    def restore(self, history: Sequence[Mapping[str, Any]], learning_rate: float) -> None:
        """Replay ``history`` (epoch logs, oldest first) from ``learning_rate``."""
        _replay(self, keras.callbacks.ReduceLROnPlateau, history, learning_rate)
        self._restored = {k: getattr(self, k) for k in self._STATE}

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        super().on_train_begin(logs)
        if self._restored is not None:
            for key, value in self._restored.items():
                setattr(self, key, value)


# -------------------------------------------------------------------------- MLflow


class MlflowEpochLogger(keras.callbacks.Callback):
    """Logs every epoch's logs to an MLflow run with ``step=epoch`` (0-based).

    Logs every numeric entry of Keras' epoch ``logs`` (``loss``, ``val_loss``, ``accuracy``,
    ``iou``, ``val_iou``, ...) and ``lr`` (the ``lr`` entry when present, else Keras'
    ``learning_rate`` entry, else the optimizer's current rate).

    Resuming: :func:`mitoseg.train.train_model` calls :meth:`set_backup` before training
    with the id of the run's backup and the epochs restored from it. The run is tagged
    ``resume_key=<backup id>``; any other run still ``RUNNING`` with the same tag belongs to
    a process that died (training the same backup directory twice at once is not
    supported), so it is ended as ``KILLED`` and tagged ``superseded_by=<this run>``, and
    this run is tagged ``supersedes=<ids>``. The restored epochs are logged into this run,
    so it holds the full history.

    Args:
        run_id: run to log into; the active run when None (bound at the first use).
    """

    def __init__(self, run_id: str | None = None) -> None:
        super().__init__()
        self.run_id = run_id
        #: Runs ended as KILLED by :meth:`set_backup`.
        self.superseded: list[str] = []

    def _client(self) -> Any:
        from mlflow import MlflowClient

        return MlflowClient()

    def _bind(self) -> str:
        import mlflow

        if self.run_id is None:
            active = mlflow.active_run()
            if active is None:
                raise RuntimeError(
                    "MlflowEpochLogger: no active MLflow run; train inside "
                    "start_training_run(...) or pass run_id"
                )
            self.run_id = active.info.run_id
        return self.run_id

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._bind()

    def epoch_metrics(self, logs: Mapping[str, Any] | None) -> dict[str, float]:
        """Numeric metrics of one epoch, ``lr`` included (keys made MLflow-safe)."""
        values: dict[str, float] = {}
        logs = dict(logs or {})
        if "lr" in logs:
            logs.pop("learning_rate", None)
        for key, value in logs.items():
            number = _to_float(value)
            if number is None or key == "epoch":
                continue
            name = "lr" if key == "learning_rate" else str(key)
            values[_METRIC_KEY_BAD.sub("_", name)] = number
        if "lr" not in values:
            lr = _optimizer_lr(self.model)
            if lr is not None:
                values["lr"] = lr
        return values

    def _log(self, epoch: int, logs: Mapping[str, Any] | None) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [
            Metric(key, value, stamp, int(epoch)) for key, value in self.epoch_metrics(logs).items()
        ]
        if metrics:
            self._client().log_batch(self._bind(), metrics=metrics)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._log(epoch, logs)

    def set_backup(self, backup_id: str, history: Sequence[Mapping[str, Any]]) -> None:
        """Close runs killed while training this backup; log the restored epochs.

        Args:
            backup_id: identifies the backup directory (see ``mitoseg.train.backup_id``).
            history: restored epochs, oldest first: dicts with a 1-based ``epoch`` and the
                epoch's metrics (``None`` for missing values); empty for a fresh run.
        """
        run_id = self._bind()
        client = self._client()
        run = client.get_run(run_id)
        key = hashlib.sha256(backup_id.encode()).hexdigest()[:16]
        client.set_tag(run_id, "resume_key", key)
        client.set_tag(run_id, "backup", backup_id)
        stale = client.search_runs(
            [run.info.experiment_id],
            filter_string=f"tags.resume_key = '{key}' and attributes.status = 'RUNNING'",
        )
        for other in stale:
            other_id = other.info.run_id
            if other_id == run_id:
                continue
            client.set_tag(other_id, "superseded_by", run_id)
            client.set_terminated(other_id, status="KILLED")
            self.superseded.append(other_id)
        if self.superseded:
            client.set_tag(run_id, "supersedes", ",".join(self.superseded))
        for row in history:
            self._log(int(row["epoch"]) - 1, row)
