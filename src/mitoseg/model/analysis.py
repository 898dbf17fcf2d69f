"""Properties of a trained network that the inference plan records.

* :func:`receptive_field` measures how far an input pixel reaches into the output, by
  an impulse: two inputs that differ in one pixel give outputs that differ exactly
  inside the receptive field. It works on any :data:`mitoseg.inference.predict.PredictBatch`,
  so it is tested with predictors whose receptive field is known by construction.
* :func:`halo_for` turns a measured receptive field into the tile halo.
* :func:`model_divisor` and :func:`flops_per_pixel` read a Keras model's structure.

Keras is imported inside the functions that need it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = [
    "ReceptiveField",
    "check_plan_matches",
    "default_plan",
    "flops_per_pixel",
    "halo_for",
    "model_divisor",
    "receptive_field",
]

PredictBatch = Callable[[np.ndarray], np.ndarray]


class ReceptiveField(dict):
    """``{"full": int, "effective": int, "probe": int}``: odd side lengths in pixels.

    ``full`` is the side of the square where the output changes at all; ``effective``
    the side of the square holding ``energy`` of the total absolute change.
    """


def receptive_field(
    predict_batch: PredictBatch,
    *,
    probe: int = 512,
    energy: float = 0.99,
    seed: int = 0,
    channels: int = 1,
) -> ReceptiveField:
    """Measure the receptive field with a one-pixel impulse.

    A random ``(probe, probe, channels)`` image in ``[0, 1]`` and a copy whose centre pixel
    is inverted (``1 - v``, every channel) are predicted; the output channels' absolute
    differences are summed. ``full`` is ``2 r + 1`` for the largest Chebyshev distance
    ``r`` of a changed output pixel from the centre; ``effective`` the smallest such square
    holding ``energy`` of the summed change.

    Args:
        predict_batch: ``(B, T, T, channels) float32 -> (B, T, T, C) float32``.
        probe: probe image side (a multiple of the network divisor), larger than the
            receptive field for ``full`` to be exact (else it is capped at ``probe``).
        energy: fraction of the change inside the effective field, in ``(0, 1]``.
        seed: random seed of the probe image.
        channels: input channels of the network (``2k + 1`` for 2.5D).

    Returns:
        :class:`ReceptiveField`.

    Raises:
        ValueError: ``probe < 3`` or ``energy`` outside ``(0, 1]``.
    """
    if probe < 3:
        raise ValueError(f"receptive_field: probe must be >= 3, got {probe}")
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"receptive_field: energy must be in (0, 1], got {energy}")
    rng = np.random.default_rng(seed)
    base = rng.random((probe, probe, channels), dtype=np.float32)
    c = probe // 2
    hit = base.copy()
    hit[c, c] = 1.0 - hit[c, c]
    out = np.asarray(predict_batch(np.stack([base, hit])), dtype=np.float64)
    diff = np.abs(out[1] - out[0]).sum(axis=-1)
    yy, xx = np.nonzero(diff)
    if yy.size == 0:
        return ReceptiveField(full=1, effective=1, probe=probe)
    dist = np.maximum(np.abs(yy - c), np.abs(xx - c))
    full_r = int(dist.max())
    weights = diff[yy, xx]
    order = np.argsort(dist, kind="stable")
    cum = np.cumsum(weights[order])
    idx = int(np.searchsorted(cum, energy * cum[-1] * (1 - 1e-12)))
    eff_r = int(dist[order][min(idx, len(order) - 1)])
    return ReceptiveField(full=2 * full_r + 1, effective=2 * eff_r + 1, probe=probe)


def halo_for(field: int, divisor: int = 8) -> int:
    """Tile halo for a receptive field of side ``field``: half of it, rounded up to a
    multiple of ``divisor`` (so a pixel kept from a tile sees its whole field).

    Raises:
        ValueError: ``field < 1`` or ``divisor < 1``.
    """
    if field < 1 or divisor < 1:
        raise ValueError(f"halo_for: need field >= 1 and divisor >= 1, got {field}, {divisor}")
    return int(math.ceil((field // 2) / divisor) * divisor)


def model_divisor(model: Any) -> int:
    """``2**depth`` of a UNet-like Keras model: 2 to the number of 2x down-sampling layers.

    Tiles fed to the model must have a side divisible by this. A model nested inside it
    counts as a branch beside the others, as the members of a seed ensemble (one input,
    the mean of the members' outputs) are: the deepest member counts, not their sum.
    """
    import keras

    pools = (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D)

    def count(m: Any) -> int:
        layers = getattr(m, "layers", [])
        own = sum(isinstance(layer, pools) for layer in layers)
        return own + max((count(layer) for layer in layers if hasattr(layer, "layers")), default=0)

    return 2 ** count(model)


def flops_per_pixel(model: Any, probe: int = 256) -> float:
    """Multiply-add operations x 2 of the model's convolutions per input pixel.

    Counts ``Conv2D`` and ``Conv2DTranspose`` layers of a functional Keras model on a
    ``(1, probe, probe, C)`` input (other layers are cheap in comparison).

    Args:
        model: functional Keras model with one image input.
        probe: side of the probe input (a multiple of the model's divisor).

    Returns:
        FLOPs per input pixel (float).
    """
    import keras

    convs = [
        layer
        for layer in model.layers
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Conv2DTranspose))
    ]
    if not convs:
        return 0.0
    probe_model = keras.Model(model.inputs, [layer.output for layer in convs])
    channels = int(model.input_shape[-1])
    specs = probe_model.compute_output_spec(keras.KerasTensor((1, probe, probe, channels)))
    if not isinstance(specs, (list, tuple)):
        specs = [specs]
    total = 0.0
    for layer, spec in zip(convs, specs, strict=True):
        kh, kw, a, b = (int(v) for v in layer.kernel.shape)
        # Conv2D kernels are (kh, kw, in, out); Conv2DTranspose (kh, kw, out, in).
        _, h, w, _ = spec.shape
        macs = kh * kw * a * b * int(h) * int(w)
        if isinstance(layer, keras.layers.Conv2DTranspose):
            sh, sw = layer.strides  # each input pixel is visited once, not each output
            macs /= sh * sw
        total += 2.0 * macs
    return total / float(probe * probe)


def default_plan(model: Any, class_names: list[str] | None = None) -> Any:
    """:meth:`InferencePlan.default_for` a Keras model: output channels, divisor and
    FLOPs per pixel read from the network; threshold 0.5 (``source="default"``)."""
    from mitoseg.inference.plan import InferencePlan

    divisor = model_divisor(model)
    return InferencePlan.default_for(
        int(model.output_shape[-1]),
        divisor,
        class_names,
        z_context=z_context_of(model),
        flops_per_pixel=flops_per_pixel(model, probe=max(256, divisor)) or None,
    )


def z_context_of(model: Any) -> int:
    """Slices of context on each side a 2.5D network expects: ``(C_in - 1) / 2``.

    Raises:
        ValueError: an even number of input channels (not a centred slice window).
    """
    channels = int(model.input_shape[-1])
    if channels % 2 == 0:
        raise ValueError(
            f"the model takes {channels} input channels; a 2.5D model takes an odd number "
            "(the slice and k neighbours on each side)"
        )
    return (channels - 1) // 2


def check_plan_matches(model: Any, plan: Any, where: str) -> None:
    """Raise ``ValueError`` (naming ``where``) when a plan does not fit the network:
    other output channels or another divisor."""
    channels = int(model.output_shape[-1])
    if channels != plan.out_channels:
        raise ValueError(
            f"{where}: the inference plan is for {plan.n_classes} classes "
            f"({plan.out_channels} output channel(s)) but the model outputs {channels}"
        )
    divisor = model_divisor(model)
    if divisor != plan.divisor:
        raise ValueError(
            f"{where}: the inference plan says divisor {plan.divisor} but the model "
            f"down-samples by {divisor}"
        )
    inputs = int(model.input_shape[-1])
    if inputs != plan.in_channels:
        raise ValueError(
            f"{where}: the inference plan gives the model {plan.in_channels} input "
            f"channel(s) (z_context {plan.z_context}) but the model takes {inputs}"
        )
