"""Typed, validated configuration for every pipeline stage.

``params.yaml`` has one section per stage plus a shared ``base`` section. Stage scripts
in ``pipelines/`` load their section with :func:`load_section` and pass the resulting
object (or its fields) to library functions; library code never reads ``params.yaml``.

Every model uses ``extra="forbid"`` so a misspelt key fails loudly with its name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mitoseg.errors import ConfigError
from mitoseg.labels import IGNORE_INDEX

__all__ = [
    "VNC_CLASSES",
    "AugmentConfig",
    "BaseConfig",
    "ConfigError",
    "EvaluateConfig",
    "ModelConfig",
    "PatchifyConfig",
    "RegisterConfig",
    "ServeConfig",
    "SourceConfig",
    "TrainConfig",
    "ValidateConfig",
    "load_params",
    "load_section",
    "resolve_train_config",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


#: Class table of the VNC label map (``--source sample --mask-kind labels``, and
#: ``vnc_stack1_labels.tif``): 0/32/64/96 membranes and 128 membrane junctions form one
#: membrane class; 255 (intracellular space) is the background.
VNC_CLASSES: dict[str, int | list[int]] = {
    "background": 255,
    "membrane": [0, 32, 64, 96, 128],
    "glia": 159,
    "mitochondria": 191,
    "synapse": 223,
}


class BaseConfig(_Strict):
    """Shared settings (``base:``).

    ``classes`` is the class table: class name -> value of that class in the raw mask
    stacks. The first entry is the background. Two entries means binary segmentation
    (a single sigmoid output); more means multiclass (softmax over N classes). Several
    raw values may map to one class by giving a list, e.g. ``membrane: [0, 32, 64, 96]``.

    ``ignore_value`` is the raw mask value of an *unlabelled* pixel (the ignore label,
    :mod:`mitoseg.labels`): such pixels are mapped to class index
    :data:`~mitoseg.labels.IGNORE_INDEX` and weigh nothing in training and evaluation, so
    a few labelled slices (or regions) of a stack can be the training data. None: every
    pixel is labelled. It must not be a value of ``classes``.
    """

    seed: int = 42
    classes: dict[str, int | list[int]] = Field(
        default_factory=lambda: {"background": 0, "mitochondria": 255}
    )
    ignore_value: int | None = Field(default=None, ge=0, le=65535)

    @field_validator("classes")
    @classmethod
    def _check_classes(cls, v: dict[str, int | list[int]]) -> dict[str, int | list[int]]:
        if len(v) < 2:
            raise ValueError("base.classes needs at least 2 classes (background first)")
        seen: set[int] = set()
        for name, values in v.items():
            vals = values if isinstance(values, list) else [values]
            if not vals:
                raise ValueError(f"base.classes.{name} lists no mask values")
            for x in vals:
                if not 0 <= x <= 65535:
                    raise ValueError(f"base.classes.{name}: mask value {x} is outside 0..65535")
                if x in seen:
                    raise ValueError(f"base.classes.{name}: mask value {x} is used twice")
                seen.add(x)
        if len(v) > IGNORE_INDEX:
            raise ValueError(
                f"base.classes has {len(v)} classes; at most {IGNORE_INDEX} are supported "
                f"(class index {IGNORE_INDEX} marks unlabelled pixels)"
            )
        return v

    @model_validator(mode="after")
    def _check_ignore_value(self) -> BaseConfig:
        values = {x for v in self.classes.values() for x in (v if isinstance(v, list) else [v])}
        if self.ignore_value is not None and self.ignore_value in values:
            raise ValueError(
                f"base.ignore_value {self.ignore_value} is a mask value of base.classes; "
                "choose a raw value no class uses"
            )
        return self

    @property
    def n_classes(self) -> int:
        """Number of classes, background included."""
        return len(self.classes)

    @property
    def is_binary(self) -> bool:
        """True when the class table has exactly background + one foreground class."""
        return self.n_classes == 2

    @property
    def class_names(self) -> list[str]:
        """Class names in index order (index 0 is the background)."""
        return list(self.classes)

    def value_to_index(self) -> dict[int, int]:
        """Map raw mask value -> class index. For binary tables a mask value of 1 is also
        accepted for the foreground (masks stored 0/1 instead of 0/255), unless it is the
        ``ignore_value``, which maps to :data:`~mitoseg.labels.IGNORE_INDEX`."""
        out: dict[int, int] = {}
        for idx, values in enumerate(self.classes.values()):
            for x in values if isinstance(values, list) else [values]:
                out[int(x)] = idx
        if self.is_binary and 1 not in out and self.ignore_value != 1:
            out[1] = 1
        if self.ignore_value is not None and self.ignore_value not in out:
            out[int(self.ignore_value)] = IGNORE_INDEX
        return out


class SourceConfig(_Strict):
    """Where the training data comes from (``source:``).

    ``volume: null`` (the default): the canonical raw directory (``data/raw``, tracked by
    ``data.dvc``) as it is. A volume location (OME-Zarr, Zarr or TIFF; local path or
    ``s3://`` URI), or ``store`` for the volume named by the label store's ``store.json``:
    the canonical layout is assembled from that volume and the project's label store
    (:func:`mitoseg.data.assemble.assemble_dataset`), reading only the labelled slices
    and their ``context`` neighbours.
    """

    volume: str | None = Field(None, min_length=1)
    voxel_size_nm: tuple[float, float, float] | None = Field(
        None, description="(z, y, x) nm overriding the volume's metadata"
    )
    context: int | Literal["auto"] = Field(
        "auto",
        description="neighbours read on each side of a labelled slice; auto: "
        "patchify.z_context + the z-averaging radius (evaluate.z_average, auto: 1)",
    )

    @field_validator("voxel_size_nm")
    @classmethod
    def _check_voxel_size(
        cls, v: tuple[float, float, float] | None
    ) -> tuple[float, float, float] | None:
        if v is not None and not all(x > 0 for x in v):
            raise ValueError(f"voxel_size_nm must be 3 positive numbers (nm), got {list(v)}")
        return v

    @field_validator("context")
    @classmethod
    def _check_context(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 0 <= v <= 16:
            raise ValueError(f"context must be 0..16 or 'auto', got {v}")
        return v

    def resolve_context(self, z_context: int, z_average: int | str) -> int:
        """The neighbours to read: ``context``, or for ``auto`` ``z_context`` plus the
        z-averaging radius (``z_average``; ``auto`` may choose 1)."""
        if isinstance(self.context, int):
            return self.context
        return z_context + (1 if z_average == "auto" else int(z_average))


class ValidateConfig(_Strict):
    """Thresholds of the great-expectations suite (``validate:``)."""

    allowed_dtypes: list[str] = Field(default_factory=lambda: ["uint8", "uint16"])
    min_height: int = Field(64, ge=1)
    min_width: int = Field(64, ge=1)
    max_height: int = Field(65536, ge=1)
    max_width: int = Field(65536, ge=1)
    min_intensity_std: float = Field(2.0, ge=0, description="below this a slice is 'constant'")
    min_intensity_range: float = Field(10.0, ge=0)
    max_foreground_fraction: float = Field(0.9, ge=0, le=1)
    min_slices_per_split: int = Field(1, ge=1)
    require_test_masks: bool = True


class PatchifyConfig(_Strict):
    """Patch extraction (``patchify:``)."""

    patch_size: int = Field(256, ge=16)
    step: int = Field(256, ge=1)
    val_fraction: float = Field(0.25, ge=0, lt=1)
    pad_mode: Literal["reflect", "constant", "edge"] = "reflect"
    z_context: int = Field(
        0,
        ge=0,
        le=8,
        description="2.5D: neighbouring slices on each side stored as extra image channels",
    )

    @model_validator(mode="after")
    def _step_le_size(self) -> PatchifyConfig:
        if self.step > self.patch_size:
            raise ValueError(
                f"patchify.step ({self.step}) must not exceed patchify.patch_size "
                f"({self.patch_size}); gaps would leave pixels unseen"
            )
        return self


class AugmentConfig(_Strict):
    """On-the-fly augmentation strengths (``augment:``). Zero/false disables a transform."""

    rotation_deg: float = Field(90.0, ge=0, le=180)
    shift_fraction: float = Field(0.1, ge=0, le=0.5)
    zoom_range: float = Field(0.15, ge=0, lt=1)
    shear_deg: float = Field(10.0, ge=0, le=45)
    hflip: bool = True
    vflip: bool = True
    elastic_prob: float = Field(0.3, ge=0, le=1)
    elastic_alpha: float = Field(30.0, ge=0, description="displacement scale, pixels")
    elastic_sigma: float = Field(6.0, gt=0, description="displacement smoothness, pixels")
    brightness: float = Field(0.1, ge=0, le=1)
    contrast: float = Field(0.2, ge=0, le=1)
    gamma: float = Field(0.2, ge=0, le=1)
    noise_std: float = Field(0.02, ge=0, le=0.5)
    blur_prob: float = Field(0.2, ge=0, le=1)
    blur_sigma: float = Field(1.0, ge=0)
    preview_samples: int = Field(4, ge=1, le=16)


class ModelConfig(_Strict):
    """UNet architecture."""

    depth: int = Field(4, ge=1, le=6, description="number of down-sampling steps")
    base_filters: int = Field(16, ge=1)
    batch_norm: bool = True
    dropout: float = Field(0.1, ge=0, lt=1)
    variant: Literal["plain", "residual", "attention"] = "plain"


class TrainConfig(_Strict):
    """Training recipe, resolved from a preset plus overrides (``train:``).

    A run is bounded by ``epochs * steps_per_epoch`` optimizer steps (and early stopping),
    so with ``deterministic`` it gives the same model on every machine. ``max_train_seconds``
    adds a wall-clock budget (benchmarks): the run then stops at a machine-dependent epoch
    and the cosine schedule follows the clock too, so the model depends on machine speed.
    ``init_from`` starts from a trained model's weights (fine-tuning) instead of a random
    initialisation; its architecture must be ``model`` with the same number of classes.
    """

    preset: Literal["default", "seed"] = "default"
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: Literal["bce", "dice", "bce_dice", "weighted_bce"] = "bce_dice"
    foreground_weight: float = Field(1.0, gt=0, description="positive weight for weighted_bce")
    optimizer: Literal["adam"] = "adam"
    learning_rate: float = Field(1e-3, gt=0)
    lr_schedule: Literal["plateau", "cosine"] = "cosine"
    batch_size: int = Field(8, ge=1)
    epochs: int = Field(30, ge=1)
    steps_per_epoch: int | None = Field(None, ge=1, description="None: one pass over patches")
    crop_size: int | None = Field(128, ge=16, description="random training crop; None: full")
    foreground_crop_prob: float = Field(0.5, ge=0, le=1)
    hard_negative_prob: float = Field(
        0.0, ge=0, le=1, description="crops centred on dark background (myelin, membranes)"
    )
    hard_negative_source: Literal["dark", "mined"] = Field(
        "dark",
        description="where hard-negative crops are centred: dark background, or (mined) the "
        "model's own confident false positives on the training patches, refreshed every "
        "mine_every epochs (mitoseg.model.mining)",
    )
    mine_every: int = Field(5, ge=1, description="epochs between two minings (mined)")
    mine_threshold: float = Field(
        0.5, gt=0, lt=1, description="probability above which a background pixel is mined"
    )
    augment: bool = True
    early_stopping_patience: int | None = Field(
        None, ge=1, description="stop after this many epochs without a better val_loss; None: off"
    )
    reduce_lr_patience: int = Field(3, ge=1)
    reduce_lr_factor: float = Field(0.5, gt=0, lt=1)
    min_lr: float = Field(1e-6, ge=0)
    max_train_seconds: float | None = Field(
        None, gt=0, description="wall-clock budget (benchmarks; not reproducible)"
    )
    deterministic: bool = Field(
        True,
        description="TensorFlow op determinism, one inter-op thread: the same model from "
        "the same seed",
    )
    init_from: str | None = Field(
        None,
        min_length=1,
        description="start from this model: .keras path, models:/<name>@<alias>, "
        "models:/<name>/<version> or runs:/<run_id>/model",
    )
    mixed_precision: Literal["auto", "on", "off"] = "auto"
    distribute: Literal["auto", "none", "mirrored"] = "auto"
    warmup_fraction: float = Field(
        0.0, ge=0, lt=0.5, description="cosine schedule: linear warm-up over this share of steps"
    )
    clipnorm: float | None = Field(None, gt=0, description="clip the global gradient norm")
    ema_momentum: float | None = Field(
        None, gt=0, lt=1, description="keep an exponential moving average of the weights"
    )
    keep: Literal["best", "last"] = Field(
        "best",
        description="weights saved: best epoch by the monitored loss, or the last epoch's "
        "(the moving average when ema_momentum is set)",
    )
    precise_bn_batches: int = Field(
        0,
        ge=0,
        description="re-estimate BatchNorm statistics from this many of the epoch's training "
        "batches before each validation, and from the whole last epoch before saving; 0: off",
    )

    @model_validator(mode="after")
    def _crop_probabilities(self) -> TrainConfig:
        if self.foreground_crop_prob + self.hard_negative_prob > 1:
            raise ValueError(
                f"train.foreground_crop_prob ({self.foreground_crop_prob}) + "
                f"train.hard_negative_prob ({self.hard_negative_prob}) must not exceed 1"
            )
        return self


#: Presets for :class:`TrainConfig`. ``seed`` reproduces the reference projects' recipe
#: (31M-parameter UNet, BCE, Adam 1e-4, batch 4, 25 epochs, early stopping, LR reduction,
#: full 256x256 patches, 25 % validation); ``default`` is the fast CPU recipe.
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "seed": {
        "model": {
            "depth": 4,
            "base_filters": 64,
            "batch_norm": True,
            "dropout": 0.1,
            "variant": "plain",
        },
        "loss": "bce",
        "learning_rate": 1e-4,
        "lr_schedule": "plateau",
        "batch_size": 4,
        "epochs": 25,
        "crop_size": None,
        "foreground_crop_prob": 0.0,
        "early_stopping_patience": 5,
        "reduce_lr_patience": 3,
    },
    "default": {
        "model": {
            "depth": 4,
            "base_filters": 16,
            "batch_norm": True,
            "dropout": 0.1,
            "variant": "plain",
        },
        "loss": "bce_dice",
        "learning_rate": 1e-3,
        "lr_schedule": "cosine",
        "batch_size": 8,
        "epochs": 30,
        "crop_size": 128,
        # 40 % of crops centred on mitochondria, 30 % on dark background (myelin, dark
        # membranes: what a model trained on foreground crops calls mitochondria far from
        # its training slices), the rest uniform; chosen on the gap-split benchmark
        "foreground_crop_prob": 0.4,
        "hard_negative_prob": 0.3,
        # stability (issue 19): BatchNorm statistics re-estimated from training batches
        # (the moving averages lag the weights), warm-up, clipping, a moving average of the
        # weights, and the last weights kept: no checkpoint picked, and no run ended, at
        # one noisy validation epoch
        "warmup_fraction": 0.05,
        "clipnorm": 1.0,
        "ema_momentum": 0.99,
        "keep": "last",
        "precise_bn_batches": 10,
        "early_stopping_patience": None,
    },
}


def resolve_train_config(section: dict[str, Any] | None) -> TrainConfig:
    """Merge ``train:`` overrides over the named preset and validate.

    Args:
        section: the ``train`` mapping from params.yaml. ``preset`` picks the base recipe;
            every other key overrides it (``model`` is merged key by key).

    Returns:
        The resolved :class:`TrainConfig`.

    Raises:
        ConfigError: unknown preset or invalid key/value (message names the field).
    """
    section = dict(section or {})
    preset = section.get("preset", "default")
    if preset not in TRAIN_PRESETS:
        raise ConfigError(
            f"train.preset: unknown preset {preset!r}; choose one of {sorted(TRAIN_PRESETS)}"
        )
    merged: dict[str, Any] = {k: v for k, v in TRAIN_PRESETS[preset].items() if k != "model"}
    model = dict(TRAIN_PRESETS[preset]["model"])
    model.update(section.pop("model", None) or {})
    merged.update(section)
    merged["preset"] = preset
    merged["model"] = model
    try:
        return TrainConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_format_error("train", exc)) from None


class EvaluateConfig(_Strict):
    """Whole-slice evaluation and the inference plan it decides (``evaluate:``).

    The tiling, threshold and engine chosen here are written into the model's inference
    plan (:mod:`mitoseg.inference.plan`), which every later consumer reads.
    """

    tile_size: int = Field(
        1536, ge=16, description="largest tile side; a slice whose padded size fits runs whole"
    )
    halo: int | Literal["auto"] = Field(
        "auto", description="context pixels per tile side; auto: from the receptive field"
    )
    batch_size: int = Field(4, ge=1)
    tta: bool = False
    threshold: float | Literal["auto"] = Field(
        "auto", description="auto: maximise IoU on the validation slices (0.001 steps)"
    )
    blank_range: float = Field(
        0.02, ge=0, lt=1, description="slices with a smaller robust range are background"
    )
    engines: list[str] = Field(
        default_factory=lambda: ["keras/fp32", "openvino/fp32", "openvino/bf16", "openvino/int8"],
        description="engines tried on the validation slices; the fastest within tolerance wins",
    )
    engine_tolerance: float = Field(0.005, ge=0, le=1, description="validation IoU difference")
    min_object_size: int = Field(20, ge=0, description="pixels; smaller objects not counted")
    figure_slices: int = Field(3, ge=0)
    z_average: Annotated[int, Field(ge=0, le=8)] | Literal["auto"] = Field(
        "auto",
        description="average probabilities over 2r+1 slices; auto: r = 0 or 1, whichever "
        "scores better on the validation block",
    )
    seed_threshold: Annotated[float, Field(gt=0, lt=1)] | Literal["auto"] | None = Field(
        "auto",
        description="hysteresis: a region above the threshold is kept only where it "
        "reaches this probability; auto: chosen jointly with the threshold on the "
        "validation block, or none when it does not score better; null: threshold alone",
    )
    plan_on: Literal["validation", "labelled"] = Field(
        "labelled",
        description="slices the threshold, border, z-averaging and hysteresis are chosen "
        "on: the validation block, or every slice of the training stack (validation block "
        "and training slices in z order, unlabelled pixels ignored); engines are always "
        "timed on the validation block",
    )

    @field_validator("halo")
    @classmethod
    def _check_halo(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 0:
            raise ValueError(f"halo must be >= 0 or 'auto', got {v}")
        return v

    @field_validator("threshold")
    @classmethod
    def _check_threshold(cls, v: float | str) -> float | str:
        if isinstance(v, float) and not 0.0 <= v <= 1.0:
            raise ValueError(f"threshold must be in [0, 1] or 'auto', got {v}")
        return v


class RegisterConfig(_Strict):
    """Model registry rule (``register:``)."""

    model_name: str = "mitoseg-unet"
    metric: Literal["iou", "dice", "mean_iou"] = "iou"
    champion_alias: str = "champion"
    challenger_alias: str = "challenger"


class ServeConfig(_Strict):
    """Serving guard rails, compute budget and batching (``serve:``).

    How a model runs (tile size, halo, threshold, engine) is not set here: the model's
    inference plan decides (:class:`mitoseg.inference.plan.InferencePlan`).

    A request's cost is its pixel count times ``plan.flops_per_pixel`` (x8 with TTA), in
    GFLOP; for a plan without ``flops_per_pixel`` it is the pixel count (x8 with TTA), in
    Mpixel, checked against the ``*_mpixel`` limits instead.
    """

    max_bytes: int = Field(256 * 1024 * 1024, ge=1)
    max_pixels: int = Field(64 * 1024 * 1024, ge=1, description="per page")
    max_pages: int = Field(512, ge=1)
    max_side: int = Field(32768, ge=1)
    max_batch_size: int = Field(
        16, ge=1, description="most tiles in one forward pass; concurrent requests share it"
    )
    max_batch_mpixel: float = Field(
        3.0,
        gt=0,
        description="most tile pixels in one forward pass, Mpixel (a larger tile runs alone): "
        "the engine's memory grows with it, a CPU's throughput does not",
    )
    max_request_gflop: float = Field(
        2000.0, gt=0, description="compute one request may take (else 413)"
    )
    max_inflight_gflop: float = Field(
        4000.0, gt=0, description="compute of all requests in flight together (else 429)"
    )
    max_request_mpixel: float = Field(
        64.0, gt=0, description="per request, when the plan has no flops_per_pixel"
    )
    max_inflight_mpixel: float = Field(
        128.0, gt=0, description="in flight, when the plan has no flops_per_pixel"
    )
    retry_after_s: int = Field(5, ge=1, description="Retry-After of a 429")
    request_timeout_s: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="from a request's arrival to its response; else a JSON 408 (upload) or 504",
    )

    @model_validator(mode="after")
    def _check_budget(self) -> ServeConfig:
        for unit in ("gflop", "mpixel"):
            request = getattr(self, f"max_request_{unit}")
            inflight = getattr(self, f"max_inflight_{unit}")
            if request > inflight:
                raise ValueError(
                    f"max_request_{unit} ({request:g}) must not exceed "
                    f"max_inflight_{unit} ({inflight:g})"
                )
        return self


_SECTIONS: dict[str, type[BaseModel]] = {
    "base": BaseConfig,
    "source": SourceConfig,
    "validate": ValidateConfig,
    "patchify": PatchifyConfig,
    "augment": AugmentConfig,
    "evaluate": EvaluateConfig,
    "register": RegisterConfig,
    "serve": ServeConfig,
}

T = TypeVar("T", bound=BaseModel)


def _format_error(section: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        parts.append(f"{section}.{loc}: {err['msg']}" if loc else f"{section}: {err['msg']}")
    return f"invalid params ({len(parts)} problem(s)): " + "; ".join(parts)


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read a params file into a plain dict.

    Raises:
        ConfigError: the file is missing, not YAML, or not a mapping.
    """
    from mitoseg.io import read_mapping

    return read_mapping(
        path,
        "params file",
        fmt="yaml",
        expected="a mapping of sections at the top level",
        empty_ok=True,
        error=ConfigError,
    )


def load_section(name: str, path: str | Path = "params.yaml") -> Any:
    """Load and validate one section of a params file.

    Args:
        name: section name (``base``, ``source``, ``validate``, ``patchify``, ``augment``,
            ``train``, ``evaluate``, ``register``, ``serve``).
        path: the params file.

    Returns:
        The section's config object (``train`` resolved against its preset).

    Raises:
        ConfigError: unknown section, or invalid values (message names each field).
    """
    params = load_params(path)
    section = params.get(name) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: section {name!r} must be a mapping")
    if name == "train":
        return resolve_train_config(section)
    if name not in _SECTIONS:
        raise ConfigError(
            f"unknown params section {name!r}; known: {sorted([*_SECTIONS, 'train'])}"
        )
    try:
        return _SECTIONS[name].model_validate(section)
    except ValidationError as exc:
        raise ConfigError(_format_error(name, exc)) from None
