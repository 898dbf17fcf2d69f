"""Train the UNet on patch arrays: tf.data input pipeline, callbacks, resume.

Why one module of about 900 lines: the crop stream, the resume protocol and the fit loop
share the run key and the backup layout; the Keras callbacks are in
:mod:`mitoseg.model.callbacks`.

Pipeline: random crops (optionally centred on a foreground pixel) of the training patches,
augmented on the fly by :func:`mitoseg.augment.augment_pair` inside ``tf.numpy_function``.
Every training element ``k`` of the (infinite) stream belongs to ``epoch = k //
samples_per_epoch`` and uses a generator seeded from ``(seed, epoch, index)``, so the data
seen in an epoch is reproducible and does not depend on where a resumed run restarted.

Reproducibility. A run is bounded by ``epochs * steps_per_epoch`` optimizer steps (early
stopping may end it sooner). The seed fixes the initial weights and dropout
(``keras.utils.set_random_seed``) and the data (above; the tf.data pipeline keeps element
order), and ``TrainConfig.deterministic`` turns on TensorFlow's op determinism with one
inter-op thread (:func:`setup_determinism`), so the same inputs give the same model, bit
for bit, on a given software stack. ``TrainConfig.max_train_seconds`` adds a wall-clock
budget for benchmarks: the stopping epoch and the cosine schedule then follow the clock.

Callbacks: Keras' ``ModelCheckpoint`` (best weights by the monitored loss),
``EarlyStopping``, ``CSVLogger``, ``ReduceLROnPlateau`` and ``BackupAndRestore``, composed
with the small ones of :mod:`mitoseg.model.callbacks`; the cosine schedule is Keras'
``CosineDecay`` (:class:`~mitoseg.model.callbacks.BudgetCosineDecay` under a time budget).

Fault tolerance: ``BackupAndRestore`` backs the model and optimizer up to
``checkpoint_dir/<run key>`` after every epoch, where the run key hashes the resolved
configuration, the patch files and the initial weights of a fine-tuning run. Beside the
backup live the per-epoch history (the CSV logger writes it there, so it survives the
stage's outputs being removed), the best weights so far and the elapsed seconds. A killed
run with the same key resumes from its last epoch (rows past it are dropped; early
stopping and LR-on-plateau replay the restored rows), a different configuration never
sees that backup. The backup is deleted after a successful run.

The numpy parts (:func:`load_patches`, :class:`CropSampler`, :func:`run_key`,
:func:`weights_digest`, :func:`backup_id`) do not import tensorflow; the others do.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mitoseg.augment import augment_pair, is_identity
from mitoseg.config import AugmentConfig, TrainConfig
from mitoseg.io import DataError, atomic_path
from mitoseg.labels import IGNORE_INDEX, has_labels, labelled

if TYPE_CHECKING:
    import keras

__all__ = [
    "HISTORY_COLUMNS",
    "CropSampler",
    "PatchData",
    "TrainResult",
    "backup_id",
    "initial_weights",
    "load_patches",
    "op_determinism",
    "run_key",
    "sample_stream",
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
_KERAS_META = "training_metadata.json"
_KERAS_WEIGHTS = "latest.weights.h5"


@dataclass(frozen=True)
class PatchData:
    """Patch arrays of one patch directory.

    Attributes:
        train_images: ``(N, P, P) uint8`` intensity * 255, or ``(N, P, P, 2k + 1)`` for a
            2.5D dataset (the slice and ``k`` neighbours on each side, centre in the middle).
        train_masks: ``(N, P, P) uint8`` class index.
        val_images: ``(M, P, P)`` or ``(M, P, P, 2k + 1)`` uint8 (``M`` may be 0).
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

    @property
    def in_channels(self) -> int:
        """Network input channels: 1, or ``2k + 1`` for 2.5D patches."""
        return 1 if self.train_images.ndim == 3 else int(self.train_images.shape[-1])


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


def _read_array(path: Path, channels: bool = False) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: file not found (run the patchify stage first)")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DataError(f"{path}: cannot read .npy array ({exc})") from None
    ok = arr.ndim == 3 or (channels and arr.ndim == 4 and arr.shape[-1] % 2 == 1)
    if not ok or arr.dtype != np.uint8 or arr.shape[1] != arr.shape[2]:
        expected = "(N, P, P) or (N, P, P, 2k+1)" if channels else "(N, P, P)"
        raise DataError(
            f"{path}: expected {expected} uint8 patches, got shape {arr.shape} dtype {arr.dtype}"
        )
    return arr


def load_patches(patches_dir: str | Path, n_classes: int) -> PatchData:
    """Load and check ``{train,val}_{images,masks}.npy`` from the patchify stage.

    Args:
        patches_dir: directory written by ``make_patch_dataset``.
        n_classes: classes including background; every mask value must be below it or
            be :data:`~mitoseg.labels.IGNORE_INDEX` (unlabelled).

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
        images, masks = _read_array(img_path, channels=True), _read_array(mask_path)
        if images.shape[:3] != masks.shape:
            raise DataError(
                f"{mask_path}: shape {masks.shape} differs from {img_path.name} {images.shape}"
            )
        bad = masks[(masks >= n_classes) & (masks != IGNORE_INDEX)] if masks.size else masks
        if bad.size:
            raise DataError(
                f"{mask_path}: mask class index {int(bad.max())} >= n_classes ({n_classes})"
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
    val_c, train_c = arrays["val_images"].shape[3:], arrays["train_images"].shape[3:]
    if len(arrays["val_images"]) and val_c != train_c:
        raise DataError(
            f"{d / 'val_images.npy'}: channels {val_c or 1} differ from the training "
            f"patches' {train_c or 1}"
        )
    return PatchData(**arrays)


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


class CropSampler:
    """Deterministic source of training crops: element ``k`` -> (image, mask).

    Element ``k`` belongs to epoch ``k // samples_per_epoch`` and position ``i`` in it.
    Patches are visited in a per-epoch random permutation (every patch once per
    ``N`` elements); crop position, foreground centring and augmentation come from a
    generator seeded with ``(seed, epoch, i)``.

    Unlabelled pixels (:data:`~mitoseg.labels.IGNORE_INDEX`): patches without a labelled
    pixel are never visited (``N`` counts the others), no crop is centred on an unlabelled
    pixel, and a uniform crop without a labelled pixel is drawn again (up to
    :attr:`MAX_DRAWS` times, then centred on a random labelled pixel), so every crop
    carries labels. With fully labelled patches the crops are the same as without this.

    Args:
        images: ``(N, P, P)`` or ``(N, P, P, C)`` uint8 patches.
        masks: ``(N, P, P) uint8`` class indices (``IGNORE_INDEX`` = unlabelled).
        crop_size: crop side, ``None`` for full patches.
        foreground_crop_prob: probability to centre the crop on a random foreground pixel
            (falls back to a uniform crop when the patch has no foreground).
        hard_negative_prob: probability to centre the crop instead on a *dark background*
            pixel: background darker than the median foreground intensity of all training
            patches (the myelin sheaths and dark membranes a model otherwise calls
            mitochondria); falls back to a uniform crop when the patch has none.
        augment: augmentation strengths, ``None`` for no augmentation.
        seed: base seed.
        samples_per_epoch: elements per epoch (``steps_per_epoch * batch_size``).

    Raises:
        ValueError: ``crop_size`` larger than the patches, ``samples_per_epoch < 1``, or
            no patch with a labelled pixel.
    """

    #: Uniform crop positions tried before centring on a labelled pixel.
    MAX_DRAWS = 8

    def __init__(
        self,
        images: np.ndarray,
        masks: np.ndarray,
        crop_size: int | None,
        foreground_crop_prob: float,
        augment: AugmentConfig | None,
        seed: int,
        samples_per_epoch: int,
        hard_negative_prob: float = 0.0,
    ) -> None:
        size = images.shape[1]
        if not 0 <= foreground_crop_prob + hard_negative_prob <= 1:
            raise ValueError(
                "foreground_crop_prob + hard_negative_prob must be in [0, 1], got "
                f"{foreground_crop_prob} + {hard_negative_prob}"
            )
        if crop_size is not None and crop_size > size:
            raise ValueError(f"train.crop_size ({crop_size}) exceeds the patch size ({size})")
        if samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be >= 1, got {samples_per_epoch}")
        usable = np.flatnonzero(has_labels(masks, axis=(1, 2)))
        if not usable.size:
            raise ValueError(
                f"none of the {len(masks)} training patches has a labelled pixel "
                f"(all are {IGNORE_INDEX}, unlabelled)"
            )
        self.images = images
        self.masks = masks
        self.usable = usable
        self.crop = crop_size or size
        self.foreground_crop_prob = foreground_crop_prob
        self.hard_negative_prob = hard_negative_prob
        self.dark_level = self._dark_level(images, masks) if hard_negative_prob > 0 else 0
        self.augment = None if augment is None or is_identity(augment) else augment
        self.seed = int(seed)
        self.samples_per_epoch = int(samples_per_epoch)
        self._perms: dict[tuple[int, int], np.ndarray] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _dark_level(images: np.ndarray, masks: np.ndarray) -> int:
        """Median uint8 intensity of the labelled foreground pixels (centre channel)."""
        centre = images if images.ndim == 3 else images[..., images.shape[-1] // 2]
        fg = centre[(masks != 0) & labelled(masks)]
        return int(np.median(fg)) if fg.size else 0

    def _centre_on(self, candidates: np.ndarray, rng: np.random.Generator, size: int):
        if not candidates.size:
            return None, None
        r, col = divmod(int(candidates[rng.integers(candidates.size)]), size)
        c = self.crop
        return min(max(r - c // 2, 0), size - c), min(max(col - c // 2, 0), size - c)

    def _uniform(self, mask: np.ndarray, rng: np.random.Generator, size: int) -> tuple[int, int]:
        """A uniform crop position whose crop has a labelled pixel (see the class doc)."""
        c = self.crop
        for _ in range(self.MAX_DRAWS):
            top, left = (int(v) for v in rng.integers(0, size - c + 1, size=2))
            if has_labels(mask[top : top + c, left : left + c]):
                return top, left
        top, left = self._centre_on(np.flatnonzero(labelled(mask)), rng, size)
        assert top is not None and left is not None  # only patches with labels are visited
        return top, left

    def _patch_index(self, epoch: int, i: int) -> int:
        n = len(self.usable)
        key = (epoch, i // n)
        with self._lock:
            perm = self._perms.get(key)
            if perm is None:
                if len(self._perms) > 8:
                    self._perms.clear()
                rng = np.random.default_rng([self.seed, epoch, key[1], 0x5EED])
                perm = self._perms[key] = rng.permutation(n)
        return int(self.usable[perm[i % n]])

    def sample(self, k: int | np.integer) -> tuple[np.ndarray, np.ndarray]:
        """Training element ``k``.

        Returns:
            ``(image (c, c, C) float32 in [0, 1], mask (c, c, 1) uint8)`` with ``c`` the crop
            size and ``C`` the patches' channels (1 for 2D patches).
        """
        epoch, i = divmod(int(k), self.samples_per_epoch)
        idx = self._patch_index(epoch, i)
        rng = np.random.default_rng([self.seed, epoch, i])
        image, mask = self.images[idx], self.masks[idx]
        size, c = image.shape[0], self.crop
        if c < size:
            top = left = None
            u = rng.random() if self.foreground_crop_prob + self.hard_negative_prob > 0 else 1.0
            if u < self.foreground_crop_prob:
                fg = (mask != 0) & labelled(mask)
                top, left = self._centre_on(np.flatnonzero(fg), rng, size)
            elif u < self.foreground_crop_prob + self.hard_negative_prob:
                centre = image if image.ndim == 2 else image[..., image.shape[-1] // 2]
                dark = (centre <= self.dark_level) & (mask == 0)
                top, left = self._centre_on(np.flatnonzero(dark), rng, size)
            if top is None or left is None:
                top, left = self._uniform(mask, rng, size)
            image = image[top : top + c, left : left + c]
            mask = mask[top : top + c, left : left + c]
        img = image.astype(np.float32) / np.float32(255.0)
        if self.augment is not None:
            img, mask = augment_pair(img, mask, rng, self.augment)
        if img.ndim == 2:
            img = img[..., None]
        return img, np.ascontiguousarray(mask, dtype=np.uint8)[..., None]


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


def _accuracy(n_classes: int) -> Any:
    """Pixel accuracy metric named ``accuracy`` over the labelled pixels (binary:
    p >= 0.5; multiclass: argmax)."""
    from mitoseg.model.losses import PixelAccuracy

    return PixelAccuracy(n_classes)


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


def _data_options() -> Any:
    import tensorflow as tf

    options = tf.data.Options()
    options.deterministic = True
    # its own threads: the crop/augment map stays parallel with one inter-op thread
    options.threading.private_threadpool_size = max(2, os.cpu_count() or 1)
    return options


def sample_stream(
    sample: Callable[[int], tuple[np.ndarray, np.ndarray]],
    start: int,
    batch_size: int,
    shapes: tuple[tuple[int, ...], tuple[int, ...]],
    dtypes: tuple[str, str],
) -> Any:
    """Infinite ``tf.data`` stream of batches of ``sample(k)`` for ``k = start, start+1 ...``.

    Args:
        sample: pure function of the element index ``k`` -> ``(input, target)`` numpy
            arrays (e.g. :meth:`CropSampler.sample`); run in parallel, order kept.
        start: index of the first element (a resumed run skips the elements it saw).
        batch_size: elements per batch.
        shapes: ``(input shape, target shape)`` of one element.
        dtypes: ``(input dtype, target dtype)`` names, e.g. ``("float32", "uint8")``.

    Returns:
        ``tf.data.Dataset`` of ``(inputs (B, *shapes[0]), targets (B, *shapes[1]))``.
    """
    import tensorflow as tf

    def load(k: Any) -> tuple[Any, Any]:
        # stateless: the sample is a pure function of k, so tf.data may run it in parallel
        # (and keep the order) even with op determinism on
        x, y = tf.numpy_function(sample, [k], [tf.as_dtype(d) for d in dtypes], stateful=False)
        x.set_shape(shapes[0])
        y.set_shape(shapes[1])
        return x, y

    return (
        tf.data.Dataset.range(start, np.iinfo(np.int64).max)
        .map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .batch(batch_size, drop_remainder=True)
        .prefetch(tf.data.AUTOTUNE)
        .with_options(_data_options())
    )


def _datasets(
    data: PatchData, sampler: CropSampler, start: int, batch_size: int
) -> tuple[Any, Any | None]:
    import tensorflow as tf

    c, channels = sampler.crop, data.in_channels
    train = sample_stream(
        sampler.sample, start, batch_size, ((c, c, channels), (c, c, 1)), ("float32", "uint8")
    )
    options = _data_options()
    if len(data.val_images) == 0:
        return train, None

    def to_float(image: Any, mask: Any) -> tuple[Any, Any]:
        image = tf.cast(image, tf.float32) / 255.0
        return (image[..., None] if data.val_images.ndim == 3 else image), mask[..., None]

    val = (
        tf.data.Dataset.from_tensor_slices((data.val_images, data.val_masks))
        .batch(batch_size)
        .map(to_float)
        .cache()
        .prefetch(tf.data.AUTOTUNE)
        .with_options(options)
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
    if n_classes < 2:
        raise ValueError(f"train_model: n_classes must be >= 2, got {n_classes}")
    if (init_weights is None) != (cfg.init_from is None):
        raise ValueError(
            "train_model: pass init_weights exactly when cfg.init_from is set "
            f"(init_from={cfg.init_from!r}, init_weights "
            f"{'missing' if init_weights is None else 'given'}); see initial_weights"
        )
    patches_dir, out_dir, checkpoint_dir = Path(patches_dir), Path(out_dir), Path(checkpoint_dir)
    data = load_patches(patches_dir, n_classes)
    _check_sizes(data, cfg)

    import keras

    from mitoseg.model import callbacks as mcb
    from mitoseg.model.losses import get_loss, get_metrics
    from mitoseg.model.unet import build_unet

    init = None if init_weights is None else [np.asarray(w) for w in init_weights]
    key = run_key(
        patches_dir, augment_spec, cfg, n_classes, seed, weights_digest(init) if init else None
    )
    backup_dir = checkpoint_dir / key
    prior = _read_resume_state(backup_dir)
    resumed = prior.epoch > 0
    if resumed:
        log.info("resuming run %s from epoch %d", key, prior.epoch)

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
        cfg.hard_negative_prob,
    )
    lr_min = min(cfg.min_lr, cfg.learning_rate)
    extra = list(callbacks or [])

    with op_determinism(cfg.deterministic):
        keras.utils.set_random_seed(seed)
        train_ds, val_ds = _datasets(data, sampler, prior.epoch * samples_per_epoch, cfg.batch_size)
        monitor = "val_loss" if val_ds is not None else "loss"

        learning_rate: Any = cfg.learning_rate
        if cfg.lr_schedule == "cosine" and cfg.max_train_seconds is None:
            total = cfg.epochs * steps
            warmup = min(round(cfg.warmup_fraction * total), total - 1)
            learning_rate = keras.optimizers.schedules.CosineDecay(
                lr_min if warmup else cfg.learning_rate,
                total - warmup,
                alpha=lr_min / cfg.learning_rate,
                warmup_target=cfg.learning_rate if warmup else None,
                warmup_steps=warmup,
            )
        strategy, mixed = _setup_devices(cfg)
        previous_policy = keras.config.dtype_policy()
        try:
            if mixed:
                keras.config.set_dtype_policy("mixed_float16")
            with strategy.scope():
                model = build_unet(cfg.model, n_classes, data.in_channels)
                model.compile(
                    optimizer=keras.optimizers.Adam(
                        learning_rate=learning_rate,
                        global_clipnorm=cfg.clipnorm,
                        use_ema=cfg.ema_momentum is not None,
                        ema_momentum=cfg.ema_momentum or 0.99,
                    ),
                    loss=get_loss(cfg.loss, n_classes, cfg.foreground_weight),
                    metrics=[*get_metrics(n_classes), _accuracy(n_classes)],
                )
        finally:
            keras.config.set_dtype_policy(previous_policy)
        if init is not None:
            _check_weights(model, init, cfg.init_from)
            if not resumed:
                model.set_weights(init)

        prior_best = _best(prior.rows, monitor)[1]
        timer = mcb.TimeBudget(cfg.max_train_seconds, prior.elapsed, backup_dir / _TIME_FILE)
        early = mcb.ResumableEarlyStopping(
            monitor=monitor,
            mode="min",
            # off: patience beyond the last epoch
            patience=cfg.early_stopping_patience or cfg.epochs + 1,
        )
        cbs: list[Any] = []
        if cfg.lr_schedule == "cosine" and cfg.max_train_seconds is not None:
            cbs.append(
                mcb.BudgetCosineDecay(
                    cfg.learning_rate,
                    lr_min,
                    cfg.epochs * steps,
                    cfg.max_train_seconds,
                    timer,
                    warmup_fraction=cfg.warmup_fraction,
                )
            )
        cbs += [
            mcb.EpochSeeds(),
            mcb.LearningRateLogger(),
            timer,
            mcb.HistoryCSVLogger(backup_dir / _HISTORY_FILE, HISTORY_COLUMNS),
        ]
        if cfg.precise_bn_batches and mcb.batch_norm_layers(model):

            def draw(epoch: int, b: int) -> np.ndarray:
                first = epoch * samples_per_epoch + b * cfg.batch_size
                return np.stack(
                    [sampler.sample(k)[0] for k in range(first, first + cfg.batch_size)]
                )

            cbs.append(mcb.PreciseBatchNorm(draw, cfg.precise_bn_batches, steps))
        if cfg.keep == "best":
            cbs.append(
                keras.callbacks.ModelCheckpoint(
                    str(backup_dir / _BEST_FILE),
                    monitor=monitor,
                    mode="min",
                    save_best_only=True,
                    save_weights_only=True,
                    initial_value_threshold=math.inf if prior_best is None else prior_best,
                )
            )
        cbs.append(early)
        if cfg.lr_schedule == "plateau":
            plateau = mcb.ResumableReduceLROnPlateau(
                monitor=monitor,
                mode="min",
                factor=cfg.reduce_lr_factor,
                patience=cfg.reduce_lr_patience,
                min_lr=cfg.min_lr,
            )
            plateau.restore(prior.rows, cfg.learning_rate)
            cbs.append(plateau)
        cbs.append(keras.callbacks.BackupAndRestore(str(backup_dir), delete_checkpoint=False))
        cbs.extend(extra)

        # An interrupted run may already have met its stopping condition: run no epoch.
        stopped_early_before = early.restore(prior.rows)
        budget_spent_before = resumed and timer.exhausted
        done = stopped_early_before or budget_spent_before or prior.epoch >= cfg.epochs
        for cb in extra:
            if callable(getattr(cb, "set_backup", None)):
                cb.set_backup(backup_id(backup_dir), [dict(r) for r in prior.rows])

        backup_dir.mkdir(parents=True, exist_ok=True)
        model.fit(
            train_ds,
            validation_data=val_ds,
            epochs=prior.epoch if done else cfg.epochs,
            steps_per_epoch=steps,
            callbacks=cbs,
            shuffle=False,
            verbose=2 if progress else 0,
        )

        rows = _read_history_csv(backup_dir / _HISTORY_FILE) or []
        best_epoch, _ = _best(rows, monitor)
        if cfg.keep == "last":  # the final (averaged, BN re-estimated) weights
            best_epoch = rows[-1]["epoch"] if rows else 0
        elif best_epoch is not None and (backup_dir / _BEST_FILE).is_file():
            model.load_weights(backup_dir / _BEST_FILE)
        else:  # no finite monitored value ever: keep the final weights
            best_epoch = rows[-1]["epoch"] if rows else 0
        # float32, uncompiled: what is saved
        export_model = build_unet(cfg.model, n_classes, data.in_channels)
        export_model.set_weights(model.get_weights())

    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "model.keras", suffix=".keras") as tmp:
        export_model.save(tmp)
    _write_history_csv(out_dir / "history.csv", rows)
    shutil.rmtree(backup_dir, ignore_errors=True)

    if timer.stopped or budget_spent_before:
        stop_reason = "time_budget"
    elif early.stopped_epoch > 0:
        stop_reason = "early_stopping"
    else:
        stop_reason = "completed"
    timed = timer.epoch_train_seconds
    if len(timed) > 1:  # the first epoch of a process includes tracing/compilation
        timed = timed[1:]
    seconds = sum(timed)
    pps = len(timed) * samples_per_epoch / seconds if seconds > 0 else 0.0
    return TrainResult(
        model_path=out_dir / "model.keras",
        history=[{c: r.get(c) for c in HISTORY_COLUMNS} for r in rows],
        best_epoch=int(best_epoch),
        epochs_run=len(rows),
        train_seconds=float(timer.prior_seconds),
        patches_per_second=float(pps),
        resumed=resumed,
        stop_reason=stop_reason,
        run_key=key,
    )
