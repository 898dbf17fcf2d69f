"""Inference engines on a small real Keras UNet: agreement with Keras FP32, the batch
contract (shapes, dtype, varying tile sizes), determinism and the error paths.

Every engine of :data:`mitoseg.inference.runtime.ENGINES` is exercised: those that run here are
compared against Keras FP32, those that do not (e.g. bf16 on a CPU without BF16) must be
refused with the exact message.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from mitoseg.config import ModelConfig
from mitoseg.inference.plan import InferencePlan
from mitoseg.inference.runtime import (
    ENGINES,
    available_engines,
    compile_predictor,
    export_openvino,
    predictor_for_plan,
    predictor_from_openvino,
)

#: Largest (mean, max) absolute probability difference to Keras FP32 per precision. INT8's
#: single worst pixel depends on the CPU's int8 kernels (AVX-512 VNNI or AVX2): on this
#: untrained net and noise input, mean 0.014 and max 0.117 on a 2-core AMD EPYC, so the
#: mean is held tight and the max only guards against gross errors.
TOLERANCE = {"fp32": (1e-5, 1e-5), "bf16": (0.05, 0.05), "int8": (0.03, 0.2)}
#: Tile shapes fed in turn to one predictor (multiples of the tiny net's divisor 4).
SHAPES = [(1, 32, 32), (2, 16, 48), (3, 64, 20), (1, 32, 32)]

AVAILABLE = available_engines()
OPENVINO = [e for e in ENGINES if e[0] == "openvino"]


def _assert_close(out: np.ndarray, ref: np.ndarray, precision: str, where: str) -> None:
    """``out`` within :data:`TOLERANCE` of the Keras FP32 ``ref`` (same shape, float32)."""
    diff = np.abs(out - ref)
    mean, most = TOLERANCE[precision]
    assert diff.mean() <= mean, f"{where}: mean abs diff {diff.mean()}"
    assert diff.max() <= most, f"{where}: max abs diff {diff.max()}"


def _known() -> str:
    return ", ".join(f"{r}/{p}" for r, p in AVAILABLE)


def _batch(b: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((b, h, w, 1), dtype=np.float32)


def _net(n_classes: int = 2, seed: int = 0) -> Any:
    import keras

    from mitoseg.model.unet import build_unet

    keras.utils.set_random_seed(seed)
    cfg = ModelConfig(depth=2, base_filters=4, batch_norm=True, dropout=0.1)
    return build_unet(cfg, n_classes=n_classes)


@pytest.fixture(scope="module")
def net() -> Any:
    return _net()


@pytest.fixture(scope="module")
def calibration() -> np.ndarray:
    """Four (H, W) float32 images in [0, 1] of a size not a multiple of the divisor."""
    rng = np.random.default_rng(1)
    return rng.random((4, 38, 45), dtype=np.float32)


@pytest.fixture(scope="module")
def reference(net: Any) -> Any:
    return compile_predictor(net, "keras", "fp32")


@pytest.fixture(scope="module")
def predictors(net: Any, calibration: np.ndarray) -> dict[tuple[str, str], Any]:
    """One compiled predictor per engine that runs here (compiled once per module)."""
    return {e: compile_predictor(net, *e, calibration=calibration) for e in AVAILABLE}


def test_engines_list_keras_first_and_available_is_a_subset() -> None:
    assert ENGINES[0] == ("keras", "fp32")
    assert len(set(ENGINES)) == len(ENGINES)
    assert AVAILABLE[0] == ("keras", "fp32")
    assert set(AVAILABLE) <= set(ENGINES)
    plan_runtimes = set(InferencePlan.model_fields["runtime"].annotation.__args__)
    plan_precisions = set(InferencePlan.model_fields["precision"].annotation.__args__)
    assert {r for r, _ in ENGINES} == plan_runtimes
    assert {p for _, p in ENGINES} <= plan_precisions


@pytest.mark.parametrize("engine", ENGINES, ids=[f"{r}-{p}" for r, p in ENGINES])
def test_engine_matches_keras_fp32_on_varying_tile_shapes(
    engine: tuple[str, str], net: Any, reference: Any, predictors: dict, calibration: np.ndarray
) -> None:
    if engine not in AVAILABLE:  # a known engine that this machine cannot run is refused
        with pytest.raises(ValueError) as info:
            compile_predictor(net, *engine, calibration=calibration)
        assert str(info.value).startswith(f"inference engine {engine[0]}/{engine[1]} is not ")
        assert str(info.value).endswith(f"; use {_known()}")
        return
    predict = predictors[engine]
    for i, (b, h, w) in enumerate(SHAPES):
        x = _batch(b, h, w, seed=i)
        out = predict(x)
        assert isinstance(out, np.ndarray)
        assert out.shape == (b, h, w, 1) and out.dtype == np.float32
        assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0
        _assert_close(out, reference(x), engine[1], f"{engine} at {x.shape}")


@pytest.mark.parametrize("engine", AVAILABLE, ids=[f"{r}-{p}" for r, p in AVAILABLE])
def test_engine_is_deterministic_across_calls_and_shapes(
    engine: tuple[str, str], predictors: dict
) -> None:
    predict = predictors[engine]
    x = _batch(2, 48, 32, seed=7)
    first = predict(x)
    predict(_batch(1, 16, 16, seed=8))  # another shape in between
    second = predict(x)
    np.testing.assert_array_equal(first, second)
    # OpenVINO: a tile's output does not depend on the other tiles of its batch (the
    # service batches tiles of concurrent requests); TensorFlow differs in the last bits.
    if engine[0] == "openvino":
        np.testing.assert_array_equal(predict(x[1:]), first[1:])
    else:
        np.testing.assert_allclose(predict(x[1:]), first[1:], rtol=0, atol=1e-6)


@pytest.mark.parametrize("engine", OPENVINO, ids=[f"{r}-{p}" for r, p in OPENVINO])
def test_a_fresh_compile_gives_identical_outputs(
    engine: tuple[str, str], net: Any, predictors: dict, calibration: np.ndarray
) -> None:
    """What ``mitoseg predict`` and the service compile separately agrees bit for bit."""
    if engine not in AVAILABLE:
        pytest.skip(f"{engine[0]}/{engine[1]} does not run on this machine")
    again = compile_predictor(net, *engine, calibration=calibration, threads=1)
    x = _batch(1, 32, 48, seed=3)
    np.testing.assert_array_equal(again(x), predictors[engine](x))


def test_multiclass_softmax_model_on_openvino_matches_keras() -> None:
    net = _net(n_classes=3, seed=2)
    x = _batch(2, 32, 16, seed=4)
    ref = compile_predictor(net)(x)
    out = compile_predictor(net, "openvino", "fp32")(x)
    assert out.shape == (2, 32, 16, 3) and out.dtype == np.float32
    _assert_close(out, ref, "fp32", "openvino/fp32 softmax")
    np.testing.assert_allclose(out.sum(axis=-1), 1.0, atol=1e-5)


def test_predictor_for_plan_runs_the_plans_engine(net: Any, predictors: dict) -> None:
    plan = InferencePlan.default_for(1, 4, runtime="openvino", precision="fp32")
    x = _batch(1, 16, 32, seed=5)
    np.testing.assert_array_equal(
        predictor_for_plan(net, plan)(x), predictors[("openvino", "fp32")](x)
    )
    keras_plan = InferencePlan.default_for(1, 4)
    np.testing.assert_array_equal(predictor_for_plan(net, keras_plan)(x), net.predict_on_batch(x))


@pytest.mark.parametrize("engine", OPENVINO, ids=[f"{r}-{p}" for r, p in OPENVINO])
def test_the_saved_openvino_model_gives_identical_outputs_without_tensorflow(
    engine: tuple[str, str], net: Any, predictors: dict, calibration: np.ndarray, tmp_path: Any
) -> None:
    """What the service's runner compiles from the model saved at import (no TensorFlow)
    agrees bit for bit with what ``mitoseg predict`` compiles from the Keras model."""
    if engine not in AVAILABLE:
        pytest.skip(f"{engine[0]}/{engine[1]} does not run on this machine")
    plan = InferencePlan.default_for(1, 4, runtime=engine[0], precision=engine[1])
    path = export_openvino(net, plan, tmp_path / "m.xml", calibration=calibration)
    assert path == tmp_path / "m.xml"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["m.bin", "m.xml"]  # no temporaries
    code = (
        "import sys, numpy as np; "
        "from mitoseg.inference.plan import InferencePlan; "
        "from mitoseg.inference.runtime import predictor_from_openvino; "
        f"plan = InferencePlan.model_validate_json({plan.model_dump_json()!r}); "
        f"x = np.load({str(tmp_path / 'x.npy')!r}); "
        f"np.save({str(tmp_path / 'y.npy')!r}, predictor_from_openvino({str(path)!r}, plan)(x)); "
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules"
    )
    x = _batch(2, 16, 48, seed=20)
    np.save(tmp_path / "x.npy", x)
    subprocess.run([sys.executable, "-c", code], check=True)
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), predictors[engine](x))


@pytest.mark.parametrize(
    ("runtime", "name", "message"),
    [
        ("keras", "m.xml", r"^export_openvino: the plan runs on keras/fp32, not openvino$"),
        ("openvino", "m.onnx", r"m\.onnx: an OpenVINO model file must end in \.xml$"),
    ],
)
def test_export_openvino_refuses_bad_arguments(
    net: Any, tmp_path: Any, runtime: str, name: str, message: str
) -> None:
    plan = InferencePlan.default_for(1, 4, runtime=runtime, precision="fp32")
    with pytest.raises(ValueError, match=message):
        export_openvino(net, plan, tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_predictor_from_openvino_refuses_bad_arguments(tmp_path: Any) -> None:
    with pytest.raises(
        ValueError, match=r"^predictor_from_openvino: the plan runs on keras/fp32, not openvino$"
    ):
        predictor_from_openvino(tmp_path / "m.xml", InferencePlan.default_for(1, 4))
    plan = InferencePlan.default_for(1, 4, runtime="openvino", precision="fp32")
    with pytest.raises(
        FileNotFoundError, match=r"m\.xml: OpenVINO model \(\.xml and \.bin\) not found$"
    ):
        predictor_from_openvino(tmp_path / "m.xml", plan)
    with pytest.raises(ValueError, match=r"^threads must be an integer >= 1, got 0$"):
        predictor_from_openvino(tmp_path / "m.xml", plan, threads=0)


def test_int8_calibration_accepts_differently_sized_images(net: Any, reference: Any) -> None:
    rng = np.random.default_rng(6)
    images = [rng.random((30, 41), dtype=np.float32), rng.random((17, 64, 1), dtype=np.float32)]
    predict = compile_predictor(net, "openvino", "int8", calibration=images)
    x = _batch(1, 32, 32, seed=9)
    _assert_close(predict(x), reference(x), "int8", "int8 calibrated on two sizes")


@pytest.mark.parametrize(
    ("runtime", "precision"),
    [("onnx", "fp32"), ("keras", "int8"), ("keras", "bf16"), ("openvino", "fp16"), ("", "")],
)
def test_unknown_engine_is_refused_with_the_engines_that_run(
    net: Any, runtime: str, precision: str
) -> None:
    with pytest.raises(ValueError) as info:
        compile_predictor(net, runtime, precision)
    assert str(info.value) == (
        f"inference engine {runtime}/{precision} is not available; use {_known()}"
    )


def test_unknown_engine_in_a_plan_is_refused(net: Any) -> None:
    plan = InferencePlan.default_for(1, 4, runtime="keras", precision="int8")
    with pytest.raises(ValueError) as info:
        predictor_for_plan(net, plan)
    assert str(info.value) == f"inference engine keras/int8 is not available; use {_known()}"


@pytest.mark.parametrize(
    ("calibration", "message"),
    [
        (
            None,
            "inference engine openvino/int8 needs calibration images: pass "
            "calibration=(N, H, W) float32 network inputs in [0, 1]",
        ),
        (np.zeros((0, 16, 16), np.float32), "calibration: no images given"),
        ([], "calibration: no images given"),
        (
            np.zeros((2, 16), np.float32),
            "calibration: image 0: expected (H, W), got shape (16,)",
        ),
        (
            [np.zeros((16, 16, 2), np.float32)],
            "calibration: image 0: expected (H, W), got shape (16, 16, 2)",
        ),
        (
            [np.zeros((16, 16), np.float32), np.full((16, 16), np.nan, np.float32)],
            "calibration: image 1 contains NaN or infinite values",
        ),
    ],
    ids=["missing", "empty-array", "empty-list", "1d", "2-channels", "nan"],
)
def test_int8_needs_usable_calibration_images(net: Any, calibration: Any, message: str) -> None:
    if ("openvino", "int8") not in AVAILABLE:
        pytest.skip("openvino/int8 does not run on this machine")
    with pytest.raises(ValueError) as info:
        compile_predictor(net, "openvino", "int8", calibration=calibration)
    assert str(info.value) == message


@pytest.mark.parametrize("threads", [0, -2, True])
def test_threads_must_be_positive(net: Any, threads: Any) -> None:
    with pytest.raises(ValueError) as info:
        compile_predictor(net, "openvino", "fp32", threads=threads)
    assert str(info.value) == f"threads must be an integer >= 1, got {threads!r}"


@pytest.mark.parametrize("engine", AVAILABLE, ids=[f"{r}-{p}" for r, p in AVAILABLE])
@pytest.mark.parametrize(
    ("shape", "message"),
    [
        (
            (32, 32, 1),
            "predict_batch: expected (B, H, W, 1), got shape (32, 32, 1)",
        ),
        (
            (1, 32, 32, 2),
            "predict_batch: expected (B, H, W, 1), got shape (1, 32, 32, 2)",
        ),
        (
            (0, 32, 32, 1),
            "predict_batch: expected a non-empty array, got shape (0, 32, 32, 1)",
        ),
        ((1, 30, 32, 1), "predict_batch: tile sides must be positive multiples of 4, got 30x32"),
        ((1, 32, 2, 1), "predict_batch: tile sides must be positive multiples of 4, got 32x2"),
    ],
    ids=["3d", "channels", "empty", "height", "width"],
)
def test_bad_batches_are_refused(
    engine: tuple[str, str], predictors: dict, shape: tuple[int, ...], message: str
) -> None:
    with pytest.raises(ValueError) as info:
        predictors[engine](np.zeros(shape, np.float32))
    assert str(info.value) == message
