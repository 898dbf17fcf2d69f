"""UNet builder: parameter counts, shapes, variants, dtypes, serialisation."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from mitoseg.config import TRAIN_PRESETS, ModelConfig
from mitoseg.model import build_unet, output_channels

TINY = {"depth": 2, "base_filters": 4}


def test_preset_parameter_counts():
    seed = build_unet(ModelConfig(**TRAIN_PRESETS["seed"]["model"]), 2)
    default = build_unet(ModelConfig(**TRAIN_PRESETS["default"]["model"]), 2)
    # Reference UNet (64..1024 filters, transposed convs): ~31M; default is 1/16 of it.
    assert seed.count_params() == 31_048_257
    assert default.count_params() == 1_945_233
    assert seed.input_shape == (None, None, None, 1)


@pytest.mark.parametrize("variant", ["plain", "residual", "attention"])
@pytest.mark.parametrize("n_classes", [2, 4])
def test_shapes_and_probabilities(variant, n_classes):
    model = build_unet(ModelConfig(variant=variant, **TINY), n_classes)
    channels = output_channels(n_classes)
    x = np.random.default_rng(0).random((2, 32, 48, 1), dtype=np.float32)
    y = model.predict(x, verbose=0)
    assert y.shape == (2, 32, 48, channels)
    assert y.dtype == np.float32
    assert ((y >= 0) & (y <= 1)).all()
    if n_classes > 2:
        np.testing.assert_allclose(y.sum(axis=-1), 1.0, atol=1e-5)
    assert model.layers[-1].get_config()["activation"] == (
        "sigmoid" if n_classes == 2 else "softmax"
    )


def test_variants_have_their_blocks():
    names = {
        v: [layer.name for layer in build_unet(ModelConfig(variant=v, **TINY), 2).layers]
        for v in ("plain", "residual", "attention")
    }
    assert not any(n.endswith("_add") or n.endswith("_gate") for n in names["plain"])
    assert sum(n.endswith("_add") for n in names["residual"]) == 2 * 2 + 1  # enc+dec+bottleneck
    assert sum(n.endswith("_gate") for n in names["attention"]) == 2  # one per skip
    counts = {v: build_unet(ModelConfig(variant=v, **TINY), 2).count_params() for v in names}
    assert counts["plain"] < counts["attention"] and counts["plain"] < counts["residual"]


def test_depth_filters_batchnorm_dropout():
    model = build_unet(ModelConfig(depth=3, base_filters=8, batch_norm=False, dropout=0.0), 2)
    kinds = [type(layer).__name__ for layer in model.layers]
    assert "BatchNormalization" not in kinds and "Dropout" not in kinds
    assert kinds.count("MaxPooling2D") == 3
    assert model.get_layer("bottleneck_1_conv").filters == 8 * 2**3
    with_bn = build_unet(ModelConfig(depth=3, base_filters=8, dropout=0.2), 2)
    kinds = [type(layer).__name__ for layer in with_bn.layers]
    assert kinds.count("Dropout") == 3 + 1 + 3 and "BatchNormalization" in kinds


def test_output_is_float32_under_mixed_precision():
    previous = keras.config.dtype_policy()
    try:
        keras.config.set_dtype_policy("mixed_float16")
        model = build_unet(ModelConfig(**TINY), 3)
    finally:
        keras.config.set_dtype_policy(previous)
    assert model.get_layer("enc0_1_conv").compute_dtype == "float16"
    assert model.get_layer("probabilities").compute_dtype == "float32"
    assert model.output.dtype == "float32"


def test_saved_model_loads_without_custom_objects(tmp_path):
    model = build_unet(ModelConfig(variant="attention", **TINY), 2)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    x = np.random.default_rng(1).random((1, 16, 16, 1), dtype=np.float32)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


def test_errors():
    with pytest.raises(ValueError, match="build_unet: n_classes must be >= 2, got 1"):
        build_unet(ModelConfig(**TINY), 1)
    with pytest.raises(ValueError, match="build_unet: input_channels must be >= 1, got 0"):
        build_unet(ModelConfig(**TINY), 2, input_channels=0)
    three = build_unet(ModelConfig(**TINY), 2, input_channels=3)
    assert three.input_shape == (None, None, None, 3)


def test_a_25d_network_gets_a_25d_plan_and_mismatches_are_refused():
    from mitoseg.model.analysis import check_plan_matches, default_plan, z_context_of

    cfg = ModelConfig(depth=2, base_filters=4)
    model = build_unet(cfg, 2, input_channels=3)
    plan = default_plan(model)
    assert (plan.z_context, plan.in_channels) == (1, 3)
    check_plan_matches(model, plan, "here")
    with pytest.raises(
        ValueError,
        match=r"^here: the inference plan gives the model 1 input channel\(s\) \(z_context 0\) "
        r"but the model takes 3$",
    ):
        check_plan_matches(model, plan.with_overrides(z_context=0), "here")
    with pytest.raises(ValueError, match=r"^the model takes 2 input channels; a 2\.5D model"):
        z_context_of(build_unet(cfg, 2, input_channels=2))


@pytest.mark.parametrize("depth", [1, 3])
def test_divisor_of_a_unet_and_of_an_ensemble_of_unets(depth):
    from mitoseg.model.analysis import model_divisor

    members = [build_unet(ModelConfig(depth=depth, base_filters=2), 2) for _ in range(3)]
    for i, member in enumerate(members):
        member.name = f"member_{i}"  # unique names inside one model
    inputs = keras.Input(shape=(None, None, 1))
    ensemble = keras.Model(inputs, keras.layers.Average()([m(inputs) for m in members]))
    # the members are branches beside each other: the deepest counts, not their sum
    assert model_divisor(members[0]) == 2**depth
    assert model_divisor(ensemble) == 2**depth
