"""Train the UNet on patch arrays: the fit loop, its callbacks, resume.

The data the network sees (patch arrays, the crop sampler, the tf.data stream: element
``k`` is a pure function of ``(seed, k)``, so a resumed run sees the same crops) is
:mod:`mitoseg.train_data`; the Keras callbacks are :mod:`mitoseg.model.callbacks`; the
compiled network is :mod:`mitoseg.model.compile`. The resume protocol and the fit loop
share the run key and the backup layout, so both are here.

Reproducibility. A run is bounded by ``epochs * steps_per_epoch`` optimizer steps (early
stopping may end it sooner). The seed fixes the initial weights and dropout
(``keras.utils.set_random_seed``) and the data (above; the tf.data pipeline keeps element
order), and ``TrainConfig.deterministic`` turns on TensorFlow's op determinism with one
inter-op thread (:func:`setup_determinism`), so the same inputs give the same model, bit
for bit, on a given software stack. ``TrainConfig.max_train_seconds`` adds a wall-clock
budget for benchmarks: the stopping epoch and the cosine schedule then follow the clock.

Callbacks: Keras' ``ModelCheckpoint``, ``EarlyStopping``, ``CSVLogger``, ``ReduceLROnPlateau``
and ``BackupAndRestore`` with the small ones of :mod:`mitoseg.model.callbacks`; the cosine
schedule is ``CosineDecay`` (``callbacks.BudgetCosineDecay`` under a time budget).

Fault tolerance: ``BackupAndRestore`` backs the model and optimizer up to
``checkpoint_dir/<run key>`` after every epoch, where the run key hashes the resolved
configuration, the patch files and the initial weights of a fine-tuning run. Beside the
backup live the per-epoch history (the CSV logger writes it there, so it survives the
stage's outputs being removed), the best weights, the elapsed seconds and any mined hard
negatives. A killed run with the same key resumes from its last epoch (later rows dropped;
early stopping and LR-on-plateau replay the restored rows), another configuration never
sees that backup, which is deleted after a successful run.

The numpy parts (:func:`run_key`, :func:`weights_digest`, :func:`backup_id`) do not
import tensorflow.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import shutil
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mitoseg.config import AugmentConfig, TrainConfig
from mitoseg.io import DataError, atomic_path
from mitoseg.train_data import (
    CropSampler,
    PatchData,
    check_sizes,
    datasets,
    load_patches,
    mined_lag,
)

if TYPE_CHECKING:
    import keras

__all__ = [
    "HISTORY_COLUMNS",
    "TrainResult",
    "backup_id",
    "initial_weights",
    "op_determinism",
    "run_key",
    "setup_determinism",
    "train_model",
    "weights_digest",
]

log = logging.getLogger(__name__)

#: Columns of ``history.csv`` (DVC plots, MLflow artifact). ``epoch`` is 1-based; ``lr`` is
#: the learning rate of the epoch's first step; ``accuracy`` is the pixel accuracy (binary:
#: probability >= 0.5; multiclass: argmax). Validation columns are empty when there are no
#: val patches.
HISTORY_COLUMNS = (
    "epoch",
    "loss",
    "val_loss",
    "accuracy",
    "val_accuracy",
    "iou",
    "val_iou",
    "dice",
    "val_dice",
    "lr",
)
_HISTORY_FILE = "history.csv"
_BEST_FILE = "best.weights.h5"
_TIME_FILE = "elapsed.json"
_MINED_FILE = "mined.npz"  # hard-negative candidates (mitoseg.model.mining), for resume
_KERAS_META = "training_metadata.json"
_KERAS_WEIGHTS = "latest.weights.h5"


@dataclass
class TrainResult:
    """Outcome of :func:`train_model`.

    Attributes:
        model_path: the best model (lowest monitored loss), ``out_dir/model.keras``.
        history: one dict per epoch with the :data:`HISTORY_COLUMNS` keys (epochs of an
            interrupted run included when resumed); missing values are ``None``.
        best_epoch: 1-based epoch of the saved model.
        epochs_run: number of epochs in ``history``.
        train_seconds: wall-clock seconds of ``fit`` (summed over a resumed run's parts).
        patches_per_second: training throughput (crops per second of the training phase,
            excluding validation and, when more than one epoch ran, the first epoch of
            this process, which includes graph tracing).
        resumed: True when this call continued from a backup of an interrupted run.
        stop_reason: ``completed`` (all epochs), ``early_stopping`` or ``time_budget``.
        run_key: the run's key (:func:`run_key`), the name of its backup directory.
    """

    model_path: Path
    history: list[dict[str, Any]]
    best_epoch: int
    epochs_run: int
    train_seconds: float
    patches_per_second: float
    resumed: bool
    stop_reason: str = field(default="completed")
    run_key: str = field(default="")


def weights_digest(weights: Sequence[np.ndarray]) -> str:
    """Hash of a model's weights (shapes, dtypes and values, in order).

    Args:
        weights: e.g. ``model.get_weights()``.

    Returns:
        16 hex characters.
    """
    h = hashlib.sha256()
    for w in weights:
        arr = np.ascontiguousarray(w)
        h.update(f"{arr.shape}{arr.dtype.str}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()[:16]


def run_key(
    patches_dir: str | Path,
    augment_spec: AugmentConfig,
    cfg: TrainConfig,
    n_classes: int,
    seed: int,
    init_digest: str | None = None,
) -> str:
    """Hash of everything that defines a training run: config, augmentation, seed, data.

    Args:
        patches_dir: the patch directory (its four ``.npy`` files are hashed).
        augment_spec: augmentation strengths.
        cfg: resolved training recipe.
        n_classes: classes including background.
        seed: base seed.
        init_digest: :func:`weights_digest` of the initial weights of a fine-tuning run
            (``cfg.init_from`` names a URI whose target can change, e.g. an alias).

    Returns:
        16 hex characters; the name of the run's backup directory.

    Raises:
        DataError: a patch file is missing.
    """
    h = hashlib.sha256()
    spec: dict[str, Any] = {
        "train": cfg.model_dump(mode="json"),
        "augment": augment_spec.model_dump(mode="json"),
        "n_classes": int(n_classes),
        "seed": int(seed),
    }
    if init_digest is not None:
        spec["init_digest"] = init_digest
    h.update(json.dumps(spec, sort_keys=True).encode())
    for name in ("train_images", "train_masks", "val_images", "val_masks"):
        path = Path(patches_dir) / f"{name}.npy"
        if not path.is_file():
            raise DataError(f"{path}: file not found (run the patchify stage first)")
        h.update(name.encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def backup_id(backup_dir: str | Path) -> str:
    """Identity of one backup directory on one machine: ``<hostname>:<absolute path>``.

    Runs that trained the same backup share it (MLflow uses it to find a killed run).
    """
    return f"{socket.gethostname()}:{Path(backup_dir).resolve()}"


def _fmt(v: Any, nan: str) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return nan if math.isnan(v) else repr(v)
    return str(v)


def _write_history_csv(path: Path, rows: Sequence[dict[str, Any]], nan: str = "") -> None:
    """Write ``rows`` with :data:`HISTORY_COLUMNS`; NaN as ``nan`` (empty for plots)."""
    with atomic_path(path, suffix=".csv") as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(HISTORY_COLUMNS)
        for row in rows:
            writer.writerow([_fmt(row.get(c), nan) for c in HISTORY_COLUMNS])


def _read_history_csv(path: Path) -> list[dict[str, Any]] | None:
    """Rows of a history file written by the CSV logger; None when unreadable."""
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if tuple(reader.fieldnames or ()) != HISTORY_COLUMNS:
                return None
            rows = []
            for raw in reader:
                row: dict[str, Any] = {"epoch": int(raw["epoch"])}
                for col in HISTORY_COLUMNS[1:]:
                    text = raw[col]
                    row[col] = float(text) if text not in ("", None) else None
                rows.append(row)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return rows


@dataclass
class _Resume:
    epoch: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    elapsed: float = 0.0


def _read_resume_state(backup_dir: Path) -> _Resume:
    """Epoch to resume from (0 = fresh), the history up to it and the elapsed seconds.

    A backup without Keras' metadata and weights, or whose history does not cover its
    epoch, is removed (the run starts from scratch). History rows past the backed-up
    epoch (killed between the CSV row and the backup) are dropped from the file.
    """
    from mitoseg.model.callbacks import read_elapsed

    meta = backup_dir / _KERAS_META
    history_path = backup_dir / _HISTORY_FILE
    if not (meta.is_file() and (backup_dir / _KERAS_WEIGHTS).is_file()):
        if backup_dir.exists():
            shutil.rmtree(backup_dir)
        return _Resume()
    try:
        epoch = int(json.loads(meta.read_text())["epoch"])
    except (ValueError, KeyError, TypeError):
        epoch = -1
    rows = _read_history_csv(history_path) if epoch > 0 else None
    if rows is None:
        log.warning("%s: unreadable backup, starting from scratch", backup_dir)
        shutil.rmtree(backup_dir)
        return _Resume()
    rows = [r for r in rows if r["epoch"] <= epoch]
    if [r["epoch"] for r in rows] != list(range(1, epoch + 1)):
        log.warning("%s: backup history incomplete, starting from scratch", backup_dir)
        shutil.rmtree(backup_dir)
        return _Resume()
    _write_history_csv(history_path, rows, nan="nan")  # NaN stays NaN for the replay
    return _Resume(epoch, rows, read_elapsed(backup_dir / _TIME_FILE))


def _best(rows: Sequence[dict[str, Any]], monitor: str) -> tuple[int | None, float | None]:
    """1-based epoch and value of the lowest finite ``monitor`` (first one on ties)."""
    best_epoch, best = None, None
    for row in rows:
        value = row.get(monitor)
        if value is None or not math.isfinite(value):
            continue
        if best is None or value < best:
            best_epoch, best = int(row["epoch"]), float(value)
    return best_epoch, best


def _init_error(uri: str | None, detail: str) -> ValueError:
    return ValueError(f"train.init_from {uri}: {detail}")


def _check_weights(model: keras.Model, weights: Sequence[np.ndarray], uri: str | None) -> None:
    """Raise when ``weights`` do not fit ``model`` (count, then each shape)."""
    ref = model.weights
    if len(weights) != len(ref):
        raise _init_error(
            uri,
            f"architecture differs from train.model: {len(weights)} weight arrays, "
            f"expected {len(ref)}",
        )
    for var, w in zip(ref, weights, strict=True):
        if tuple(w.shape) != tuple(var.shape):
            raise _init_error(
                uri,
                f"architecture differs from train.model: {var.path} has shape "
                f"{tuple(w.shape)}, expected {tuple(var.shape)}",
            )


def initial_weights(source: keras.Model, cfg: TrainConfig, n_classes: int) -> list[np.ndarray]:
    """Check a model to fine-tune from (``cfg.init_from``) and return its weights.

    Args:
        source: the model ``cfg.init_from`` names (``mitoseg.tracking.load_model``).
        cfg: the training recipe; ``cfg.model`` must be the source's architecture.
        n_classes: classes including background of this training.

    Returns:
        ``source.get_weights()``, in the order of ``build_unet(cfg.model, n_classes)``.

    Raises:
        ValueError: ``cfg.init_from`` is not set; the source's output channels differ
            from ``n_classes`` (1 for 2 classes, else ``n_classes``); or its weights do not
            match ``cfg.model`` (messages start ``train.init_from <uri>:``).
    """
    from mitoseg.model.unet import build_unet, output_channels

    uri = cfg.init_from
    if uri is None:
        raise ValueError("initial_weights: cfg.init_from is not set")
    shape = source.output_shape
    channels = shape[-1] if isinstance(shape, tuple) else None
    expected = output_channels(n_classes)
    if channels != expected:
        raise _init_error(
            uri, f"the model has {channels} output channel(s), {n_classes} classes need {expected}"
        )
    weights = [np.asarray(w) for w in source.get_weights()]
    _check_weights(build_unet(cfg.model, n_classes, int(source.input_shape[-1])), weights, uri)
    return weights


def setup_determinism(deterministic: bool) -> bool:
    """Make TensorFlow training reproducible in this process (call before any TF op).

    Turns on op determinism and runs one graph op at a time (one inter-op thread; each op
    still uses every core). Both are needed on CPU: with several inter-op threads, the
    Adam update races with itself and two runs of the same seed drift apart within a few
    steps. The inter-op setting is process-wide and can only be made before TensorFlow
    starts (the first op); :func:`train_model` calls this too, but a stage that touches
    TensorFlow earlier (loading ``train.init_from``) must call it first.

    Args:
        deterministic: ``TrainConfig.deterministic``; False does nothing.

    Returns:
        True when training will be reproducible; False when not requested or when
        TensorFlow already started with other inter-op threads (a warning is logged).
    """
    if not deterministic:
        return False
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()
    try:
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        log.warning(
            "TensorFlow started before setup_determinism with %d inter-op threads: "
            "training may not be reproducible (call it earlier, or set "
            "TF_NUM_INTEROP_THREADS=1)",
            tf.config.threading.get_inter_op_parallelism_threads(),
        )
        return False
    return True


@contextlib.contextmanager
def op_determinism(enabled: bool) -> Iterator[None]:
    """Op determinism (and one inter-op thread) inside the block; op determinism is
    switched off again afterwards when it was off before."""
    if not enabled:
        yield
        return
    try:
        from tensorflow.python.framework import config as tf_config

        was = bool(tf_config.is_op_determinism_enabled())
        disable = tf_config.disable_op_determinism
    except (ImportError, AttributeError):  # private API moved: leave it on
        was, disable = True, None
    setup_determinism(True)
    try:
        yield
    finally:
        if not was and disable is not None:
            disable()


def _check_train_args(
    n_classes: int, cfg: TrainConfig, init_weights: Sequence[np.ndarray] | None
) -> None:
    """Raise ValueError for ``n_classes < 2`` or ``init_weights`` not matching ``init_from``."""
    if n_classes < 2:
        raise ValueError(f"train_model: n_classes must be >= 2, got {n_classes}")
    if (init_weights is None) != (cfg.init_from is None):
        raise ValueError(
            "train_model: pass init_weights exactly when cfg.init_from is set "
            f"(init_from={cfg.init_from!r}, init_weights "
            f"{'missing' if init_weights is None else 'given'}); see initial_weights"
        )


@dataclass
class _Loop:
    """One run's fit loop: its key and backup, the epoch's steps and crops, the crop
    sampler, the state restored from the backup and the monitored loss."""

    key: str
    backup_dir: Path
    steps: int
    samples_per_epoch: int
    sampler: CropSampler
    prior: _Resume
    monitor: str = "loss"


def _open_loop(
    data: PatchData,
    augment_spec: AugmentConfig,
    cfg: TrainConfig,
    seed: int,
    key: str,
    checkpoint_dir: Path,
) -> _Loop:
    """The run's backup directory, what to resume from it, and the crop sampler."""
    backup_dir = checkpoint_dir / key
    prior = _read_resume_state(backup_dir)
    if prior.epoch > 0:
        log.info("resuming run %s from epoch %d", key, prior.epoch)
    steps = cfg.steps_per_epoch or math.ceil(len(data.train_images) / cfg.batch_size)
    samples_per_epoch = steps * cfg.batch_size
    mined = None
    if cfg.hard_negative_source == "mined" and cfg.hard_negative_prob > 0:
        lag = mined_lag(samples_per_epoch, cfg.batch_size)  # crops wait inside the stream
        mined = _mining().MinedNegatives.resumed(cfg.mine_every, backup_dir / _MINED_FILE, lag)
    sampler = CropSampler(
        data.train_images,
        data.train_masks,
        cfg.crop_size,
        cfg.foreground_crop_prob,
        augment_spec if cfg.augment else None,
        seed,
        samples_per_epoch,
        cfg.hard_negative_prob,
        mined,
    )
    return _Loop(key, backup_dir, steps, samples_per_epoch, sampler, prior)


def _mining() -> Any:
    from mitoseg.model import mining

    return mining


def _callbacks(cfg: TrainConfig, model: keras.Model, loop: _Loop, timer: Any, early: Any) -> list:
    """The built-in callbacks in their order (see :mod:`mitoseg.model.callbacks`)."""
    import keras

    from mitoseg.model import callbacks as mcb

    lr_min = min(cfg.min_lr, cfg.learning_rate)
    cbs: list[Any] = []
    if cfg.lr_schedule == "cosine" and cfg.max_train_seconds is not None:
        cbs.append(
            mcb.BudgetCosineDecay(
                cfg.learning_rate,
                lr_min,
                cfg.epochs * loop.steps,
                cfg.max_train_seconds,
                timer,
                warmup_fraction=cfg.warmup_fraction,
            )
        )
    cbs += [
        mcb.EpochSeeds(),
        mcb.LearningRateLogger(),
        timer,
        mcb.HistoryCSVLogger(loop.backup_dir / _HISTORY_FILE, HISTORY_COLUMNS),
    ]
    if cfg.precise_bn_batches and mcb.batch_norm_layers(model):

        def draw(epoch: int, b: int) -> np.ndarray:
            first = epoch * loop.samples_per_epoch + b * cfg.batch_size
            return np.stack(
                [loop.sampler.sample(k)[0] for k in range(first, first + cfg.batch_size)]
            )

        cbs.append(mcb.PreciseBatchNorm(draw, cfg.precise_bn_batches, loop.steps))
    if (mined := loop.sampler.mined) is not None:
        s = loop.sampler
        path = loop.backup_dir / _MINED_FILE
        cbs.append(_mining().HardNegativeMiner(s.images, s.masks, mined, cfg.mine_threshold, path))
    if cfg.keep == "best":
        prior_best = _best(loop.prior.rows, loop.monitor)[1]
        cbs.append(
            keras.callbacks.ModelCheckpoint(
                str(loop.backup_dir / _BEST_FILE),
                monitor=loop.monitor,
                mode="min",
                save_best_only=True,
                save_weights_only=True,
                initial_value_threshold=math.inf if prior_best is None else prior_best,
            )
        )
    cbs.append(early)
    if cfg.lr_schedule == "plateau":
        plateau = mcb.ResumableReduceLROnPlateau(
            monitor=loop.monitor,
            mode="min",
            factor=cfg.reduce_lr_factor,
            patience=cfg.reduce_lr_patience,
            min_lr=cfg.min_lr,
        )
        plateau.restore(loop.prior.rows, cfg.learning_rate)
        cbs.append(plateau)
    cbs.append(keras.callbacks.BackupAndRestore(str(loop.backup_dir), delete_checkpoint=False))
    return cbs


@dataclass
class _Fitted:
    """What :func:`_fit` leaves: the history rows, the kept epoch and how the run ended."""

    rows: list[dict[str, Any]]
    kept_epoch: int
    timer: Any
    stop_reason: str


def _fit(
    cfg: TrainConfig,
    model: keras.Model,
    loop: _Loop,
    train_ds: Any,
    val_ds: Any,
    extra: list,
    progress: bool,
) -> _Fitted:
    """Run (or resume) ``model.fit`` with the callbacks, then load the weights to keep."""
    from mitoseg.model import callbacks as mcb

    prior, backup_dir = loop.prior, loop.backup_dir
    timer = mcb.TimeBudget(cfg.max_train_seconds, prior.elapsed, backup_dir / _TIME_FILE)
    # off: patience beyond the last epoch
    patience = cfg.early_stopping_patience or cfg.epochs + 1
    early = mcb.ResumableEarlyStopping(monitor=loop.monitor, mode="min", patience=patience)
    cbs = [*_callbacks(cfg, model, loop, timer, early), *extra]

    # An interrupted run may already have met its stopping condition: run no epoch.
    stopped_early_before = early.restore(prior.rows)
    budget_spent_before = prior.epoch > 0 and timer.exhausted
    done = stopped_early_before or budget_spent_before or prior.epoch >= cfg.epochs
    for cb in extra:
        if callable(getattr(cb, "set_backup", None)):
            cb.set_backup(backup_id(backup_dir), [dict(r) for r in prior.rows])

    backup_dir.mkdir(parents=True, exist_ok=True)
    try:
        model.fit(
            train_ds,
            validation_data=val_ds,
            epochs=prior.epoch if done else cfg.epochs,
            steps_per_epoch=loop.steps,
            callbacks=cbs,
            shuffle=False,
            verbose=2 if progress else 0,
        )
    finally:  # crops prefetched past the end stop waiting for mined candidates
        if loop.sampler.mined is not None:
            loop.sampler.mined.close()
    rows = _read_history_csv(backup_dir / _HISTORY_FILE) or []
    if timer.stopped or budget_spent_before:
        stop_reason = "time_budget"
    elif early.stopped_epoch > 0:
        stop_reason = "early_stopping"
    else:
        stop_reason = "completed"
    return _Fitted(rows, _keep_weights(cfg, model, rows, loop), timer, stop_reason)


def _keep_weights(
    cfg: TrainConfig, model: keras.Model, rows: Sequence[dict[str, Any]], loop: _Loop
) -> int:
    """Load the weights to keep into ``model`` and return their 1-based epoch: the best
    checkpoint, else (``keep: last``, or no finite monitored value) the final weights."""
    best_epoch, _ = _best(rows, loop.monitor)
    if cfg.keep == "last":  # the final (averaged, BN re-estimated) weights
        return rows[-1]["epoch"] if rows else 0
    if best_epoch is not None and (loop.backup_dir / _BEST_FILE).is_file():
        model.load_weights(loop.backup_dir / _BEST_FILE)
        return best_epoch
    return rows[-1]["epoch"] if rows else 0  # no finite monitored value ever


def train_model(
    patches_dir: Path,
    augment_spec: AugmentConfig,
    cfg: TrainConfig,
    n_classes: int,
    seed: int,
    out_dir: Path,
    checkpoint_dir: Path,
    progress: bool = True,
    callbacks: list | None = None,
    init_weights: Sequence[np.ndarray] | None = None,
) -> TrainResult:
    """Train a UNet on the patches and save the best model.

    Args:
        patches_dir: ``{train,val}_{images,masks}.npy`` (``(N, P, P) uint8``).
        augment_spec: on-the-fly augmentation (ignored when ``cfg.augment`` is false).
        cfg: resolved training recipe.
        n_classes: classes including background (2 = binary, sigmoid output).
        seed: seeds keras/numpy/python and the input pipeline.
        out_dir: receives ``model.keras`` (best epoch, uncompiled, float32) and
            ``history.csv`` (:data:`HISTORY_COLUMNS`) when training ends.
        checkpoint_dir: parent of the per-run backup directory ``<run_key>``.
        progress: print one line per epoch (Keras ``verbose=2``).
        callbacks: extra Keras callbacks, run after the built-in ones (they see ``lr`` in
            the epoch logs, and the epoch's backup is written before them). A callback
            with a ``set_backup(backup_id: str, history: list[dict])`` method is called
            before training with :func:`backup_id` of the run's backup directory and the
            epochs restored from it (:data:`HISTORY_COLUMNS` dicts; empty when fresh), as
            :class:`mitoseg.model.callbacks.MlflowEpochLogger` does.
        init_weights: initial weights when ``cfg.init_from`` is set (from
            :func:`initial_weights`); ignored when resuming (the backup has newer ones).

    Returns:
        :class:`TrainResult`.

    Raises:
        DataError: missing or invalid patch files (see :func:`load_patches`).
        ValueError: ``n_classes < 2``; crop/patch sizes not compatible with the model;
            ``init_weights`` given without ``cfg.init_from`` or missing with it, or not
            matching ``cfg.model`` (``train.init_from <uri>: ...``).
    """
    _check_train_args(n_classes, cfg, init_weights)
    patches_dir, out_dir = Path(patches_dir), Path(out_dir)
    data = load_patches(patches_dir, n_classes)
    check_sizes(data, cfg)

    import keras

    from mitoseg.model.compile import compile_unet, learning_rate_schedule
    from mitoseg.model.unet import build_unet

    init = None if init_weights is None else [np.asarray(w) for w in init_weights]
    digest = weights_digest(init) if init else None
    key = run_key(patches_dir, augment_spec, cfg, n_classes, seed, digest)
    loop = _open_loop(data, augment_spec, cfg, seed, key, Path(checkpoint_dir))
    resumed = loop.prior.epoch > 0

    with op_determinism(cfg.deterministic):
        keras.utils.set_random_seed(seed)
        start = loop.prior.epoch * loop.samples_per_epoch
        train_ds, val_ds = datasets(data, loop.sampler, start, cfg.batch_size)
        loop.monitor = "val_loss" if val_ds is not None else "loss"
        lr = learning_rate_schedule(cfg, loop.steps)
        model = compile_unet(cfg, n_classes, data.in_channels, lr)
        if init is not None:
            _check_weights(model, init, cfg.init_from)
            if not resumed:
                model.set_weights(init)
        fitted = _fit(cfg, model, loop, train_ds, val_ds, list(callbacks or []), progress)
        # float32, uncompiled: what is saved
        export_model = build_unet(cfg.model, n_classes, data.in_channels)
        export_model.set_weights(model.get_weights())

    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "model.keras", suffix=".keras") as tmp:
        export_model.save(tmp)
    _write_history_csv(out_dir / "history.csv", fitted.rows)
    shutil.rmtree(loop.backup_dir, ignore_errors=True)
    return TrainResult(
        model_path=out_dir / "model.keras",
        history=[{c: r.get(c) for c in HISTORY_COLUMNS} for r in fitted.rows],
        best_epoch=int(fitted.kept_epoch),
        epochs_run=len(fitted.rows),
        train_seconds=float(fitted.timer.prior_seconds),
        patches_per_second=fitted.timer.crops_per_second(loop.samples_per_epoch),
        resumed=resumed,
        stop_reason=fitted.stop_reason,
        run_key=key,
    )
