"""Export a trained model as a BioImage Model Zoo package (bioimage.io model spec 0.5).

A package is one atomic transaction (rdf, weights in three formats, test tensors, cover,
README, bioimage.io's own check) built from one plan; the metadata it carries is described
by the schemas of :mod:`mitoseg.export.metadata`.

The package (a folder or a ``.zip``) holds ``rdf.yaml`` built and validated with the
``bioimageio.spec`` pydantic models, the Keras 3 weights (``keras_v3``, the original
entry), weights converted from them that deepImageJ, ilastik and QuPath load (ONNX,
TensorFlow SavedModel), a test input and the model's own test output as ``.npy``, a cover
image (input | mask overlay) and a ``README.md`` documentation page.

What the package computes: the network on the whole input tile after mitoseg's intensity
normalisation (per slice percentile scaling, expressed as the spec's ``scale_range`` over
axes ``y, x`` with the plan's percentiles, then ``clip`` to ``[0, 1]``). Its output is the
foreground *probability* (binary models, one channel) or the per-class softmax
(multiclass); the plan's threshold is documented and stored in ``config.mitoseg`` but not
applied. Two things ``mitoseg predict`` does are not expressible in the spec and are
documented in the package README: the blank-slice rule (a near-constant slice is
background without a forward pass) and reflect padding of the image border by the plan's
``border`` (a consumer that tiles with the declared halo gets the same interior).

Everything here takes explicit arguments; ``bioimageio.spec``, Keras and TensorFlow are
imported inside the functions that need them.
"""

from __future__ import annotations

import datetime as _dt
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mitoseg.checks import check_stack
from mitoseg.export.metadata import (
    Citation,
    ExportMetadata,
    ExportReport,
    Person,
    TrainingData,
)
from mitoseg.inference.normalize import Normalization, normalize_for_plan
from mitoseg.inference.plan import InferencePlan
from mitoseg.io import atomic_dir, atomic_path

__all__ = [
    "INPUT_ID",
    "OUTPUT_ID",
    "WEIGHT_FORMATS",
    "Citation",
    "ExportMetadata",
    "ExportReport",
    "Person",
    "TrainingData",
    "build_model_description",
    "cover_image",
    "export_bioimageio",
    "network_input",
    "resolve_voxel_size",
    "select_test_sample",
]

#: Tensor ids in ``rdf.yaml``.
INPUT_ID = "raw"
OUTPUT_ID = "probabilities"
#: Weight formats this exporter writes; ``keras_v3`` is the original, the others its children.
WEIGHT_FORMATS = ("keras_v3", "onnx", "tensorflow_saved_model_bundle")
WeightFormat = Literal["keras_v3", "onnx", "tensorflow_saved_model_bundle"]

_CAPABILITIES = {
    "keras_v3": "bioimageio.core (Python) with Keras 3 and TensorFlow",
    "onnx": "ilastik, deepImageJ / JDLL, QuPath and bioimageio.core through ONNX Runtime",
    "tensorflow_saved_model_bundle": "deepImageJ / JDLL and bioimageio.core (TensorFlow 2)",
}


# --------------------------------------------------------------------- helpers


def resolve_voxel_size(
    plan_voxel_size_nm: Sequence[float] | None, override: Sequence[float] | None
) -> tuple[float, float]:
    """The ``(y, x)`` pixel size in nm for the package's axes.

    Args:
        plan_voxel_size_nm: the plan's ``[z, y, x]`` voxel size, or None.
        override: ``(y, x)`` or a single isotropic value from the command line; wins over
            the plan.

    Returns:
        ``(y, x)`` in nanometres.

    Raises:
        ValueError: neither is given, or the override is not 1 or 2 positive numbers.
    """
    if override is not None:
        values = [float(v) for v in override]
        if len(values) not in (1, 2) or any(not np.isfinite(v) or v <= 0 for v in values):
            raise ValueError(
                f"voxel size must be 1 or 2 positive numbers (y, x in nm), got {list(override)}"
            )
        return (values[0], values[-1])
    if plan_voxel_size_nm is not None:
        _, y, x = (float(v) for v in plan_voxel_size_nm)
        return (y, x)
    raise ValueError(
        "the model's inference plan has no voxel_size_nm: pass the pixel size in nm "
        "(--voxel-size Y,X)"
    )


def _channel_names(in_channels: int) -> list[str]:
    """Input channel names: ``raw`` for 2D; ``z_m1, z, z_p1`` ... (slices z-1, z, z+1)
    for 2.5D."""
    k = (in_channels - 1) // 2
    if in_channels == 1:
        return ["raw"]
    return [f"z_m{-o}" if o < 0 else f"z_p{o}" if o > 0 else "z" for o in range(-k, k + 1)]


def _z_context(plan: InferencePlan) -> int:
    return int(getattr(plan, "z_context", 0) or 0)


def _min_side(plan: InferencePlan) -> int:
    """Smallest input side the package declares: a multiple of the divisor with room for
    the halo on both sides."""
    d = plan.divisor
    need = 2 * plan.halo + d
    return max(d, -(-need // d) * d)


def select_test_sample(
    stack: np.ndarray, plan: InferencePlan, index: int | None = None, max_side: int = 512
) -> tuple[np.ndarray, int]:
    """Pick the slice (and its context slices) the package's test tensors are made from.

    The slice is centre-cropped to a square whose side is ``min(H, W, max_side)`` rounded
    down to a multiple of ``plan.divisor`` (the package runs the network on it directly).

    Args:
        stack: ``(Z, H, W)`` or ``(H, W)`` raw intensities (uint8, uint16 or float).
        plan: the model's plan (divisor, halo, normalisation, ``z_context``).
        index: slice index; None picks the middle slice that is not blank.
        max_side: largest side of the test tile.

    Returns:
        ``((S, S, 2k + 1) raw intensities in the input dtype, slice index)``.

    Raises:
        ValueError: bad shape, index out of range (or without its context slices), a
            tile smaller than the package's minimum input size, or a blank slice.
    """
    stack = check_stack(stack, "sample", nonempty=True)
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    k = _z_context(plan)
    depth, h, w = stack.shape
    valid = list(range(k, depth - k))
    if not valid:
        raise ValueError(
            f"sample: {depth} slice(s) cannot hold a slice with {k} context slices on each side"
        )
    if index is None:
        order = sorted(valid, key=lambda z: abs(z - depth // 2))
        index = next(
            (z for z in order if normalize_for_plan(stack[z], plan.normalization) is not None),
            order[0],
        )
    elif index not in valid:
        raise ValueError(
            f"sample: slice {index} out of range: choose {valid[0]}..{valid[-1]} "
            f"({depth} slices, z_context {k})"
        )
    d = plan.divisor
    side = min(h, w, int(max_side)) // d * d
    if side < _min_side(plan):
        raise ValueError(
            f"sample: a {h}x{w} slice (max side {max_side}) gives a {side}-pixel test tile; "
            f"the package needs at least {_min_side(plan)} (divisor {d}, halo {plan.halo})"
        )
    y0, x0 = (h - side) // 2, (w - side) // 2
    tile = stack[index - k : index + k + 1, y0 : y0 + side, x0 : x0 + side]
    if any(normalize_for_plan(s, plan.normalization) is None for s in tile):
        raise ValueError(f"sample: slice {index} is blank; choose a slice with structure")
    return np.ascontiguousarray(np.moveaxis(tile, 0, -1)), int(index)


def network_input(raw: np.ndarray, plan: InferencePlan) -> np.ndarray:
    """Normalise a raw tile as mitoseg does (each channel on its own), as a batch of one.

    Args:
        raw: ``(H, W, C)`` raw intensities.
        plan: the model's plan (``normalization``).

    Returns:
        ``(1, H, W, C)`` float32 in ``[0, 1]``.

    Raises:
        ValueError: a blank channel (mitoseg would not run the network on it).
    """
    channels = []
    for c in range(raw.shape[-1]):
        x = normalize_for_plan(raw[..., c], plan.normalization)
        if x is None:
            raise ValueError(f"network_input: channel {c} of the test tile is blank")
        channels.append(x)
    return np.stack(channels, axis=-1)[None].astype(np.float32)


def cover_image(raw: np.ndarray, probs: np.ndarray, threshold: float | None) -> np.ndarray:
    """Cover picture: the input beside the input with the predicted mask overlaid.

    Args:
        raw: ``(H, W)`` raw intensities.
        probs: ``(H, W, C)`` probabilities (C = 1: foreground, else softmax).
        threshold: foreground threshold for C = 1 (ignored for argmax).

    Returns:
        ``(H, 2W, 3)`` uint8 RGB: grey input | input with foreground tinted (binary:
        magenta at 50 %; multiclass: one colour per non-background class).
    """
    grey = normalize_for_plan(raw, Normalization())
    grey = np.zeros(raw.shape, np.float32) if grey is None else grey
    rgb = np.repeat((grey * 255).round().astype(np.uint8)[..., None], 3, axis=-1)
    if probs.shape[-1] == 1:
        mask = (probs[..., 0] >= (0.5 if threshold is None else threshold)).astype(np.int64)
    else:
        mask = np.argmax(probs, axis=-1)
    palette = np.array(
        [[0, 0, 0], [255, 0, 255], [0, 200, 255], [255, 200, 0], [0, 255, 100], [255, 80, 80]],
        dtype=np.float32,
    )
    overlay = rgb.astype(np.float32)
    fg = mask > 0
    colours = palette[1 + (mask[fg] - 1) % (len(palette) - 1)]
    overlay[fg] = 0.5 * overlay[fg] + 0.5 * colours
    return np.concatenate([rgb, overlay.round().astype(np.uint8)], axis=1)


def _documentation(
    meta: ExportMetadata,
    plan: InferencePlan,
    voxel: tuple[float, float],
    formats: Sequence[str],
    source_uri: str | None,
    channel_names: list[str],
) -> str:
    norm = plan.normalization
    out = "foreground probability" if plan.out_channels == 1 else "per-class softmax"
    lines = [
        f"# {meta.name}",
        "",
        meta.description,
        "",
        "Exported by `mitoseg export bioimageio`"
        + (f" from `{source_uri}`." if source_uri else "."),
        "",
        "## Input",
        f"- Tensor `{INPUT_ID}`, axes `batch, y, x, channel` ({len(channel_names)} channel(s): "
        f"{', '.join(channel_names)}), any 8/16-bit or float EM intensities; y and x must be "
        f"multiples of {plan.divisor} and at least {_min_side(plan)}.",
        f"- Pixel size {voxel[0]:g} x {voxel[1]:g} nm (y, x): images at another resolution "
        "should be resampled first.",
        f"- Preprocessing (as mitoseg's): per sample and channel, percentile "
        f"{norm.low_pct:g} -> 0 and {norm.high_pct:g} -> 1 (`scale_range` over y, x), then "
        "clipped to [0, 1].",
        "",
        "## Output",
        f"- Tensor `{OUTPUT_ID}`, axes `batch, y, x, channel`: the {out} "
        f"(channels: {', '.join(plan.class_names[-plan.out_channels :])}), float32 in [0, 1].",
    ]
    if plan.out_channels == 1:
        lines.append(
            f"- Threshold: mitoseg segments pixels with probability >= {plan.decision:g} "
            f"(chosen by: {plan.threshold_source}); the package outputs probabilities, apply "
            "the threshold afterwards."
        )
        if plan.seed_threshold is not None:
            lines.append(
                "- Hysteresis: of the pixels above the threshold, mitoseg keeps only the "
                "8-connected regions (within one slice) that reach probability "
                f">= {plan.seed_threshold:g} somewhere (chosen on the validation slices); "
                "apply it after the threshold to match."
            )
    else:
        lines.append("- Segmentation: argmax over the channels.")
    lines += [
        f"- Halo: {plan.halo} pixels per side; tile with at least this much overlap and crop "
        "it from each tile's output.",
        "",
        "## Differences from `mitoseg predict`",
        "- mitoseg reflect-pads the image border by "
        f"{plan.halo if plan.border is None else plan.border} pixels and blends overlapping "
        f"tiles of up to {plan.tile_size} pixels; the package runs the network on the input "
        "as given, so the outermost pixels differ.",
        f"- mitoseg runs this model on the {plan.runtime}/{plan.precision} engine (its "
        "threshold was chosen with it); the package holds the fp32 weights, so a few "
        "pixels near the threshold may differ unless mitoseg runs keras/fp32.",
        f"- mitoseg returns an empty mask for a blank slice (robust intensity range below "
        f"{norm.blank_range:g} of the dtype range) without running the network; the package "
        "runs it.",
        "",
        "## Weights",
        *(f"- `{f}`: {_CAPABILITIES[f]}" for f in formats),
        "",
        "## Training data",
        f"{meta.training_data.name}. {meta.training_data.description} "
        f"Licence: {meta.training_data.license}.",
        *(f"- {c.text}" + (f" doi:{c.doi}" if c.doi else "") for c in meta.training_data.cite),
        "",
        "## Validation (mitoseg inference plan)",
    ]
    if plan.validation:
        lines += [f"- {k}: {v:.4f}" for k, v in sorted(plan.validation.items())]
    else:
        lines.append("- no validation figures in the plan")
    lines += ["", "## Licence", f"Weights: {meta.weights_license}.", ""]
    return "\n".join(lines)


def _cite_entries(v: Any, cites: Sequence[Citation]) -> list[Any]:
    return [v.CiteEntry(text=c.text, doi=c.doi, url=c.url) for c in cites]


def _authors(v: Any, people: Sequence[Person]) -> list[Any]:
    return [
        v.Author(
            name=p.name,
            affiliation=p.affiliation,
            email=p.email,
            github_user=p.github_user,
            orcid=p.orcid,
        )
        for p in people
    ]


def _input_descr(
    v: Any, plan: InferencePlan, voxel_size_nm: tuple[float, float], in_channels: int, test: Path
) -> Any:
    """``raw``: ``(batch, y, x, channel)`` float32 with the plan's percentile scaling."""
    y_nm, x_nm = voxel_size_nm
    size = v.ParameterizedSize(min=_min_side(plan), step=plan.divisor)
    norm = plan.normalization
    return v.InputTensorDescr(
        id=v.TensorId(INPUT_ID),
        description="EM intensities (raw; normalised by the preprocessing)",
        axes=[
            v.BatchAxis(),
            v.SpaceInputAxis(id=v.AxisId("y"), size=size, unit="nanometer", scale=y_nm),
            v.SpaceInputAxis(id=v.AxisId("x"), size=size, unit="nanometer", scale=x_nm),
            v.ChannelAxis(channel_names=[v.Identifier(n) for n in _channel_names(in_channels)]),
        ],
        test_tensor=v.FileDescr(source=test),
        data=v.IntervalOrRatioDataDescr(type="float32"),
        preprocessing=[
            v.ScaleRangeDescr(
                kwargs=v.ScaleRangeKwargs(
                    axes=[v.AxisId("y"), v.AxisId("x")],
                    min_percentile=norm.low_pct,
                    max_percentile=norm.high_pct,
                )
            ),
            v.ClipDescr(kwargs=v.ClipKwargs(min=0.0, max=1.0)),
        ],
    )


def _output_descr(
    v: Any, plan: InferencePlan, voxel_size_nm: tuple[float, float], test: Path
) -> Any:
    """``probabilities``: the input's size (less the plan's halo), float32 in [0, 1]."""
    out_names = (
        [plan.class_names[plan.foreground_class or 1]]  # binary: always class 1
        if plan.out_channels == 1
        else list(plan.class_names)
    )

    def out_axis(axis: str, scale: float) -> Any:
        ref = v.SizeReference(tensor_id=v.TensorId(INPUT_ID), axis_id=v.AxisId(axis))
        common = {"id": v.AxisId(axis), "size": ref, "unit": "nanometer", "scale": scale}
        if plan.halo > 0:
            return v.SpaceOutputAxisWithHalo(halo=plan.halo, **common)
        return v.SpaceOutputAxis(**common)

    return v.OutputTensorDescr(
        id=v.TensorId(OUTPUT_ID),
        description="foreground probability"
        if plan.out_channels == 1
        else "per-class probabilities (softmax)",
        axes=[
            v.BatchAxis(),
            out_axis("y", voxel_size_nm[0]),
            out_axis("x", voxel_size_nm[1]),
            v.ChannelAxis(channel_names=[v.Identifier(n) for n in out_names]),
        ],
        test_tensor=v.FileDescr(source=test),
        data=v.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
    )


def _weight_entries(
    v: Any, weights: dict[str, Path], versions: dict[str, Any], metadata: ExportMetadata
) -> dict[str, Any]:
    """``weights`` of the rdf: ``keras_v3`` and its ONNX and SavedModel children."""
    entries: dict[str, Any] = {}
    backend = ("tensorflow", str(versions["tensorflow"]))
    entries["keras_v3"] = v.KerasV3WeightsDescr(
        source=weights["keras_v3"],
        keras_version=v.Version(str(versions["keras"])),
        backend=backend,
        authors=_authors(v, metadata.authors),
    )
    if "onnx" in weights:
        entries["onnx"] = v.OnnxWeightsDescr(
            source=weights["onnx"],
            opset_version=int(versions["onnx_opset"]),
            parent="keras_v3",
            comment="converted from keras_v3 with keras.Model.export(format='onnx') (tf2onnx)",
        )
    if "tensorflow_saved_model_bundle" in weights:
        entries["tensorflow_saved_model_bundle"] = v.TensorflowSavedModelBundleWeightsDescr(
            source=weights["tensorflow_saved_model_bundle"],
            tensorflow_version=v.Version(str(versions["tensorflow"])),
            parent="keras_v3",
            comment="TensorFlow 2 SavedModel, endpoint 'serve' returning "
            f"{{'{OUTPUT_ID}': ...}}, written with keras.export.ExportArchive",
        )
    return entries


def _training_data(v: Any, metadata: ExportMetadata) -> Any:
    """The rdf's ``training_data``: a bioimage.io dataset description."""
    from bioimageio.spec.dataset.v0_3 import DatasetDescr

    td = metadata.training_data
    return DatasetDescr(
        name=td.name,
        description=td.description,
        source=td.source,
        license=td.license,
        cite=_cite_entries(v, td.cite),
        authors=_authors(v, td.authors),
    )


def build_model_description(
    *,
    plan: InferencePlan,
    metadata: ExportMetadata,
    voxel_size_nm: tuple[float, float],
    weights: dict[str, Path],
    weight_versions: dict[str, Any],
    test_input: Path,
    test_output: Path,
    cover: Path,
    documentation: Path,
    in_channels: int,
) -> Any:
    """Build and validate the ``rdf.yaml`` content with ``bioimageio.spec``'s models.

    Args:
        plan: the model's inference plan.
        metadata: authors, citations, licence, training data.
        voxel_size_nm: ``(y, x)`` axis scale in nm.
        weights: weight format -> file (``keras_v3`` required).
        weight_versions: ``{"keras", "tensorflow", "onnx_opset"}``.
        test_input: ``(1, H, W, C_in)`` float32 ``.npy``.
        test_output: ``(1, H, W, C_out)`` float32 ``.npy``.
        cover: PNG cover image.
        documentation: ``README.md``.
        in_channels: input channels (``2 * z_context + 1``).

    Returns:
        A validated ``bioimageio.spec.model.v0_5.ModelDescr``.

    Raises:
        ValueError: the description does not validate (pydantic's message).
    """
    from bioimageio.spec.model import v0_5 as v

    input_descr = _input_descr(v, plan, voxel_size_nm, in_channels, test_input)
    output_descr = _output_descr(v, plan, voxel_size_nm, test_output)
    entries = _weight_entries(v, weights, weight_versions, metadata)
    training_data = _training_data(v, metadata)
    config = {
        "mitoseg": {
            "threshold": plan.threshold,
            "threshold_source": plan.threshold_source,
            "class_names": list(plan.class_names),
            "inference_plan": plan.model_dump(mode="json"),
        }
    }
    try:
        return v.ModelDescr(
            name=metadata.name,
            description=metadata.description,
            authors=_authors(v, metadata.authors),
            cite=_cite_entries(v, metadata.cite),
            license=metadata.weights_license,
            tags=list(metadata.tags),
            documentation=v.FileDescr(source=documentation),
            covers=[v.FileDescr(source=cover)],
            git_repo=metadata.git_repo,
            version=metadata.version,
            inputs=[input_descr],
            outputs=[output_descr],
            weights=v.WeightsDescr(**entries),
            training_data=training_data,
            timestamp=v.Datetime(_dt.datetime.now(_dt.timezone.utc)),
            config=config,
        )
    except Exception as exc:  # pydantic.ValidationError with every field named
        raise ValueError(f"invalid bioimage.io model description: {exc}") from None


# ---------------------------------------------------------------------- weights


def _save_weights(
    model: Any, formats: Sequence[str], stage: Path, sample: np.ndarray
) -> tuple[dict[str, Path], dict[str, Any]]:
    import keras
    import tensorflow as tf

    model.predict_on_batch(sample)  # ONNX export needs a model that has been called
    files: dict[str, Path] = {}
    versions: dict[str, Any] = {"keras": keras.__version__, "tensorflow": tf.__version__}
    files["keras_v3"] = stage / "weights.keras"
    model.save(files["keras_v3"])
    if "onnx" in formats:
        import onnx

        files["onnx"] = stage / "weights.onnx"
        model.export(str(files["onnx"]), format="onnx", verbose=False)
        proto = onnx.load(str(files["onnx"]))
        versions["onnx_opset"] = next(
            op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")
        )
    if "tensorflow_saved_model_bundle" in formats:
        saved = stage / "tf_saved_model"
        _export_saved_model(model, saved)
        archive = shutil.make_archive(str(stage / "tf_saved_model"), "zip", root_dir=saved)
        shutil.rmtree(saved)
        files["tensorflow_saved_model_bundle"] = Path(archive)
    return files, versions


def _export_saved_model(model: Any, path: Path) -> None:
    """TF2 SavedModel whose ``serve`` endpoint returns ``{OUTPUT_ID: probabilities}``
    (bioimageio.core and deepImageJ read the outputs by name from a dict)."""
    import keras
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.track(model)
    spec = tf.TensorSpec(
        shape=(None, None, None, int(model.input_shape[-1])), dtype=tf.float32, name=INPUT_ID
    )
    archive.add_endpoint(
        name="serve",
        fn=lambda x: {OUTPUT_ID: model(x, training=False)},
        input_signature=[spec],
    )
    archive.write_out(str(path), verbose=False)


def _check_formats(weight_formats: Sequence[str]) -> list[str]:
    formats = list(weight_formats)
    unknown = sorted(set(formats) - set(WEIGHT_FORMATS))
    if unknown:
        raise ValueError(
            f"unknown weight format(s) {', '.join(unknown)}; "
            f"choose from {', '.join(WEIGHT_FORMATS)}"
        )
    if len(set(formats)) != len(formats):
        raise ValueError(f"weight formats listed twice: {formats}")
    if "keras_v3" not in formats:
        raise ValueError("weight formats must include keras_v3 (the original weights)")
    return [f for f in WEIGHT_FORMATS if f in formats]


def export_bioimageio(
    model: Any,
    plan: InferencePlan,
    sample: np.ndarray,
    out: str | Path,
    *,
    metadata: ExportMetadata | None = None,
    voxel_size_nm: Sequence[float] | None = None,
    slice_index: int | None = None,
    max_side: int = 512,
    weight_formats: Sequence[str] = WEIGHT_FORMATS,
    source_uri: str | None = None,
) -> ExportReport:
    """Write a bioimage.io model package for ``model`` run as ``plan`` says.

    Args:
        model: Keras 3 model, input ``(N, H, W, 2k + 1)`` float32 in [0, 1], output
            ``(N, H, W, C)`` probabilities.
        plan: its inference plan (normalisation, divisor, halo, threshold, classes).
        sample: ``(Z, H, W)`` or ``(H, W)`` real EM intensities; the test tensors are
            made from one slice of it (see :func:`select_test_sample`).
        out: package folder, or a path ending in ``.zip`` for a zipped package.
        metadata: authors, citations, licence and training data (defaults:
            :class:`ExportMetadata`).
        voxel_size_nm: ``(y, x)`` or one isotropic pixel size; default the plan's.
        slice_index: slice of ``sample`` (default: the middle non-blank one).
        max_side: largest side of the test tile.
        weight_formats: subset of :data:`WEIGHT_FORMATS`, ``keras_v3`` included.
        source_uri: the model URI, named in the package README.

    Returns:
        An :class:`ExportReport`.

    Raises:
        ValueError: bad arguments (each named), a plan the model does not match, or a
            description ``bioimageio.spec`` rejects.
    """
    out = Path(out)
    formats = _check_formats(weight_formats)
    metadata = metadata or ExportMetadata()
    voxel = resolve_voxel_size(plan.voxel_size_nm, voxel_size_nm)
    in_channels = 2 * _z_context(plan) + 1
    if int(model.input_shape[-1]) != in_channels:
        raise ValueError(
            f"the model takes {model.input_shape[-1]} input channel(s) but its plan "
            f"(z_context {_z_context(plan)}) gives {in_channels}"
        )
    if int(model.output_shape[-1]) != plan.out_channels:
        raise ValueError(
            f"the model outputs {model.output_shape[-1]} channel(s) but its plan has "
            f"{plan.n_classes} classes ({plan.out_channels} channel(s))"
        )
    raw, index = select_test_sample(sample, plan, slice_index, max_side)
    x = network_input(raw, plan)
    probs = np.asarray(model.predict_on_batch(x), dtype=np.float32)

    from PIL import Image

    with tempfile.TemporaryDirectory(prefix="mitoseg-bioimageio-") as tmp:
        stage = Path(tmp)
        test_input = raw[None].astype(np.float32)
        np.save(stage / "test_input.npy", test_input)
        np.save(stage / "test_output.npy", probs)
        centre = raw[..., raw.shape[-1] // 2]
        Image.fromarray(cover_image(centre, probs[0], plan.threshold)).save(stage / "cover.png")
        files, versions = _save_weights(model, formats, stage, x)
        doc = stage / "README.md"
        doc.write_text(
            _documentation(metadata, plan, voxel, formats, source_uri, _channel_names(in_channels))
        )
        descr = build_model_description(
            plan=plan,
            metadata=metadata,
            voxel_size_nm=voxel,
            weights=files,
            weight_versions=versions,
            test_input=stage / "test_input.npy",
            test_output=stage / "test_output.npy",
            cover=stage / "cover.png",
            documentation=doc,
            in_channels=in_channels,
        )
        _save_package(descr, out)
    return ExportReport(
        path=str(out),
        weight_formats=formats,
        test_input_shape=list(test_input.shape),
        test_output_shape=list(probs.shape),
        voxel_size_nm=list(voxel),
        threshold=plan.threshold,
        source_slice=index,
    )


def _save_package(descr: Any, out: Path) -> None:
    from bioimageio.spec import save_bioimageio_package, save_bioimageio_package_as_folder

    if out.suffix.lower() == ".zip":
        with atomic_path(out, suffix=".zip") as tmp:
            tmp.unlink(missing_ok=True)
            save_bioimageio_package(descr, output_path=tmp)
        return
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder (give a folder or a .zip path)")
    with atomic_dir(out) as tmp:
        save_bioimageio_package_as_folder(descr, output_path=tmp)
