"""Self-supervised pre-training on unlabelled slices: masked-square reconstruction.

A lab has far more raw slices than labelled ones. Before the few labelled slices are
seen, the UNet learns its volume's textures by filling in masked squares of random crops
of the raw slices (a convolutional masked-image model, as context encoders and SparK
pre-train CNNs): the input is an augmented crop whose squares (``square`` pixels, a
``mask_ratio`` share of them) are replaced by the crop's mean, the target the crop
itself, the loss the mean squared error on the masked pixels only. The network is the
segmentation UNet itself (:func:`mitoseg.model.unet.build_unet` with two classes: one
sigmoid output channel, here an intensity in ``[0, 1]``), so the pre-trained model is a
``train.init_from`` source as it is (:func:`mitoseg.train.initial_weights`).

The crop stream is a pure function of the element index (:class:`MaskedCropSampler`,
numpy only) fed through :func:`mitoseg.train_data.sample_stream`, and training runs with op
determinism: the same slices, settings and seed give the same weights, bit for bit, on a
given software stack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from mitoseg.augment import augment_pair, is_identity
from mitoseg.checks import check_array
from mitoseg.config import AugmentConfig, ModelConfig

if TYPE_CHECKING:
    import keras

__all__ = ["MaskedCropSampler", "PretrainResult", "masked_mse", "pretrain_model", "square_mask"]


def square_mask(size: int, square: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """A random mask of whole squares: ``round(ratio * n)`` of the ``n = (size / square)**2``
    grid squares, at least one.

    Args:
        size: side of the crop (a multiple of ``square``).
        square: side of one masked square.
        ratio: share of squares masked, in ``(0, 1)``.
        rng: source of randomness.

    Returns:
        ``(size, size)`` bool, True where masked.
    """
    cells = size // square
    n = cells * cells
    chosen = rng.choice(n, size=max(1, round(ratio * n)), replace=False)
    grid = np.zeros(n, dtype=bool)
    grid[chosen] = True
    return np.kron(grid.reshape(cells, cells), np.ones((square, square), dtype=bool))


class MaskedCropSampler:
    """Deterministic source of pre-training elements: element ``k`` -> (input, target).

    Element ``k`` takes slice ``k mod N`` of a per-round random permutation (every slice
    once per ``N`` elements), then a crop position, augmentation and mask from a generator
    seeded with ``(seed, k)``.

    Args:
        slices: ``(N, H, W) uint8`` network intensities (:func:`mitoseg.data.patches.to_uint8`
            of each raw slice).
        crop_size: crop side, a multiple of ``square``, at most ``H`` and ``W``.
        square: side of the masked squares.
        mask_ratio: share of squares masked, in ``(0, 1)``.
        augment: augmentation strengths (geometric and intensity), or None.
        seed: base seed.

    Raises:
        ValueError: bad shapes, dtype or settings (messages name the argument).
    """

    def __init__(
        self,
        slices: np.ndarray,
        crop_size: int,
        square: int,
        mask_ratio: float,
        augment: AugmentConfig | None,
        seed: int,
    ) -> None:
        arr = check_array(
            slices, "slices", ndim=3, axes={3: "(N, H, W)"}, dtypes=("uint8",), nonempty=True
        )
        if square < 1:
            raise ValueError(f"square must be >= 1, got {square}")
        if crop_size < square or crop_size % square:
            raise ValueError(f"crop_size ({crop_size}) must be a multiple of square ({square})")
        if crop_size > min(arr.shape[1:]):
            raise ValueError(
                f"crop_size ({crop_size}) exceeds the slices' shape {tuple(arr.shape[1:])}"
            )
        if not 0 < mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.slices = arr
        self.crop = int(crop_size)
        self.square = int(square)
        self.mask_ratio = float(mask_ratio)
        self.augment = None if augment is None or is_identity(augment) else augment
        self.seed = int(seed)

    def _slice_index(self, k: int) -> int:
        n = len(self.slices)
        rnd, i = divmod(k, n)
        return int(np.random.default_rng([self.seed, rnd, 0x55]).permutation(n)[i])

    def sample(self, k: int | np.integer) -> tuple[np.ndarray, np.ndarray]:
        """Pre-training element ``k``.

        Returns:
            ``(input (c, c, 1) float32 in [0, 1], target (c, c, 2) float32)``: the masked
            crop, and the clean crop (channel 0) with the mask as 0/1 weights (channel 1).
        """
        k = int(k)
        rng = np.random.default_rng([self.seed, k])
        image = self.slices[self._slice_index(k)]
        c = self.crop
        top = int(rng.integers(0, image.shape[0] - c + 1))
        left = int(rng.integers(0, image.shape[1] - c + 1))
        crop = image[top : top + c, left : left + c].astype(np.float32) / np.float32(255.0)
        if self.augment is not None:
            crop, _ = augment_pair(crop, np.zeros(crop.shape, np.uint8), rng, self.augment)
        hidden = square_mask(c, self.square, self.mask_ratio, rng)
        masked = np.where(hidden, np.float32(crop.mean()), crop).astype(np.float32)
        target = np.stack([crop, hidden.astype(np.float32)], axis=-1)
        return masked[..., None], target


def masked_mse(y_true: Any, y_pred: Any) -> Any:
    """Mean squared error over the masked pixels of each batch.

    Args:
        y_true: ``(B, H, W, 2)``: target intensity and 0/1 weight.
        y_pred: ``(B, H, W, 1)`` predicted intensity.

    Returns:
        Scalar: ``sum(w * (p - t)**2) / max(sum(w), 1)``.
    """
    from keras import ops

    target, weight = y_true[..., 0], y_true[..., 1]
    err = ops.square(y_pred[..., 0] - target) * weight
    return ops.sum(err) / ops.maximum(ops.sum(weight), 1.0)


@dataclass(frozen=True)
class PretrainResult:
    """Outcome of :func:`pretrain_model`.

    Attributes:
        model: the pre-trained UNet (float32, uncompiled weights of ``build_unet(cfg, 2)``).
        losses: masked MSE of each epoch (mean over its steps).
        steps: optimizer steps run.
        seconds: wall-clock seconds of ``fit``.
    """

    model: keras.Model
    losses: list[float]
    steps: int
    seconds: float


def pretrain_model(
    slices: np.ndarray,
    model_cfg: ModelConfig,
    *,
    epochs: int,
    steps_per_epoch: int = 50,
    batch_size: int = 8,
    crop_size: int = 128,
    square: int = 16,
    mask_ratio: float = 0.5,
    learning_rate: float = 1e-3,
    augment: AugmentConfig | None = None,
    seed: int = 42,
    progress: bool = True,
) -> PretrainResult:
    """Pre-train the UNet of ``model_cfg`` on unlabelled slices (masked reconstruction).

    Args:
        slices: ``(N, H, W) uint8`` network intensities of unlabelled slices.
        model_cfg: the architecture the segmentation run will use (``train.model``).
        epochs: epochs of ``steps_per_epoch`` optimizer steps (cosine learning rate over
            all of them).
        steps_per_epoch: steps per epoch (one loss value each).
        batch_size: crops per step.
        crop_size: crop side, a multiple of ``2**model_cfg.depth`` and of ``square``.
        square: side of the masked squares.
        mask_ratio: share of squares masked, in ``(0, 1)``.
        learning_rate: Adam's initial learning rate.
        augment: augmentation of the crops before masking, or None.
        seed: seeds the weights and the crop stream.
        progress: one line per epoch.

    Returns:
        :class:`PretrainResult`; save ``result.model`` as ``.keras`` to fine-tune from it.

    Raises:
        ValueError: bad arguments (named).
    """
    for name, value in (("epochs", epochs), ("steps_per_epoch", steps_per_epoch),
                        ("batch_size", batch_size)):  # fmt: skip
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
    divisor = 2**model_cfg.depth
    if crop_size % divisor:
        raise ValueError(f"crop_size ({crop_size}) must be a multiple of 2**depth ({divisor})")
    sampler = MaskedCropSampler(slices, crop_size, square, mask_ratio, augment, seed)
    import time

    import keras

    from mitoseg.model.unet import build_unet
    from mitoseg.train import op_determinism
    from mitoseg.train_data import sample_stream

    c = sampler.crop
    with op_determinism(True):
        keras.utils.set_random_seed(seed)
        stream = sample_stream(
            sampler.sample, 0, batch_size, ((c, c, 1), (c, c, 2)), ("float32", "float32")
        )
        model = build_unet(model_cfg, 2, 1)
        total = epochs * steps_per_epoch
        schedule = keras.optimizers.schedules.CosineDecay(learning_rate, total, alpha=0.01)
        model.compile(optimizer=keras.optimizers.Adam(learning_rate=schedule), loss=masked_mse)
        start = time.perf_counter()
        history = model.fit(
            stream, epochs=epochs, steps_per_epoch=steps_per_epoch, shuffle=False,
            verbose=2 if progress else 0,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        export = build_unet(model_cfg, 2, 1)
        export.set_weights(model.get_weights())
    losses = [float(v) for v in history.history["loss"]]
    if not all(math.isfinite(v) for v in losses):
        raise ValueError(f"pretrain_model: the loss diverged ({losses[-1]})")
    return PretrainResult(model=export, losses=losses, steps=total, seconds=round(seconds, 1))
