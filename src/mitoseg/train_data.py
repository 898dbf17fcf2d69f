"""What the network sees in training: patch arrays, random crops and the tf.data stream.

:class:`PatchData` and :func:`load_patches` read the patchify stage's arrays;
:class:`CropSampler` turns them into a deterministic stream of augmented crops (element
``k`` of epoch ``k // samples_per_epoch`` from a generator seeded with ``(seed, epoch,
index)``, so a resumed run sees the same data); :func:`sample_stream` runs it in
``tf.data``. The numpy parts do not import tensorflow. :func:`mitoseg.train.train_model`
composes them with the fit loop.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mitoseg.augment import augment_pair, is_identity
from mitoseg.config import AugmentConfig, TrainConfig
from mitoseg.io import DataError
from mitoseg.labels import IGNORE_INDEX, has_labels, labelled

if TYPE_CHECKING:
    from mitoseg.model.mining import MinedNegatives

__all__ = [
    "CropSampler",
    "PatchData",
    "check_sizes",
    "datasets",
    "load_patches",
    "mined_lag",
    "sample_stream",
    "stream_lookahead",
]


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
        mined: with ``hard_negative_source: mined``, the model's own confident false
            positives (:mod:`mitoseg.model.mining`): once the epoch has candidates, a
            hard-negative crop is centred on one of them, drawn uniformly over all patches,
            instead of on dark background; ``None``: the dark rule throughout.

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
        mined: MinedNegatives | None = None,
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
        self.mined = mined
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
                cands = None if self.mined is None else self.mined.for_epoch(epoch)
                if cands is not None and cands.size:
                    idx, flat = divmod(int(cands[rng.integers(cands.size)]), size * size)
                    image, mask = self.images[idx], self.masks[idx]
                    top, left = self._centre_on(np.array([flat]), rng, size)
                else:
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


def check_sizes(data: PatchData, cfg: TrainConfig) -> None:
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


#: Crops computed at once by a bounded stream (``sample_stream(bounded=True)``): fixed,
#: not the machine's core count, so the lookahead (and the mining lag it sets) is the same
#: on every machine and a run resumed elsewhere sees the same crops.
BOUNDED_PARALLEL_CALLS = 4


def stream_lookahead(batch_size: int) -> int:
    """A bound on how many elements a bounded :func:`sample_stream` computes ahead of the
    last one consumed: the map's buffer (in flight and done, at most its parallel calls),
    the batch being filled and the one prefetched batch, each counted three times for
    slack (``tests/unit/test_mining.py`` checks the bound on a real stream)."""
    return 3 * BOUNDED_PARALLEL_CALLS + 3 * batch_size + 1


def mined_lag(samples_per_epoch: int, batch_size: int) -> int:
    """Epochs between a mining and the crops that read it
    (:class:`mitoseg.model.mining.MinedNegatives`' ``lag``) for the bounded stream of
    ``batch_size``: ``max(2, 1 + ceil(stream_lookahead(batch_size) / samples_per_epoch))``,
    so a crop never waits for a mining that needs crops behind it; 2 for any epoch longer
    than the lookahead.

    Raises:
        ValueError: ``samples_per_epoch < 1`` or ``batch_size < 1``.
    """
    if samples_per_epoch < 1 or batch_size < 1:
        raise ValueError(
            f"mined_lag: need samples_per_epoch >= 1 and batch_size >= 1; got "
            f"{samples_per_epoch}, {batch_size}"
        )
    return max(2, 1 + -(-stream_lookahead(batch_size) // samples_per_epoch))


def _data_options(bounded: bool = False) -> Any:
    import tensorflow as tf

    options = tf.data.Options()
    options.deterministic = True
    # its own threads: the crop/augment map stays parallel with one inter-op thread
    options.threading.private_threadpool_size = max(2, os.cpu_count() or 1)
    if bounded:  # no buffer that tf.data would grow or add on its own
        options.autotune.enabled = False
        options.experimental_optimization.inject_prefetch = False
    return options


def sample_stream(
    sample: Callable[[int], tuple[np.ndarray, np.ndarray]],
    start: int,
    batch_size: int,
    shapes: tuple[tuple[int, ...], tuple[int, ...]],
    dtypes: tuple[str, str],
    bounded: bool = False,
) -> Any:
    """Infinite ``tf.data`` stream of batches of ``sample(k)`` for ``k = start, start+1 ...``.

    Args:
        sample: pure function of the element index ``k`` -> ``(input, target)`` numpy
            arrays (e.g. :meth:`CropSampler.sample`); run in parallel, order kept.
        start: index of the first element (a resumed run skips the elements it saw).
        batch_size: elements per batch.
        shapes: ``(input shape, target shape)`` of one element.
        dtypes: ``(input dtype, target dtype)`` names, e.g. ``("float32", "uint8")``.
        bounded: compute at most :func:`stream_lookahead` elements ahead of the consumer
            (:data:`BOUNDED_PARALLEL_CALLS` at once, one batch prefetched) instead of
            letting ``tf.data`` tune its buffers: needed when ``sample`` may wait for
            something the consumer produces later (mined hard negatives), so that a wait
            can never hold back the elements the consumer needs first.

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

    parallel, prefetch = (BOUNDED_PARALLEL_CALLS, 1) if bounded else (tf.data.AUTOTUNE,) * 2
    return (
        tf.data.Dataset.range(start, np.iinfo(np.int64).max)
        .map(load, num_parallel_calls=parallel, deterministic=True)
        .batch(batch_size, drop_remainder=True)
        .prefetch(prefetch)
        .with_options(_data_options(bounded))
    )


def datasets(
    data: PatchData, sampler: CropSampler, start: int, batch_size: int
) -> tuple[Any, Any | None]:
    import tensorflow as tf

    c, channels = sampler.crop, data.in_channels
    train = sample_stream(
        sampler.sample,
        start,
        batch_size,
        ((c, c, channels), (c, c, 1)),
        ("float32", "uint8"),
        bounded=sampler.mined is not None,
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
