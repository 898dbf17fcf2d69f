"""How the segmentation UNet is compiled for training (:func:`mitoseg.train.train_model`).

The devices (distribution strategy, mixed precision on a GPU), Adam's learning-rate
schedule, the loss and the metrics. Importing this module imports nothing heavy; its
functions import keras and tensorflow.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from mitoseg.config import TrainConfig

if TYPE_CHECKING:
    import keras

__all__ = ["compile_unet", "learning_rate_schedule", "setup_devices"]

log = logging.getLogger(__name__)


def setup_devices(cfg: TrainConfig) -> tuple[Any, bool]:
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


def learning_rate_schedule(cfg: TrainConfig, steps: int) -> Any:
    """Adam's learning rate.

    Args:
        cfg: the training recipe (``lr_schedule``, ``learning_rate``, ``min_lr``,
            ``warmup_fraction``, ``epochs``, ``max_train_seconds``).
        steps: optimizer steps per epoch.

    Returns:
        Keras' ``CosineDecay`` (linear warm-up over ``warmup_fraction`` of the
        ``epochs * steps`` steps, then down to ``min_lr``) for the cosine schedule without
        a time budget; else the float ``cfg.learning_rate`` (plateau or constant schedule;
        under a time budget :class:`~mitoseg.model.callbacks.BudgetCosineDecay` sets it).
    """
    import keras

    if cfg.lr_schedule != "cosine" or cfg.max_train_seconds is not None:
        return cfg.learning_rate
    lr_min = min(cfg.min_lr, cfg.learning_rate)
    total = cfg.epochs * steps
    warmup = min(round(cfg.warmup_fraction * total), total - 1)
    return keras.optimizers.schedules.CosineDecay(
        lr_min if warmup else cfg.learning_rate,
        total - warmup,
        alpha=lr_min / cfg.learning_rate,
        warmup_target=cfg.learning_rate if warmup else None,
        warmup_steps=warmup,
    )


def compile_unet(
    cfg: TrainConfig, n_classes: int, in_channels: int, learning_rate: Any
) -> keras.Model:
    """Build the UNet for training and compile it.

    Args:
        cfg: the training recipe (``model``, ``mixed_precision``, ``distribute``,
            ``clipnorm``, ``ema_momentum``, ``loss``, ``foreground_weight``).
        n_classes: classes including background.
        in_channels: input channels (1, or ``2k + 1`` for 2.5D context).
        learning_rate: from :func:`learning_rate_schedule`.

    Returns:
        The model, built in the distribution strategy's scope (``mixed_float16`` when a GPU
        allows it; the global dtype policy is restored afterwards), compiled with Adam
        (global clip norm, optional EMA), the configured loss, IoU/Dice and the pixel
        accuracy (``accuracy``: binary p >= 0.5, multiclass argmax, labelled pixels).
    """
    import keras

    from mitoseg.model.losses import PixelAccuracy, get_loss, get_metrics
    from mitoseg.model.unet import build_unet

    strategy, mixed = setup_devices(cfg)
    previous_policy = keras.config.dtype_policy()
    try:
        if mixed:
            keras.config.set_dtype_policy("mixed_float16")
        with strategy.scope():
            model = build_unet(cfg.model, n_classes, in_channels)
            model.compile(
                optimizer=keras.optimizers.Adam(
                    learning_rate=learning_rate,
                    global_clipnorm=cfg.clipnorm,
                    use_ema=cfg.ema_momentum is not None,
                    ema_momentum=cfg.ema_momentum or 0.99,
                ),
                loss=get_loss(cfg.loss, n_classes, cfg.foreground_weight),
                metrics=[*get_metrics(n_classes), PixelAccuracy(n_classes)],
            )
    finally:
        keras.config.set_dtype_policy(previous_policy)
    return model
