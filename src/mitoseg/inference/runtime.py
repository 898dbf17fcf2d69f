"""Inference engines: turn a Keras model into the batch predictor the tiled core calls.

:func:`compile_predictor` returns a :data:`mitoseg.inference.predict.PredictBatch`
(``(B, H, W, 1) float32 -> (B, H, W, C) float32``, any ``H, W`` that are multiples of
the network divisor) for the engine an :class:`~mitoseg.inference.plan.InferencePlan` names
(``plan.runtime``, ``plan.precision``). Everything that runs a model (evaluate,
``mitoseg predict``, the service, the volume path) goes through here, so the engine the
evaluate stage validated is the one used.

Engines (:data:`ENGINES`; :func:`available_engines` says which of them run here):

* ``keras`` / ``fp32``: the Keras model itself (``predict_on_batch``; TensorFlow on CPU
  or GPU). A cached ``tf.function`` of ``model(x, training=False)`` measured no faster on
  CPU, so the plain call is kept.
* ``openvino`` / ``fp32``: the model converted in memory with ``openvino.convert_model``
  and compiled for the CPU with ``INFERENCE_PRECISION_HINT=f32`` (OpenVINO's CPU default
  is bf16 where the CPU has it, so FP32 is asked for explicitly).
* ``openvino`` / ``bf16``: the same with ``INFERENCE_PRECISION_HINT=bf16``; only on CPUs
  that report ``BF16`` (AVX512_BF16 or AMX).
* ``openvino`` / ``int8``: NNCF post-training quantisation (8-bit weights and
  activations) calibrated on images the caller passes; the first convolution (the raw
  image enters it) and the output convolution stay in floating point, which is what keeps
  the validation IoU.

The converted model has dynamic ``(?, ?, ?, C)`` input, so tiles of any size run without
recompiling; OpenVINO's CPU plugin caches per-shape kernels itself. Each predictor owns
its compiled model and inference request (no module-level state) and serialises calls
with a lock. Outputs are deterministic: the same input gives bit-identical output on
repeated calls and in a freshly compiled predictor on the same machine. The OpenVINO
engines are also batch-invariant (a tile's output does not depend on the other tiles in
its batch, so the service's cross-request batching returns what ``mitoseg predict``
does); TensorFlow's is not, in the last bits (about ``3e-7``).

TensorFlow, OpenVINO and NNCF are imported inside the functions.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mitoseg.checks import check_array
from mitoseg.inference.plan import InferencePlan

__all__ = [
    "ENGINES",
    "OPENVINO_FILE",
    "available_engines",
    "compile_predictor",
    "export_openvino",
    "predictor_for_plan",
    "predictor_from_openvino",
]

#: ``(runtime, precision)`` pairs this build knows; :func:`available_engines` says which
#: of them run on this machine.
ENGINES: tuple[tuple[str, str], ...] = (
    ("keras", "fp32"),
    ("openvino", "fp32"),
    ("openvino", "bf16"),
    ("openvino", "int8"),
)

#: OpenVINO ``INFERENCE_PRECISION_HINT`` of each precision (int8: the layers left in
#: floating point run in FP32).
_OV_HINT = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
#: OpenVINO CPU ``OPTIMIZATION_CAPABILITIES`` entry each precision needs.
_OV_CAPABILITY = {"fp32": "FP32", "bf16": "BF16", "int8": "INT8"}

#: File name of a saved OpenVINO model (IR; weights in the ``.bin`` beside it).
OPENVINO_FILE = "model_openvino.xml"

PredictBatch = Callable[[np.ndarray], np.ndarray]
Calibration = np.ndarray | Sequence[np.ndarray]


def _name(runtime: str, precision: str) -> str:
    return f"{runtime}/{precision}"


def _openvino_capabilities() -> tuple[set[str], str | None]:
    """CPU capabilities OpenVINO reports, or an empty set and why it cannot run."""
    try:
        import openvino as ov
    except ImportError:
        return set(), "the openvino package is not installed"
    core = ov.Core()
    if "CPU" not in core.available_devices:
        return set(), "OpenVINO finds no CPU device"
    return {str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")}, None


def _unavailable_reason(runtime: str, precision: str) -> str | None:
    """Why a known engine cannot run here, or None when it can."""
    if runtime == "keras":
        return None
    caps, reason = _openvino_capabilities()
    if reason is not None:
        return reason
    if _OV_CAPABILITY[precision] not in caps:
        return f"this CPU has no {_OV_CAPABILITY[precision]} support in OpenVINO"
    if precision == "int8":
        try:
            import nncf  # noqa: F401
        except ImportError:
            return "the nncf package is not installed"
    return None


def available_engines() -> list[tuple[str, str]]:
    """The ``(runtime, precision)`` pairs of :data:`ENGINES` that run on this machine.

    ``keras/fp32`` always; the OpenVINO engines when ``openvino`` is installed and its
    CPU plugin reports the precision (``BF16`` needs AVX512_BF16 or AMX); ``int8`` also
    needs ``nncf``.
    """
    return [(r, p) for r, p in ENGINES if _unavailable_reason(r, p) is None]


def _default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _checked_batch(batch: np.ndarray, channels: int, divisor: int) -> np.ndarray:
    x = check_array(
        np.ascontiguousarray(batch, dtype=np.float32),
        "predict_batch",
        ndim=4,
        axes={4: f"(B, H, W, {channels})"},
        sizes={-1: channels},
        nonempty=True,
    )
    h, w = x.shape[1:3]
    if h < divisor or w < divisor or h % divisor or w % divisor:
        raise ValueError(
            f"predict_batch: tile sides must be positive multiples of {divisor}, got {h}x{w}"
        )
    return x


def _keras_predictor(model: Any, channels: int, divisor: int) -> PredictBatch:
    def predict_batch(batch: np.ndarray) -> np.ndarray:
        """``(B, H, W, 1) float32 -> (B, H, W, C) float32`` with the Keras model."""
        x = _checked_batch(batch, channels, divisor)
        return np.asarray(model.predict_on_batch(x), dtype=np.float32)

    return predict_batch


def _pad_to(image: np.ndarray, divisor: int) -> np.ndarray:
    """Reflect-pad the two leading axes of ``(H, W)`` up to multiples of ``divisor``."""
    pads = [(0, (-n) % divisor) for n in image.shape[:2]]
    for axis, (_, after) in enumerate(pads):
        if after:
            width = [(0, 0), (0, 0)]
            width[axis] = (0, after)
            mode = "reflect" if image.shape[axis] >= 2 else "edge"
            image = np.pad(image, width, mode=mode)
    return image


def _calibration_samples(
    calibration: Calibration | None, channels: int, divisor: int
) -> list[np.ndarray]:
    """Calibration images as ``(1, H', W', C)`` float32 network inputs.

    Raises:
        ValueError: missing, empty, wrongly shaped or non-finite calibration images.
    """
    if calibration is None:
        raise ValueError(
            "inference engine openvino/int8 needs calibration images: pass "
            "calibration=(N, H, W) float32 network inputs in [0, 1]"
        )
    images = list(calibration) if not isinstance(calibration, np.ndarray) else calibration
    if len(images) == 0:
        raise ValueError("calibration: no images given")
    samples = []
    for i, image in enumerate(images):
        x = np.asarray(image, dtype=np.float32)
        if channels == 1 and x.ndim == 3 and x.shape[-1] == 1:
            x = x[..., 0]
        x = check_array(
            x,
            f"calibration: image {i}",
            ndim=2 if channels == 1 else 3,
            axes={3: f"(H, W, {channels})"},
            sizes={-1: channels} if channels > 1 else None,
            nonempty=True,
        )
        if not np.isfinite(x).all():
            raise ValueError(f"calibration: image {i} contains NaN or infinite values")
        x = _pad_to(x, divisor)
        samples.append(np.ascontiguousarray(x.reshape(1, *x.shape[:2], channels)))
    return samples


def _convert_openvino(model: Any) -> Any:
    """The Keras model as an in-memory ``openvino.Model`` with dynamic input shape."""
    import openvino as ov

    with warnings.catch_warnings():
        # Keras warns that the traced input is not named like the model's input layer.
        warnings.simplefilter("ignore", UserWarning)
        return ov.convert_model(model)


def _quantize_int8(ov_model: Any, samples: list[np.ndarray]) -> Any:
    """NNCF post-training int8 quantisation, first and output convolutions left out."""
    import nncf

    convs = [
        op.get_friendly_name()
        for op in ov_model.get_ordered_ops()
        if op.get_type_name() == "Convolution"
    ]
    ignored = nncf.IgnoredScope(names=sorted({convs[0], convs[-1]})) if convs else None
    import contextlib
    import io
    import logging

    from nncf.common.logging import nncf_logger

    # NNCF logs INFO lines and draws progress bars on stdout: the quantisation is a
    # compile step of ours, so keep the console to mitoseg's own output.
    level = nncf_logger.level
    nncf.set_log_level(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return nncf.quantize(
                ov_model,
                nncf.Dataset(samples),
                preset=nncf.QuantizationPreset.PERFORMANCE,
                target_device=nncf.TargetDevice.CPU,
                subset_size=len(samples),
                ignored_scope=ignored,
            )
    finally:
        nncf.set_log_level(level)


def _openvino_model(
    model: Any, precision: str, channels: int, divisor: int, calibration: Calibration | None
) -> Any:
    """The Keras model as the ``openvino.Model`` the engine runs (int8: quantised)."""
    samples = _calibration_samples(calibration, channels, divisor) if precision == "int8" else []
    ov_model = _convert_openvino(model)
    if precision == "int8":
        ov_model = _quantize_int8(ov_model, samples)
    return ov_model


def _compile_openvino(
    ov_model: Any, precision: str, channels: int, divisor: int, threads: int
) -> PredictBatch:
    """Compile an ``openvino.Model`` for the CPU into a batch predictor."""
    import openvino as ov

    compiled = ov.Core().compile_model(
        ov_model,
        "CPU",
        {
            "INFERENCE_PRECISION_HINT": _OV_HINT[precision],
            "INFERENCE_NUM_THREADS": int(threads),
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
        },
    )
    request = compiled.create_infer_request()
    lock = threading.Lock()

    def predict_batch(batch: np.ndarray) -> np.ndarray:
        """``(B, H, W, 1) float32 -> (B, H, W, C) float32`` with OpenVINO."""
        x = _checked_batch(batch, channels, divisor)
        with lock:  # one inference request: calls are serialised
            result = request.infer({0: x})
            out = np.array(result[0], dtype=np.float32, copy=True)
        return out

    return predict_batch


def _openvino_predictor(
    model: Any,
    precision: str,
    channels: int,
    divisor: int,
    threads: int,
    calibration: Calibration | None,
) -> PredictBatch:
    ov_model = _openvino_model(model, precision, channels, divisor, calibration)
    return _compile_openvino(ov_model, precision, channels, divisor, threads)


def _check_engine(runtime: str, precision: str) -> None:
    """Raise the ``ValueError`` of an engine that is unknown or does not run here."""
    if (runtime, precision) not in ENGINES:
        known = ", ".join(_name(r, p) for r, p in available_engines())
        raise ValueError(
            f"inference engine {_name(runtime, precision)} is not available; use {known}"
        )
    reason = _unavailable_reason(runtime, precision)
    if reason is not None:
        known = ", ".join(_name(r, p) for r, p in available_engines())
        raise ValueError(
            f"inference engine {_name(runtime, precision)} is not available ({reason}); use {known}"
        )


def compile_predictor(
    model: Any,
    runtime: str = "keras",
    precision: str = "fp32",
    *,
    calibration: Calibration | None = None,
    threads: int | None = None,
) -> PredictBatch:
    """A batch predictor running ``model`` on the given engine.

    Converting and compiling happen here, once (OpenVINO: about a second; int8 adds the
    NNCF calibration, a few seconds for a handful of slices). The predictor accepts any
    tile shape that is a multiple of the network divisor, and tiles of different shapes
    in successive calls.

    Args:
        model: Keras model, input ``(N, H, W, C_in)`` float32 in [0, 1], output
            ``(N, H, W, C)`` float32 probabilities.
        runtime: ``plan.runtime`` (``keras`` or ``openvino``).
        precision: ``plan.precision`` (``fp32``, ``bf16`` or ``int8``).
        calibration: network inputs for engines that quantise (``openvino/int8``):
            ``(N, H, W)`` (or ``(N, H, W, 1)``) float32 in [0, 1], or a sequence of
            ``(H, W)`` arrays of different sizes (each is reflect-padded to a multiple
            of the divisor); required for int8, ignored by the others. Use training
            slices, normalised like the network input.
        threads: CPU threads of the OpenVINO engines; None: the CPUs this process may
            run on. The Keras engine uses TensorFlow's own thread settings.

    Returns:
        ``(B, H, W, C_in) float32 -> (B, H, W, C) float32`` callable; ``H`` and ``W``
        must be positive multiples of the model divisor (``2**depth``). Deterministic.

    Raises:
        ValueError: an engine that is unknown or does not run here (the message lists
            those that do), int8 without usable calibration images, or ``threads < 1``.
    """
    from mitoseg.model.analysis import model_divisor

    _check_engine(runtime, precision)
    if threads is not None and (isinstance(threads, bool) or int(threads) < 1):
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    channels = int(model.input_shape[-1])
    divisor = model_divisor(model)
    if runtime == "keras":
        return _keras_predictor(model, channels, divisor)
    return _openvino_predictor(
        model,
        precision,
        channels,
        divisor,
        _default_threads() if threads is None else int(threads),
        calibration,
    )


def predictor_for_plan(
    model: Any, plan: InferencePlan, *, calibration: Calibration | None = None
) -> PredictBatch:
    """:func:`compile_predictor` for ``plan.runtime`` and ``plan.precision``.

    Args:
        model: the Keras model the plan belongs to.
        plan: its inference plan.
        calibration: calibration images for an ``openvino/int8`` plan (see
            :func:`compile_predictor`); default: the ones stored with the plan.
    """
    if calibration is None:
        calibration = plan.calibration_images()  # stored with the plan for int8
    return compile_predictor(model, plan.runtime, plan.precision, calibration=calibration)


def export_openvino(
    model: Any, plan: InferencePlan, path: str | Path, *, calibration: Calibration | None = None
) -> Path:
    """Save the OpenVINO model an ``openvino`` plan runs (converted; int8: quantised) as
    OpenVINO IR, so a server compiles it with :func:`predictor_from_openvino` without
    importing TensorFlow (about 600 MB of memory per process).

    The weights are kept in FP32 (no FP16 compression): the saved model gives
    bit-identical outputs to :func:`predictor_for_plan` on the same machine.

    Args:
        model: the Keras model the plan belongs to.
        plan: its inference plan; ``plan.runtime`` must be ``openvino``.
        path: the ``.xml`` file to write; the weights go to the ``.bin`` beside it.
            Both are written atomically (the ``.bin`` first).
        calibration: for an int8 plan (default: the images stored with the plan).

    Returns:
        ``path``.

    Raises:
        ValueError: a plan whose runtime is not ``openvino``, a path not ending in
            ``.xml``, or int8 without usable calibration images.
    """
    import openvino as ov

    path = Path(path)
    if plan.runtime != "openvino":
        raise ValueError(
            f"export_openvino: the plan runs on {plan.runtime}/{plan.precision}, not openvino"
        )
    if path.suffix != ".xml":
        raise ValueError(f"{path}: an OpenVINO model file must end in .xml")
    if calibration is None and plan.precision == "int8":
        calibration = plan.calibration_images()
    channels = int(model.input_shape[-1])
    ov_model = _openvino_model(model, plan.precision, channels, plan.divisor, calibration)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.xml")
    try:
        ov.save_model(ov_model, str(tmp), compress_to_fp16=False)
        os.replace(tmp.with_suffix(".bin"), path.with_suffix(".bin"))
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, tmp.with_suffix(".bin")):
            leftover.unlink(missing_ok=True)
    return path


def predictor_from_openvino(
    path: str | Path, plan: InferencePlan, *, threads: int | None = None
) -> PredictBatch:
    """The batch predictor of an ``openvino`` plan from its saved model
    (:func:`export_openvino`); imports OpenVINO only, not TensorFlow.

    Args:
        path: the ``.xml`` file (weights in the ``.bin`` beside it).
        plan: the inference plan (``runtime`` ``openvino``; its ``precision`` is the
            compile hint, its ``divisor`` the tile-side check).
        threads: CPU threads (None: the CPUs this process may run on).

    Returns:
        ``(B, H, W, C_in) float32 -> (B, H, W, C) float32``, as :func:`predictor_for_plan`.

    Raises:
        ValueError: a plan not on ``openvino``, or an engine that does not run here.
        FileNotFoundError: no model at ``path``.
    """
    import openvino as ov

    path = Path(path)
    if plan.runtime != "openvino":
        raise ValueError(
            f"predictor_from_openvino: the plan runs on {plan.runtime}/{plan.precision}, "
            "not openvino"
        )
    _check_engine(plan.runtime, plan.precision)
    if threads is not None and (isinstance(threads, bool) or int(threads) < 1):
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    if not path.is_file() or not path.with_suffix(".bin").is_file():
        raise FileNotFoundError(f"{path}: OpenVINO model (.xml and .bin) not found")
    ov_model = ov.Core().read_model(str(path))
    channels = int(ov_model.input(0).get_partial_shape()[-1].get_length())
    n = _default_threads() if threads is None else int(threads)
    return _compile_openvino(ov_model, plan.precision, channels, plan.divisor, n)
