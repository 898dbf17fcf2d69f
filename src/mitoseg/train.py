"""Train the UNet on patch arrays: tf.data input pipeline, callbacks, resume.

Pipeline: random crops (optionally centred on a foreground pixel) of the training patches,
augmented on the fly by :func:`mitoseg.augment.augment_pair` inside ``tf.numpy_function``.
Every training element ``k`` of the (infinite) stream belongs to ``epoch = k //
samples_per_epoch`` and uses a generator seeded from ``(seed, epoch, index)``, so the data
seen in an epoch is reproducible and does not depend on where a resumed run restarted.

Fault tolerance: ``keras.callbacks.BackupAndRestore`` backs the model and optimizer up to
``checkpoint_dir/<run key>`` after every epoch, where the run key hashes the resolved
configuration and the patch files; a killed run with the same key resumes from its last
epoch, a different configuration never sees that backup. The backup (with the per-epoch
history and the best model so far, kept beside it) is deleted after a successful run.

The numpy parts (:func:`load_patches`, :class:`CropSampler`, :func:`run_key`) do not import
tensorflow; :func:`train_model` does.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mitoseg.augment import augment_pair, is_identity
from mitoseg.config import AugmentConfig, TrainConfig
from mitoseg.io import DataError, atomic_path, write_json

__all__ = [
    "HISTORY_COLUMNS",
    "CropSampler",
    "PatchData",
    "TrainResult",
    "load_patches",
    "run_key",
    "train_model",
]

log = logging.getLogger(__name__)

#: Columns of ``history.csv`` (DVC plot). ``epoch`` is 1-based; ``lr`` is the learning rate
#: used during that epoch. Validation columns are empty when there are no val patches.
HISTORY_COLUMNS = ("epoch", "loss", "val_loss", "iou", "val_iou", "dice", "val_dice", "lr")
_STATE_FILE = "mitoseg_state.json"
_BEST_FILE = "best.keras"
_KERAS_META = "training_metadata.json"


@dataclass(frozen=True)
class PatchData:
    """Patch arrays of one patch directory.

    Attributes:
        train_images: ``(N, P, P) uint8`` intensity * 255.
        train_masks: ``(N, P, P) uint8`` class index.
        val_images: ``(M, P, P) uint8`` (``M`` may be 0).
        val_masks: ``(M, P, P) uint8``.
    """

    train_images: np.ndarray
    train_masks: np.ndarray
    val_images: np.ndarray
    val_masks: np.ndarray

    @property
    def patch_size(self) -> int:
        """Side ``P`` of the square patches."""
        return int(self.train_images.shape[1])


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
    """

    model_path: Path
    history: list[dict[str, Any]]
    best_epoch: int
    epochs_run: int
    train_seconds: float
    patches_per_second: float
    resumed: bool
    stop_reason: str = field(default="completed")


def _read_array(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: file not found (run the patchify stage first)")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DataError(f"{path}: cannot read .npy array ({exc})") from None
    if arr.ndim != 3 or arr.dtype != np.uint8 or arr.shape[1] != arr.shape[2]:
        raise DataError(
            f"{path}: expected (N, P, P) uint8 patches, got shape {arr.shape} dtype {arr.dtype}"
        )
    return arr


def load_patches(patches_dir: str | Path, n_classes: int) -> PatchData:
    """Load and check ``{train,val}_{images,masks}.npy`` from the patchify stage.

    Args:
        patches_dir: directory written by ``make_patch_dataset``.
        n_classes: classes including background; every mask value must be below it.

    Returns:
        The four arrays (see :class:`PatchData`).

    Raises:
        DataError: missing directory or file, wrong shape/dtype, image/mask mismatch,
            patch sizes that differ between splits, mask values ``>= n_classes`` or no
            training patches (messages name the file).
    """
    d = Path(patches_dir)
    if not d.is_dir():
        raise DataError(f"{d}: patches directory not found (run the patchify stage first)")
    arrays: dict[str, np.ndarray] = {}
    for split in ("train", "val"):
        img_path, mask_path = d / f"{split}_images.npy", d / f"{split}_masks.npy"
        images, masks = _read_array(img_path), _read_array(mask_path)
        if images.shape != masks.shape:
            raise DataError(
                f"{mask_path}: shape {masks.shape} differs from {img_path.name} {images.shape}"
            )
        if masks.size and int(masks.max()) >= n_classes:
            raise DataError(
                f"{mask_path}: mask class index {int(masks.max())} >= n_classes ({n_classes})"
            )
        arrays[f"{split}_images"], arrays[f"{split}_masks"] = images, masks
    if len(arrays["train_images"]) == 0:
        raise DataError(f"{d / 'train_images.npy'}: no training patches")
    val_size, train_size = arrays["val_images"].shape[1], arrays["train_images"].shape[1]
    if len(arrays["val_images"]) and val_size != train_size:
        raise DataError(
            f"{d / 'val_images.npy'}: patch size {val_size} differs from "
            f"train patch size {train_size}"
        )
    return PatchData(**arrays)


def run_key(
    patches_dir: str | Path,
    augment_spec: AugmentConfig,
    cfg: TrainConfig,
    n_classes: int,
    seed: int,
) -> str:
    """Hash of everything that defines a training run: config, augmentation, seed, data.

    Returns:
        16 hex characters; the name of the run's backup directory.
    """
    h = hashlib.sha256()
    spec = {
        "train": cfg.model_dump(mode="json"),
        "augment": augment_spec.model_dump(mode="json"),
        "n_classes": int(n_classes),
        "seed": int(seed),
    }
    h.update(json.dumps(spec, sort_keys=True).encode())
    for name in ("train_images", "train_masks", "val_images", "val_masks"):
        path = Path(patches_dir) / f"{name}.npy"
        h.update(name.encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


class CropSampler:
    """Deterministic source of training crops: element ``k`` -> (image, mask).

    Element ``k`` belongs to epoch ``k // samples_per_epoch`` and position ``i`` in it.
    Patches are visited in a per-epoch random permutation (every patch once per
    ``N`` elements); crop position, foreground centring and augmentation come from a
    generator seeded with ``(seed, epoch, i)``.

    Args:
        images: ``(N, P, P) uint8`` patches.
        masks: ``(N, P, P) uint8`` class indices.
        crop_size: crop side, ``None`` for full patches.
        foreground_crop_prob: probability to centre the crop on a random foreground pixel
            (falls back to a uniform crop when the patch has no foreground).
        augment: augmentation strengths, ``None`` for no augmentation.
        seed: base seed.
        samples_per_epoch: elements per epoch (``steps_per_epoch * batch_size``).

    Raises:
        ValueError: ``crop_size`` larger than the patches, or ``samples_per_epoch < 1``.
    """

    def __init__(
        self,
        images: np.ndarray,
        masks: np.ndarray,
        crop_size: int | None,
        foreground_crop_prob: float,
        augment: AugmentConfig | None,
        seed: int,
        samples_per_epoch: int,
    ) -> None:
        size = images.shape[1]
        if crop_size is not None and crop_size > size:
            raise ValueError(f"train.crop_size ({crop_size}) exceeds the patch size ({size})")
        if samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be >= 1, got {samples_per_epoch}")
        self.images = images
        self.masks = masks
        self.crop = crop_size or size
        self.foreground_crop_prob = foreground_crop_prob
        self.augment = None if augment is None or is_identity(augment) else augment
        self.seed = int(seed)
        self.samples_per_epoch = int(samples_per_epoch)
        self._perms: dict[tuple[int, int], np.ndarray] = {}
        self._lock = threading.Lock()

    def _patch_index(self, epoch: int, i: int) -> int:
        n = len(self.images)
        key = (epoch, i // n)
        with self._lock:
            perm = self._perms.get(key)
            if perm is None:
                if len(self._perms) > 8:
                    self._perms.clear()
                rng = np.random.default_rng([self.seed, epoch, key[1], 0x5EED])
                perm = self._perms[key] = rng.permutation(n)
        return int(perm[i % n])

    def sample(self, k: int | np.integer) -> tuple[np.ndarray, np.ndarray]:
        """Training element ``k``.

        Returns:
            ``(image (c, c, 1) float32 in [0, 1], mask (c, c, 1) uint8)`` with ``c`` the crop
            size.
        """
        epoch, i = divmod(int(k), self.samples_per_epoch)
        idx = self._patch_index(epoch, i)
        rng = np.random.default_rng([self.seed, epoch, i])
        image, mask = self.images[idx], self.masks[idx]
        size, c = image.shape[0], self.crop
        if c < size:
            top = left = None
            if self.foreground_crop_prob > 0 and rng.random() < self.foreground_crop_prob:
                fg = np.flatnonzero(mask)
                if fg.size:
                    r, col = divmod(int(fg[rng.integers(fg.size)]), size)
                    top = min(max(r - c // 2, 0), size - c)
                    left = min(max(col - c // 2, 0), size - c)
            if top is None or left is None:
                top, left = (int(v) for v in rng.integers(0, size - c + 1, size=2))
            image = image[top : top + c, left : left + c]
            mask = mask[top : top + c, left : left + c]
        img = image.astype(np.float32) / np.float32(255.0)
        if self.augment is not None:
            img, mask = augment_pair(img, mask, rng, self.augment)
        return img[..., None], np.ascontiguousarray(mask, dtype=np.uint8)[..., None]


def _check_sizes(data: PatchData, cfg: TrainConfig) -> None:
    mult = 2**cfg.model.depth
    size = data.patch_size
    if cfg.crop_size is not None:
        if cfg.crop_size > size:
            raise ValueError(f"train.crop_size ({cfg.crop_size}) exceeds the patch size ({size})")
        if cfg.crop_size % mult:
            raise ValueError(
                f"train.crop_size ({cfg.crop_size}) must be a multiple of 2**model.depth ({mult})"
            )
    if size % mult:
        raise ValueError(f"patch size ({size}) must be a multiple of 2**model.depth ({mult})")


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(v)
    return str(v)


def _write_history_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_path(path, suffix=".csv") as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(HISTORY_COLUMNS)
        for row in rows:
            writer.writerow([_fmt(row.get(c)) for c in HISTORY_COLUMNS])


def _is_better(value: float | None, best: float | None) -> bool:
    if value is None or math.isnan(value):
        return False
    return best is None or value < best


def _make_monitor(**kwargs: Any) -> Any:
    """Build the :class:`keras.callbacks.Callback` that records, saves and stops training."""
    import keras

    class TrainingMonitor(keras.callbacks.Callback):
        """History + best model + early stopping + wall-clock budget, resumable.

        Runs first in the callback list: it adds ``lr`` to the epoch logs (so later
        callbacks such as the MLflow logger see it), writes ``history.csv`` and the resume
        state before ``BackupAndRestore`` writes its backup, and saves the best model
        (uncompiled float32 twin) into the backup directory.
        """

        def __init__(
            self,
            *,
            export_model: Any,
            backup_dir: Path,
            out_dir: Path,
            monitor: str,
            patience: int,
            max_seconds: float | None,
            samples_per_epoch: int,
            prior: dict[str, Any],
            cosine: tuple[float, float, int] | None = None,
            steps_per_epoch: int = 1,
        ) -> None:
            super().__init__()
            self.cosine = cosine
            self.steps_per_epoch = steps_per_epoch
            self._epoch = 0
            self.export_model = export_model
            self.backup_dir = backup_dir
            self.out_dir = out_dir
            self.monitor = monitor
            self.patience = patience
            self.max_seconds = max_seconds
            self.samples_per_epoch = samples_per_epoch
            self.rows: list[dict[str, Any]] = list(prior.get("rows", []))
            self.best: float | None = prior.get("best")
            self.best_epoch: int | None = prior.get("best_epoch")
            self.wait = int(prior.get("wait", 0))
            self.prior_seconds = float(prior.get("elapsed", 0.0))
            self.stop_reason = "completed"
            self.session_epochs: list[tuple[float, int]] = []  # (train-phase s, samples)
            self._t0 = self._epoch_t0 = 0.0
            self._train_phase: float | None = None
            self._epoch_lr = float("nan")

        @property
        def elapsed(self) -> float:
            return self.prior_seconds + (time.perf_counter() - self._t0)

        def on_train_begin(self, logs: dict | None = None) -> None:
            self._t0 = time.perf_counter()

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self._epoch_t0 = time.perf_counter()
            self._train_phase = None
            self._epoch = epoch
            self._set_cosine_lr(0)
            self._epoch_lr = self._current_lr()

        def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
            if batch:
                self._set_cosine_lr(batch)

        def _set_cosine_lr(self, batch: int) -> None:
            """Budget-aware cosine decay: progress is the larger of the step fraction and
            the fraction of the wall-clock budget used, so the schedule ends on time
            however fast the machine is."""
            if self.cosine is None:
                return
            lr0, lr_min, total = self.cosine
            progress = (self._epoch * self.steps_per_epoch + batch) / max(total, 1)
            if self.max_seconds:
                progress = max(progress, self.elapsed / self.max_seconds)
            progress = min(progress, 1.0)
            lr = lr_min + 0.5 * (lr0 - lr_min) * (1.0 + math.cos(math.pi * progress))
            self.model.optimizer.learning_rate.assign(lr)

        def on_test_begin(self, logs: dict | None = None) -> None:
            if self._train_phase is None:
                self._train_phase = time.perf_counter() - self._epoch_t0

        def _current_lr(self) -> float:
            lr = self.model.optimizer.learning_rate
            return float(keras.ops.convert_to_numpy(lr))

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            logs = logs if logs is not None else {}
            now = time.perf_counter()
            train_phase = self._train_phase
            if train_phase is None:
                train_phase = now - self._epoch_t0
            self.session_epochs.append((train_phase, self.samples_per_epoch))
            logs["lr"] = self._epoch_lr
            row: dict[str, Any] = {"epoch": epoch + 1}
            for col in HISTORY_COLUMNS[1:]:
                v = logs.get(col)
                row[col] = None if v is None else float(v)
            self.rows = [r for r in self.rows if r["epoch"] <= epoch] + [row]
            value = row.get(self.monitor)
            if _is_better(value, self.best):
                self.best, self.best_epoch, self.wait = value, epoch + 1, 0
                self.export_model.set_weights(self.model.get_weights())
                self.backup_dir.mkdir(parents=True, exist_ok=True)
                with atomic_path(self.backup_dir / _BEST_FILE, suffix=".keras") as tmp:
                    self.export_model.save(tmp)
            else:
                self.wait += 1
                if self.wait >= self.patience:
                    self.model.stop_training = True
                    self.stop_reason = "early_stopping"
            if self.max_seconds is not None and self.elapsed >= self.max_seconds:
                self.model.stop_training = True
                self.stop_reason = "time_budget"
            _write_history_csv(self.out_dir / "history.csv", self.rows)
            write_json(
                self.backup_dir / _STATE_FILE,
                {
                    "rows": self.rows,
                    "best": self.best,
                    "best_epoch": self.best_epoch,
                    "wait": self.wait,
                    "elapsed": self.elapsed,
                },
            )

        def on_train_end(self, logs: dict | None = None) -> None:
            target = self.out_dir / "model.keras"
            best = self.backup_dir / _BEST_FILE
            if best.is_file():
                with atomic_path(target, suffix=".keras") as tmp:
                    shutil.copyfile(best, tmp)
            else:  # no finite monitored value ever: keep the final weights
                self.export_model.set_weights(self.model.get_weights())
                with atomic_path(target, suffix=".keras") as tmp:
                    self.export_model.save(tmp)
                self.best_epoch = self.rows[-1]["epoch"] if self.rows else 0
            self.prior_seconds = self.elapsed
            self._t0 = time.perf_counter()

    return TrainingMonitor(**kwargs)


def _read_resume_state(backup_dir: Path) -> tuple[int, dict[str, Any]]:
    """Epoch to resume from (0 = fresh) and the monitor state saved with that backup."""
    meta = backup_dir / _KERAS_META
    state_path = backup_dir / _STATE_FILE
    weights = backup_dir / "latest.weights.h5"
    if not (meta.is_file() and state_path.is_file() and weights.is_file()):
        if backup_dir.exists():
            shutil.rmtree(backup_dir)
        return 0, {}
    try:
        epoch = int(json.loads(meta.read_text())["epoch"])
        state = json.loads(state_path.read_text())
    except (ValueError, KeyError, TypeError):
        log.warning("%s: unreadable backup, starting from scratch", backup_dir)
        shutil.rmtree(backup_dir)
        return 0, {}
    rows = [r for r in state.get("rows", []) if r["epoch"] <= epoch]
    if len(rows) != epoch:
        log.warning("%s: backup history incomplete, starting from scratch", backup_dir)
        shutil.rmtree(backup_dir)
        return 0, {}
    state["rows"] = rows
    return epoch, state


def _setup_devices(cfg: TrainConfig) -> tuple[Any, bool]:
    """Distribution strategy and whether mixed precision is used."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    mixed = bool(gpus) and cfg.mixed_precision in ("auto", "on")
    if cfg.mixed_precision == "on" and not gpus:
        log.warning("train.mixed_precision=on but no GPU is visible: training in float32")
    if cfg.distribute == "mirrored" or (cfg.distribute == "auto" and len(gpus) > 1):
        strategy = tf.distribute.MirroredStrategy()
    else:
        strategy = tf.distribute.get_strategy()
    return strategy, mixed


def _datasets(
    data: PatchData, sampler: CropSampler, start: int, batch_size: int
) -> tuple[Any, Any | None]:
    import tensorflow as tf

    c = sampler.crop

    def load(k: Any) -> tuple[Any, Any]:
        image, mask = tf.numpy_function(sampler.sample, [k], [tf.float32, tf.uint8])
        image.set_shape((c, c, 1))
        mask.set_shape((c, c, 1))
        return image, mask

    options = tf.data.Options()
    options.deterministic = True
    train = (
        tf.data.Dataset.range(start, np.iinfo(np.int64).max)
        .map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .batch(batch_size, drop_remainder=True)
        .prefetch(tf.data.AUTOTUNE)
        .with_options(options)
    )
    if len(data.val_images) == 0:
        return train, None

    def to_float(image: Any, mask: Any) -> tuple[Any, Any]:
        return tf.cast(image, tf.float32)[..., None] / 255.0, mask[..., None]

    val = (
        tf.data.Dataset.from_tensor_slices((data.val_images, data.val_masks))
        .batch(batch_size)
        .map(to_float)
        .cache()
        .prefetch(tf.data.AUTOTUNE)
    )
    return train, val


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
) -> TrainResult:
    """Train a UNet on the patches and save the best model.

    Args:
        patches_dir: ``{train,val}_{images,masks}.npy`` (``(N, P, P) uint8``).
        augment_spec: on-the-fly augmentation (ignored when ``cfg.augment`` is false).
        cfg: resolved training recipe.
        n_classes: classes including background (2 = binary, sigmoid output).
        seed: seeds keras/numpy/python and the input pipeline.
        out_dir: receives ``model.keras`` (best epoch, uncompiled, float32) and
            ``history.csv`` (:data:`HISTORY_COLUMNS`, rewritten after every epoch).
        checkpoint_dir: parent of the per-run backup directory ``<run_key>``.
        progress: print one line per epoch (Keras ``verbose=2``).
        callbacks: extra Keras callbacks appended after the built-in ones (they see
            ``lr`` in the epoch logs).

    Returns:
        :class:`TrainResult`.

    Raises:
        DataError: missing or invalid patch files (see :func:`load_patches`).
        ValueError: ``n_classes < 2``, or crop/patch sizes not compatible with the model.
    """
    if n_classes < 2:
        raise ValueError(f"train_model: n_classes must be >= 2, got {n_classes}")
    patches_dir, out_dir, checkpoint_dir = Path(patches_dir), Path(out_dir), Path(checkpoint_dir)
    data = load_patches(patches_dir, n_classes)
    _check_sizes(data, cfg)

    import keras

    from mitoseg.model.losses import get_loss, get_metrics
    from mitoseg.model.unet import build_unet

    key = run_key(patches_dir, augment_spec, cfg, n_classes, seed)
    backup_dir = checkpoint_dir / key
    initial_epoch, prior = _read_resume_state(backup_dir)
    resumed = initial_epoch > 0
    if resumed:
        log.info("resuming run %s from epoch %d", key, initial_epoch)

    steps = cfg.steps_per_epoch or math.ceil(len(data.train_images) / cfg.batch_size)
    samples_per_epoch = steps * cfg.batch_size
    sampler = CropSampler(
        data.train_images,
        data.train_masks,
        cfg.crop_size,
        cfg.foreground_crop_prob,
        augment_spec if cfg.augment else None,
        seed,
        samples_per_epoch,
    )
    keras.utils.set_random_seed(seed)
    train_ds, val_ds = _datasets(data, sampler, initial_epoch * samples_per_epoch, cfg.batch_size)
    monitor_key = "val_loss" if val_ds is not None else "loss"

    strategy, mixed = _setup_devices(cfg)
    previous_policy = keras.config.dtype_policy()
    try:
        if mixed:
            keras.config.set_dtype_policy("mixed_float16")
        with strategy.scope():
            model = build_unet(cfg.model, n_classes)
            # cosine: the learning rate is set per batch by the monitor (budget-aware)
            model.compile(
                optimizer=keras.optimizers.Adam(learning_rate=cfg.learning_rate),
                loss=get_loss(cfg.loss, n_classes, cfg.foreground_weight),
                metrics=get_metrics(n_classes),
            )
    finally:
        keras.config.set_dtype_policy(previous_policy)
    export_model = build_unet(cfg.model, n_classes)  # float32 twin: what is saved

    monitor = _make_monitor(
        export_model=export_model,
        backup_dir=backup_dir,
        out_dir=out_dir,
        monitor=monitor_key,
        patience=cfg.early_stopping_patience,
        max_seconds=cfg.max_train_seconds,
        samples_per_epoch=samples_per_epoch,
        prior=prior,
        cosine=(
            (cfg.learning_rate, min(cfg.min_lr, cfg.learning_rate), cfg.epochs * steps)
            if cfg.lr_schedule == "cosine"
            else None
        ),
        steps_per_epoch=steps,
    )
    cbs: list[Any] = [monitor]
    if cfg.lr_schedule == "plateau":
        cbs.append(
            keras.callbacks.ReduceLROnPlateau(
                monitor=monitor_key,
                factor=cfg.reduce_lr_factor,
                patience=cfg.reduce_lr_patience,
                min_lr=cfg.min_lr,
                verbose=0,
            )
        )
    cbs.append(keras.callbacks.BackupAndRestore(str(backup_dir)))
    cbs.extend(callbacks or [])

    out_dir.mkdir(parents=True, exist_ok=True)
    model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=cfg.epochs,
        steps_per_epoch=steps,
        callbacks=cbs,
        shuffle=False,
        verbose=2 if progress else 0,
    )
    if backup_dir.exists():  # BackupAndRestore removes it; be sure nothing stale remains
        shutil.rmtree(backup_dir, ignore_errors=True)

    timed = monitor.session_epochs
    if len(timed) > 1:  # the first epoch of a process includes tracing/compilation
        timed = timed[1:]
    seconds = sum(t for t, _ in timed)
    pps = sum(n for _, n in timed) / seconds if seconds > 0 else 0.0
    history = [{c: r.get(c) for c in HISTORY_COLUMNS} for r in monitor.rows]
    return TrainResult(
        model_path=out_dir / "model.keras",
        history=history,
        best_epoch=int(monitor.best_epoch or 0),
        epochs_run=len(history),
        train_seconds=float(monitor.prior_seconds),
        patches_per_second=float(pps),
        resumed=resumed,
        stop_reason=monitor.stop_reason,
    )
