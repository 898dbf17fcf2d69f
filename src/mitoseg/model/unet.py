"""UNet builder: plain, residual and attention variants (Keras 3 functional API).

Only standard Keras layers are used, so a saved ``.keras`` file loads without custom
objects. Importing this module imports keras (and tensorflow): import it only from
training / inference code, never from CLI start-up paths.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import layers

from mitoseg.config import ModelConfig

__all__ = ["build_unet", "output_channels"]


def output_channels(n_classes: int) -> int:
    """Channels of the network output: 1 (sigmoid) for 2 classes, else ``n_classes``."""
    return 1 if n_classes == 2 else n_classes


def _conv_bn_act(x: Any, filters: int, cfg: ModelConfig, name: str, act: bool = True) -> Any:
    x = layers.Conv2D(
        filters,
        3,
        padding="same",
        use_bias=not cfg.batch_norm,
        kernel_initializer="he_normal",
        name=f"{name}_conv",
    )(x)
    if cfg.batch_norm:
        x = layers.BatchNormalization(name=f"{name}_bn")(x)
    if act:
        x = layers.Activation("relu", name=f"{name}_relu")(x)
    return x


def _conv_block(x: Any, filters: int, cfg: ModelConfig, name: str) -> Any:
    """Two 3x3 convolutions (with dropout between); residual variant adds a shortcut."""
    inp = x
    x = _conv_bn_act(x, filters, cfg, f"{name}_1")
    if cfg.dropout > 0:
        x = layers.Dropout(cfg.dropout, name=f"{name}_drop")(x)
    if cfg.variant != "residual":
        return _conv_bn_act(x, filters, cfg, f"{name}_2")
    x = _conv_bn_act(x, filters, cfg, f"{name}_2", act=False)
    shortcut = inp
    if inp.shape[-1] != filters:
        shortcut = layers.Conv2D(
            filters, 1, padding="same", use_bias=not cfg.batch_norm, name=f"{name}_proj"
        )(inp)
        if cfg.batch_norm:
            shortcut = layers.BatchNormalization(name=f"{name}_proj_bn")(shortcut)
    x = layers.Add(name=f"{name}_add")([x, shortcut])
    return layers.Activation("relu", name=f"{name}_relu")(x)


def _attention_gate(skip: Any, gate: Any, filters: int, name: str) -> Any:
    """Additive attention gate (Oktay et al. 2018): weight the skip by a [0, 1] map.

    Args:
        skip: encoder features ``(N, H, W, F)``.
        gate: decoder features at the same resolution ``(N, H, W, F)``.
        filters: channels of the skip.
        name: layer name prefix.

    Returns:
        ``skip * psi`` where ``psi (N, H, W, 1)`` = sigmoid(conv(relu(Wx*skip + Wg*gate))).
    """
    inter = max(1, filters // 2)
    theta = layers.Conv2D(inter, 1, name=f"{name}_theta")(skip)
    phi = layers.Conv2D(inter, 1, name=f"{name}_phi")(gate)
    a = layers.Activation("relu", name=f"{name}_relu")(layers.Add(name=f"{name}_add")([theta, phi]))
    psi = layers.Conv2D(1, 1, activation="sigmoid", name=f"{name}_psi")(a)
    return layers.Multiply(name=f"{name}_gate")([skip, psi])


def build_unet(cfg: ModelConfig, n_classes: int, input_channels: int = 1) -> keras.Model:
    """Build an (uncompiled) UNet.

    Encoder: ``cfg.depth`` levels of conv blocks with ``base_filters * 2**level`` filters
    and 2x2 max pooling; bottleneck with ``base_filters * 2**depth``; decoder: 2x2 stride-2
    transposed convolutions, concatenation with the (optionally attention-gated) skip,
    conv block. ``seed`` preset (depth 4, base 64) has ~31M parameters, ``default``
    (depth 4, base 16) ~1.9M.

    Args:
        cfg: architecture (depth, base_filters, batch_norm, dropout, variant).
        n_classes: classes including background (>= 2).
        input_channels: channels of the input image.

    Returns:
        Model with input ``(N, H, W, input_channels) float32`` in ``[0, 1]`` (H, W any
        multiple of ``2**depth``) and output ``(N, H, W, 1)`` sigmoid probability for
        ``n_classes == 2``, else ``(N, H, W, n_classes)`` softmax; the output layer is
        float32 even under a mixed-precision policy.

    Raises:
        ValueError: ``n_classes < 2`` or ``input_channels < 1``.
    """
    if n_classes < 2:
        raise ValueError(f"build_unet: n_classes must be >= 2, got {n_classes}")
    if input_channels < 1:
        raise ValueError(f"build_unet: input_channels must be >= 1, got {input_channels}")
    inputs = keras.Input(shape=(None, None, input_channels), name="image")
    x = inputs
    skips: list[Any] = []
    for level in range(cfg.depth):
        x = _conv_block(x, cfg.base_filters * 2**level, cfg, f"enc{level}")
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"enc{level}_pool")(x)
    x = _conv_block(x, cfg.base_filters * 2**cfg.depth, cfg, "bottleneck")
    for level in reversed(range(cfg.depth)):
        filters = cfg.base_filters * 2**level
        x = layers.Conv2DTranspose(filters, 2, strides=2, padding="same", name=f"dec{level}_up")(x)
        skip = skips[level]
        if cfg.variant == "attention":
            skip = _attention_gate(skip, x, filters, f"dec{level}_att")
        x = layers.Concatenate(name=f"dec{level}_concat")([x, skip])
        x = _conv_block(x, filters, cfg, f"dec{level}")
    channels = output_channels(n_classes)
    outputs = layers.Conv2D(
        channels,
        1,
        activation="sigmoid" if channels == 1 else "softmax",
        dtype="float32",
        name="probabilities",
    )(x)
    name = f"unet_{cfg.variant}_d{cfg.depth}_f{cfg.base_filters}"
    return keras.Model(inputs, outputs, name=name)
