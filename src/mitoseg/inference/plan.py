"""The inference plan: how a trained model is run, decided once and stored beside it.

Every consumer of a model (the evaluate stage, ``mitoseg predict`` / ``mitoseg
evaluate``, the volume path, ``mitoseg bento build`` and the BentoML service) reads the
same :class:`InferencePlan` instead of deciding tile size, halo, threshold, class table,
intensity normalisation or runtime on its own; command-line flags may override single
fields (:meth:`InferencePlan.with_overrides`), nothing else decides. This follows
nnU-Net's ``plans.json`` stored next to the weights.

Where it lives:

* written by the evaluate stage as ``inference_plan.json`` beside ``model.keras``
  (``artifacts/train/``) and into the MLflow logged model's artifacts, so
  ``models:/mitoseg-unet@champion`` carries it (:func:`mitoseg.tracking.load_inference_plan`);
* copied into the BentoML model directory by :func:`mitoseg.serving.bento.import_model`.

A model without a plan (e.g. a ``.keras`` file from elsewhere) runs with
:meth:`InferencePlan.default_for`, which derives the model-dependent fields from the
network itself and says so in ``source``.

This module is pure (pydantic + numpy): no TensorFlow, MLflow or BentoML import.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from mitoseg.errors import DataError
from mitoseg.inference.normalize import Normalization
from mitoseg.io import atomic_path, write_json

__all__ = [
    "CALIBRATION_FILE",
    "PLAN_FILE",
    "PLAN_VERSION",
    "Calibration",
    "InferencePlan",
    "context_window",
    "foreground_class",
    "plan_path_for",
]

#: File name of the plan beside the weights (``model.keras``) and in model artifacts.
PLAN_FILE = "inference_plan.json"
#: File beside the plan holding the int8 engine's calibration inputs (see
#: :meth:`InferencePlan.with_calibration`).
CALIBRATION_FILE = "inference_calibration.npy"
#: Schema version written into every plan; bumped on incompatible changes.
PLAN_VERSION = 1

#: The name of the class that every consumer counts, measures and exports as mitochondria.
FOREGROUND_NAME = "mitochondria"

Runtime = Literal["keras", "openvino"]
Precision = Literal["fp32", "bf16", "int8"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Calibration(_Strict):
    """How well the validation probabilities match observed frequencies (binary models).

    Attributes:
        ece: expected calibration error over ``bins`` equal-width bins (0 is perfect).
        brier: mean squared error of the foreground probability.
        bins: number of reliability bins.
        reliability: per bin ``[lower edge, mean predicted probability, observed
            foreground frequency, pixel fraction]``; empty bins are left out.
        pixels: validation pixels the figures are computed on.
    """

    ece: float = Field(ge=0, le=1)
    brier: float = Field(ge=0, le=1)
    bins: int = Field(ge=1)
    reliability: list[list[float]] = Field(default_factory=list)
    pixels: int = Field(ge=0)


class InferencePlan(_Strict):
    """Everything needed to run a model exactly as it was evaluated.

    Attributes:
        version: schema version (:data:`PLAN_VERSION`).
        source: who decided it: ``evaluate`` (the evaluate stage) or ``default`` (derived
            from the network alone, see :meth:`default_for`).
        n_classes: classes, background included (2 = one sigmoid channel).
        class_names: ``n_classes`` names in index order, background first.
        divisor: ``2**depth`` of the UNet: every tile side is a multiple of it.
        z_context: neighbouring slices on each side the network sees as extra input
            channels (2.5D): slice ``z`` is predicted from slices ``z-k .. z+k`` of the
            stack it belongs to, the nearest existing slice repeated past the stack's ends
            (a single image is its own context). The network's input has ``2k + 1``
            channels; 0 = 2D.
        z_average: the probabilities of slice ``z`` are the mean of those of slices
            ``z-r .. z+r`` (``r = z_average``, clamped at the stack's ends) before the
            threshold or argmax: mitochondria run through many sections, a false positive
            on a dark membrane seldom does (the evaluate stage keeps it when it scores
            better on the validation block). A block of a volume needs :attr:`z_halo`
            extra slices on each side.
        receptive_field: measured receptive field of the network, pixels (odd), or None.
        normalization: intensity normalisation of each slice.
        tile_size: largest tile side, a multiple of ``divisor``; images whose padded size
            fits run as a single tile.
        halo: context pixels around the part of a tile that is kept (half the tile
            overlap); at least half the receptive field by default.
        border: reflect padding at the image borders, pixels; None means ``halo``. 0 puts
            the image border at the tile border, as the training crops had it (the
            evaluate stage keeps whichever scores better on validation).
        batch_size: tiles per forward pass.
        tta: average over the 8 flips/rotations (8x the compute).
        threshold: foreground probability threshold (binary); None for multiclass argmax.
        seed_threshold: hysteresis (binary plans): a region of pixels ``>= threshold``
            (8-connected, within one slice) is foreground only where it reaches this
            probability somewhere; regions that never do are background. A false
            positive is mostly a faint region of its own, a mitochondrion has a confident
            core (the evaluate stage keeps it when it scores better on the validation
            block). None: the threshold alone decides. Per slice, so any block of whole
            slices of a volume comes out as in the whole volume.
        threshold_source: ``validation`` (chosen on validation slices), ``params``,
            ``default`` (0.5, nothing chosen) or ``argmax``.
        min_object_size: objects smaller than this (pixels) are not counted as objects.
        voxel_size_nm: ``[z, y, x]`` voxel size of the training data in nm, if known.
        runtime: inference engine the plan was validated with.
        precision: arithmetic of that engine.
        flops_per_pixel: forward-pass floating-point operations per input pixel (for
            request cost budgets), or None.
        validation: figures measured with this plan on the validation slices, e.g.
            ``{"iou": ..., "dice": ...}``.
        calibration: calibration of the validation probabilities (binary models).
        calibration_file: name of the file beside the plan holding the network inputs an
            int8 engine is quantised with (``(N, H, W) uint8``, intensity x 255), so every
            consumer compiles exactly the engine that was validated; None when absent.
            :meth:`write` and :meth:`read` move it together with the plan.
    """

    version: int = PLAN_VERSION
    source: Literal["evaluate", "default"] = "evaluate"
    n_classes: int = Field(ge=2, le=256)
    class_names: list[str]
    divisor: int = Field(16, ge=1)
    z_context: int = Field(0, ge=0, le=8)
    z_average: int = Field(0, ge=0, le=8)
    receptive_field: int | None = Field(None, ge=1)
    normalization: Normalization = Field(default_factory=Normalization)
    tile_size: int = Field(1024, ge=16)
    halo: int = Field(64, ge=0)
    border: int | None = Field(None, ge=0)
    batch_size: int = Field(4, ge=1)
    tta: bool = False
    threshold: float | None = Field(0.5, ge=0, le=1)
    seed_threshold: float | None = Field(None, ge=0, le=1)
    threshold_source: Literal["validation", "params", "default", "argmax"] = "default"
    min_object_size: int = Field(20, ge=0)
    voxel_size_nm: list[float] | None = None
    runtime: Runtime = "keras"
    precision: Precision = "fp32"
    flops_per_pixel: float | None = Field(None, gt=0)
    validation: dict[str, float] = Field(default_factory=dict)
    calibration: Calibration | None = None
    calibration_file: str | None = None
    _calibration_npy: bytes | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _check(self) -> InferencePlan:
        if self.version != PLAN_VERSION:
            raise ValueError(
                f"plan version {self.version} is not supported (this mitoseg reads "
                f"version {PLAN_VERSION})"
            )
        if len(self.class_names) != self.n_classes:
            raise ValueError(
                f"class_names lists {len(self.class_names)} names for n_classes={self.n_classes}"
            )
        if self.tile_size % self.divisor:
            raise ValueError(
                f"tile_size {self.tile_size} is not a multiple of divisor {self.divisor}"
            )
        if 2 * self.halo >= self.tile_size:
            raise ValueError(
                f"halo {self.halo} leaves nothing of a {self.tile_size}-pixel tile "
                "(need 2 * halo < tile_size)"
            )
        if self.n_classes == 2 and self.threshold is None:
            raise ValueError("a binary plan needs a threshold")
        if self.n_classes > 2 and self.threshold is not None:
            raise ValueError("a multiclass plan uses argmax: threshold must be null")
        if self.seed_threshold is not None and (
            self.threshold is None or self.seed_threshold <= self.threshold
        ):
            raise ValueError(
                f"seed_threshold {self.seed_threshold} needs a binary plan with a lower "
                f"threshold (threshold {self.threshold})"
            )
        if self.voxel_size_nm is not None and (
            len(self.voxel_size_nm) != 3 or any(v <= 0 for v in self.voxel_size_nm)
        ):
            raise ValueError(
                f"voxel_size_nm must be 3 positive numbers [z, y, x], got {self.voxel_size_nm}"
            )
        return self

    # ------------------------------------------------------------------ derived

    @property
    def out_channels(self) -> int:
        """Output channels of the network: 1 (sigmoid) for binary, else ``n_classes``."""
        return 1 if self.n_classes == 2 else self.n_classes

    @property
    def foreground_class(self) -> int | None:
        """Index of the mitochondria class (:func:`foreground_class` of ``class_names``)."""
        return foreground_class(self.class_names)

    @property
    def in_channels(self) -> int:
        """Input channels of the network: ``2 * z_context + 1``."""
        return 2 * self.z_context + 1

    @property
    def z_halo(self) -> int:
        """Extra slices each side a block of a volume needs so that its inner slices come
        out as in the whole volume: ``z_context + z_average``."""
        return self.z_context + self.z_average

    @property
    def decision(self) -> float:
        """Threshold passed to :func:`mitoseg.inference.predict.probabilities_to_mask` (0.5 is
        ignored there for multiclass argmax)."""
        return 0.5 if self.threshold is None else float(self.threshold)

    def tiling_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`mitoseg.inference.predict.predict_tiled` for this plan."""
        return {
            "tile_size": self.tile_size,
            "halo": self.halo,
            "border": self.border,
            "batch_size": self.batch_size,
            "tta": self.tta,
            "divisor": self.divisor,
        }

    def with_overrides(self, **overrides: Any) -> InferencePlan:
        """A copy with the given fields replaced (``None`` values are ignored), validated.

        Used for command-line flags: ``plan.with_overrides(threshold=args.threshold)``.

        Raises:
            ValueError: an unknown field, or a combination the plan rejects.
        """
        changes = {k: v for k, v in overrides.items() if v is not None}
        unknown = sorted(set(changes) - set(type(self).model_fields))
        if unknown:
            raise ValueError(f"unknown inference plan field(s): {', '.join(unknown)}")
        if not changes:
            return self
        data = self.model_dump()
        data.update(changes)
        try:
            plan = type(self).model_validate(data)
        except ValidationError as exc:
            raise ValueError(_format(exc, "override")) from None
        plan._calibration_npy = self._calibration_npy
        return plan

    # -------------------------------------------------------------- calibration

    def with_calibration(self, images: np.ndarray) -> InferencePlan:
        """A copy carrying int8 calibration inputs (written beside the plan).

        Args:
            images: ``(N, H, W)`` uint8 network inputs x 255 (normalised slices), or
                ``(N, H, W, in_channels)`` for a 2.5D plan.

        Raises:
            ValueError: not a non-empty uint8 array of that shape.
        """
        from mitoseg.checks import check_array

        c = self.in_channels
        ndim, axes = (3, "(N, H, W)") if self.z_context == 0 else (4, f"(N, H, W, {c})")
        images = check_array(
            images,
            "calibration images",
            ndim=ndim,
            axes={ndim: axes},
            sizes={-1: c} if ndim == 4 else None,
            dtypes=("uint8",),
            nonempty=True,
        )
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(images), allow_pickle=False)
        plan = self.model_copy(update={"calibration_file": CALIBRATION_FILE})
        plan._calibration_npy = buf.getvalue()
        return plan

    def calibration_images(self) -> np.ndarray | None:
        """``(N, H, W)`` (2.5D: ``(N, H, W, in_channels)``) float32 in [0, 1] calibration
        inputs, or None without them."""
        if self._calibration_npy is None:
            return None
        images = np.load(io.BytesIO(self._calibration_npy), allow_pickle=False)
        return images.astype(np.float32) / np.float32(255.0)

    # ---------------------------------------------------------------- factories

    @classmethod
    def default_for(
        cls,
        n_channels: int,
        divisor: int,
        class_names: list[str] | None = None,
        **fields: Any,
    ) -> InferencePlan:
        """A plan derived from the network alone (``source="default"``).

        Args:
            n_channels: output channels of the model (1 = sigmoid binary).
            divisor: ``2**depth`` of the model.
            class_names: names in index order; ``["background", "mitochondria"]`` for
                binary, ``class_0..`` otherwise, when None.
            **fields: further fields to set (e.g. ``receptive_field``, ``halo``).
        """
        n_classes = 2 if n_channels == 1 else int(n_channels)
        if class_names is None:
            class_names = (
                ["background", "mitochondria"]
                if n_classes == 2
                else [f"class_{i}" for i in range(n_classes)]
            )
        tile = max(int(divisor), 1024 - 1024 % int(divisor))
        data: dict[str, Any] = {
            "source": "default",
            "n_classes": n_classes,
            "class_names": list(class_names),
            "divisor": int(divisor),
            "tile_size": tile,
            "threshold": 0.5 if n_classes == 2 else None,
            "threshold_source": "default" if n_classes == 2 else "argmax",
        }
        data.update(fields)
        return cls.model_validate(data)

    # ---------------------------------------------------------------------- I/O

    def write(self, path: str | Path) -> Path:
        """Write the plan as JSON (and its calibration file beside it), atomically.

        Returns:
            The plan path.

        Raises:
            ValueError: the plan names a calibration file but holds no calibration data.
        """
        path = Path(path)
        if self.calibration_file is not None:
            if self._calibration_npy is None:
                raise ValueError(
                    f"the plan names {self.calibration_file} but holds no calibration images"
                )
            with atomic_path(path.parent / self.calibration_file) as tmp:
                tmp.write_bytes(self._calibration_npy)
        write_json(path, self.model_dump(mode="json"))
        return path

    @classmethod
    def from_json(cls, data: Any, where: str) -> InferencePlan:
        """Validate parsed JSON; ``where`` (a path or URI) is named in errors.

        Raises:
            DataError: not an object, or invalid fields (each named).
        """
        if not isinstance(data, dict):
            raise DataError(f"{where}: an inference plan must be a JSON object")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise DataError(f"{where}: {_format(exc, 'inference plan')}") from None

    @classmethod
    def read(cls, path: str | Path) -> InferencePlan:
        """Read and validate a plan file.

        Raises:
            DataError: missing, unreadable or invalid file (the message names it).
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise DataError(f"{path}: inference plan not found") from None
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: cannot read the inference plan ({exc})") from None
        plan = cls.from_json(data, str(path))
        if plan.calibration_file is not None:
            calib = path.parent / Path(plan.calibration_file).name
            try:
                raw = calib.read_bytes()
                images = np.load(io.BytesIO(raw), allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise DataError(
                    f"{calib}: cannot read the calibration images the plan {path} names ({exc})"
                ) from None
            if images.ndim != 3 or images.dtype != np.uint8:
                raise DataError(
                    f"{calib}: expected (N, H, W) uint8, got {images.dtype} {images.shape}"
                )
            plan._calibration_npy = raw
        return plan


def foreground_class(class_names: list[str]) -> int | None:
    """Which class is mitochondria: the one rule of evaluation, instances, the service,
    napari and the bioimage.io export.

    The class named exactly ``"mitochondria"`` (class 0 is always the background and is
    never it); else, in a two-class table, class 1 (the one foreground class, whatever its
    name: a one-channel network's output); else None (a multiclass table without a class
    of that name has no mitochondria: no objects are counted or measured).

    Args:
        class_names: class names in index order, background first.

    Returns:
        The class index, or None.
    """
    names = list(class_names)
    if FOREGROUND_NAME in names[1:]:
        return names.index(FOREGROUND_NAME, 1)
    return 1 if len(class_names) == 2 else None


def context_window(z: int, depth: int, k: int) -> list[int]:
    """Indexes of the slices a 2.5D network sees for slice ``z`` of a ``depth``-slice stack.

    ``z - k .. z + k``, each clamped to ``[0, depth - 1]`` (the nearest existing slice
    repeated past the stack's ends), in order; ``[z]`` for ``k = 0``.

    Raises:
        ValueError: ``z`` outside the stack, ``depth < 1`` or ``k < 0``.
    """
    if depth < 1 or k < 0 or not 0 <= z < depth:
        raise ValueError(
            f"context_window: need 0 <= z < depth and k >= 0, got z={z}, depth={depth}, k={k}"
        )
    return [min(max(z + d, 0), depth - 1) for d in range(-k, k + 1)]


def _format(exc: ValidationError, what: str) -> str:
    parts = []
    for err in exc.errors():
        msg = str(err["msg"]).removeprefix("Value error, ")
        loc = ".".join(str(x) for x in err["loc"])
        parts.append(f"{loc}: {msg}" if loc else msg)
    return f"invalid {what}: " + "; ".join(parts)


def plan_path_for(model_path: str | Path) -> Path | None:
    """The plan file beside a ``.keras`` model, or None when there is none.

    ``<stem>.inference_plan.json`` is preferred (several models in one folder), then
    ``inference_plan.json`` in the same folder.
    """
    model_path = Path(model_path)
    for candidate in (
        model_path.with_name(f"{model_path.stem}.{PLAN_FILE}"),
        model_path.with_name(PLAN_FILE),
    ):
        if candidate.is_file():
            return candidate
    return None
