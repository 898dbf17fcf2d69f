"""Tiny Keras models for command-line tests (no training)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["save_sigmoid_model"]


def save_sigmoid_model(root: Path, name: str = "binary") -> Path:
    """Save ``sigmoid(8 x - 4)`` (one 1 x 1 convolution: normalised intensity 1 -> 0.98,
    0 -> 0.02) as ``root/NAME.keras`` with its inference plan (32-pixel tiles, halo 4,
    threshold 0.5) beside it; returns the model's path."""
    import keras

    from mitoseg.inference.plan import InferencePlan

    inp = keras.Input((None, None, 1))
    out = keras.layers.Conv2D(
        1,
        1,
        activation="sigmoid",
        kernel_initializer=keras.initializers.Constant(8.0),
        bias_initializer=keras.initializers.Constant(-4.0),
    )(inp)
    path = root / f"{name}.keras"
    keras.Model(inp, out).save(path)
    InferencePlan.default_for(1, 1, tile_size=32, halo=4, source="evaluate").write(
        root / f"{name}.inference_plan.json"
    )
    return path
