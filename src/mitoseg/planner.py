"""Decide a model's inference plan (the evaluate stage) and evaluate with it.

:func:`make_plan` is the one place where how a trained model is run gets decided:

1. from the network: output classes, divisor, FLOPs per pixel and the measured
   receptive field (:mod:`mitoseg.model.analysis`), which gives the tile halo;
2. from the ``evaluate:`` settings: largest tile, batch, TTA, blank-slice rule;
3. on the planning slices (:func:`planning_slices`: the validation block, or with
   ``evaluate.plan_on: labelled`` the whole training stack; consecutive sections either
   way, so 2.5D context and z-averaging see true neighbours): the threshold
   (:func:`mitoseg.evaluate.choose_threshold`, fine search, with calibration), the image
   border padding, the z-averaging radius and hysteresis (a seed threshold a region must
   reach); on the validation block, the inference engine: every engine this build
   runs (:data:`mitoseg.inference.runtime.ENGINES`) is timed there and the fastest one
   whose score stays within ``engine_tolerance`` of Keras FP32 is kept.

:func:`evaluate_split` then scores the test slices with exactly that plan. The evaluate
stage, ``benchmarks/accuracy.py`` and tests call these; ``mitoseg predict``/``evaluate``
and the service only *read* the plan.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mitoseg.config import EvaluateConfig
from mitoseg.evaluate import EvaluationResult, choose_threshold, evaluate_stack
from mitoseg.inference.normalize import Normalization
from mitoseg.inference.plan import InferencePlan
from mitoseg.metrics import confusion_matrix, scores_from_confusion

__all__ = [
    "EngineTrial",
    "MemoPredictor",
    "PlanReport",
    "draft_plan",
    "evaluate_split",
    "make_plan",
    "planning_slices",
]


@dataclass
class EngineTrial:
    """One engine timed and scored on the validation slices."""

    engine: str
    seconds: float
    score: float
    eligible: bool
    error: str | None = None


@dataclass
class PlanReport:
    """How :func:`make_plan` decided (written into ``metrics.json``)."""

    receptive_field: dict[str, int] = field(default_factory=dict)
    threshold_curve: dict[str, float] = field(default_factory=dict)
    border: dict[str, float] = field(default_factory=dict)
    z_average: dict[str, float] = field(default_factory=dict)
    seed_threshold: dict[str, float] = field(default_factory=dict)
    engines: list[EngineTrial] = field(default_factory=list)
    #: validation batches the choices ran through Keras FP32 and got back from memory
    #: (:class:`MemoPredictor`), engine timing excluded
    forward_passes: dict[str, int] = field(default_factory=dict)
    #: which slices of the training stack the choices and the engine timing saw (set by
    #: the caller, which knows the stack; :func:`make_plan` sees arrays only)
    plan_on: str | None = None
    chosen_on_slices: list[int] = field(default_factory=list)
    engines_timed_on_slices: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return {
            "receptive_field": dict(self.receptive_field),
            "threshold_curve": dict(self.threshold_curve),
            "border": dict(self.border),
            "z_average": dict(self.z_average),
            "seed_threshold": dict(self.seed_threshold),
            "engines": [vars(t) for t in self.engines],
            "forward_passes": dict(self.forward_passes),
            "plan_on": self.plan_on,
            "chosen_on_slices": list(self.chosen_on_slices),
            "engines_timed_on_slices": list(self.engines_timed_on_slices),
        }


def draft_plan(
    model: Any,
    cfg: EvaluateConfig,
    class_names: Sequence[str],
    voxel_size_nm: Sequence[float] | None = None,
) -> tuple[InferencePlan, dict[str, int]]:
    """The plan before anything is chosen on data (threshold 0.5, Keras FP32): the
    network's default plan (:func:`mitoseg.model.analysis.default_plan`) with the
    ``evaluate:`` settings and the measured receptive field and halo.

    Args:
        model: the trained Keras model.
        cfg: ``evaluate:`` settings.
        class_names: class names in index order (``base.class_names``).
        voxel_size_nm: ``[z, y, x]`` of the training data, if known.

    Returns:
        ``(plan, receptive_field)``.

    Raises:
        ValueError: the class table does not match the model's outputs, or invalid
            tiling settings.
    """
    from mitoseg.inference.runtime import compile_predictor
    from mitoseg.model.analysis import default_plan, halo_for, receptive_field

    channels = int(model.output_shape[-1])
    n_classes = 2 if channels == 1 else channels
    if n_classes != len(class_names):
        raise ValueError(
            f"the model predicts {n_classes} classes but base.classes lists "
            f"{len(class_names)} ({', '.join(class_names)})"
        )
    base = default_plan(model, list(class_names))  # the one default plan of a network
    probe = max(512, base.divisor * 4)
    field_ = receptive_field(compile_predictor(model), probe=probe, channels=base.in_channels)
    halo = halo_for(field_["effective"]) if cfg.halo == "auto" else int(cfg.halo)
    plan = InferencePlan.model_validate(
        {
            **base.model_dump(),
            "source": "evaluate",
            "z_average": 0 if cfg.z_average == "auto" else int(cfg.z_average),
            "receptive_field": field_["full"],
            "normalization": Normalization(blank_range=cfg.blank_range),
            "tile_size": cfg.tile_size,
            "halo": halo,
            "batch_size": cfg.batch_size,
            "tta": cfg.tta,
            "min_object_size": cfg.min_object_size,
            "voxel_size_nm": list(voxel_size_nm) if voxel_size_nm is not None else None,
        }
    )
    return plan, dict(field_)


class MemoPredictor:
    """A batch predictor that remembers its answers.

    The plan's choices on the validation block (threshold, border, z-averaging,
    hysteresis) run the same tiles through the network again and again: z-averaging and
    hysteresis only change what is done with the probabilities, and each border is one
    set of tiles. Wrapped in this, every distinct input batch (keyed by shape, dtype and
    a BLAKE2b digest of its bytes) runs once; the network being deterministic, the
    answers are the ones a new forward pass would give.

    Args:
        predict: ``(B, H, W, C_in) float32 -> (B, H, W, C) float32`` batch predictor.
        max_bytes: answers kept at most (later new batches are computed, not stored).
    """

    def __init__(self, predict: Any, max_bytes: int = 2**31) -> None:
        self._predict = predict
        self.max_bytes = int(max_bytes)
        self._answers: dict[tuple[Any, ...], np.ndarray] = {}
        self._bytes = 0
        #: forward passes run (misses) and answers served from memory (hits).
        self.misses = 0
        self.hits = 0

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """The wrapped predictor's answer for ``batch`` (a copy: callers may modify it)."""
        import hashlib

        arr = np.ascontiguousarray(batch)
        digest = hashlib.blake2b(arr.view(np.uint8).reshape(-1), digest_size=16).digest()
        key = (arr.shape, arr.dtype.str, digest)
        known = self._answers.get(key)
        if known is not None:
            self.hits += 1
            return known.copy()
        self.misses += 1
        out = np.asarray(self._predict(arr))
        if self._bytes + out.nbytes <= self.max_bytes:
            self._answers[key] = out.copy()
            self._bytes += out.nbytes
        return out


def _score(predict: Any, images: np.ndarray, masks: np.ndarray, plan: InferencePlan) -> float:
    """Foreground IoU (binary) or mean IoU (multiclass) of ``plan`` on labelled slices."""
    from mitoseg.inference.predict import segment_stack

    pred = segment_stack(predict, images, plan)
    cm = confusion_matrix(masks, pred, plan.n_classes)
    scores = scores_from_confusion(cm)
    return float(scores["iou"] if plan.n_classes == 2 else scores["mean_iou"])


def _choose_border(
    predict: Any, plan: InferencePlan, images: Any, masks: Any, progress: bool
) -> tuple[InferencePlan, dict[str, float]]:
    """Keep reflect padding of ``halo`` at image borders, or none (as in training crops),
    whichever scores better on the validation slices (re-choosing the threshold for each;
    ties keep the halo)."""
    zero = _rethreshold(predict, plan.with_overrides(border=0), images, masks, progress)
    plans = {"halo": plan, "none": zero}
    scores = {name: round(_score(predict, images, masks, p), 6) for name, p in plans.items()}
    best = "none" if scores["none"] > scores["halo"] else "halo"
    return plans[best], scores


def _rethreshold(
    predict: Any, plan: InferencePlan, images: Any, masks: Any, progress: bool
) -> InferencePlan:
    """``plan`` with its threshold chosen again on the validation slices (when it was
    chosen there: binary, ``threshold_source == "validation"``)."""
    if plan.n_classes != 2 or plan.threshold_source != "validation":
        return plan
    choice = choose_threshold(predict, images, masks, plan, progress=progress)
    return plan.with_overrides(
        threshold=choice.threshold,
        calibration=choice.calibration,
        validation={"iou": round(choice.iou, 6)},
    )


def _choose_z_average(
    predict: Any,
    plan: InferencePlan,
    images: Any,
    masks: Any,
    candidates: Sequence[int],
    progress: bool,
) -> tuple[InferencePlan, dict[str, float]]:
    """The z-averaging radius (:attr:`InferencePlan.z_average`) that scores best on the
    validation block (threshold chosen again for each; ties keep the smaller radius)."""
    plans = {
        r: _rethreshold(predict, plan.with_overrides(z_average=r), images, masks, progress)
        for r in candidates
    }
    scores = {r: round(_score(predict, images, masks, p), 6) for r, p in plans.items()}
    best = max(sorted(scores), key=lambda r: (scores[r], -r))
    return plans[best], {str(r): s for r, s in scores.items()}


#: Hysteresis grid searched on the validation block: thresholds (plus the one chosen
#: without hysteresis) x seed thresholds above them.
HYSTERESIS_THRESHOLDS = tuple(round(0.3 + 0.05 * i, 2) for i in range(9))  # 0.3 .. 0.7
HYSTERESIS_SEEDS = tuple(round(0.6 + 0.05 * i, 2) for i in range(8))  # 0.6 .. 0.95


def _choose_seed_threshold(
    predict: Any, plan: InferencePlan, images: Any, masks: Any, setting: float | str | None
) -> tuple[InferencePlan, dict[str, float]]:
    """Hysteresis (:attr:`InferencePlan.seed_threshold`) for a binary plan.

    Only for ``setting == "auto"``: the validation probabilities are computed once with ``plan``;
    every threshold of :data:`HYSTERESIS_THRESHOLDS` (only the plan's own when it was not
    chosen on validation) with every seed of :data:`HYSTERESIS_SEEDS` above it is scored
    by foreground IoU on the validation block, against the plan without hysteresis; the
    best is kept only when it scores higher (ties keep no hysteresis). Returns the plan
    and the scores (``"none"``, ``"<threshold>/<seed>"``)."""
    if plan.n_classes != 2 or setting != "auto":
        return plan, {}  # a fixed setting is set by make_plan
    from mitoseg.inference.predict import decide_mask, iter_stack_probabilities
    from mitoseg.labels import labelled

    known = labelled(masks)  # unlabelled pixels count nowhere
    truth = (np.asarray(masks) != 0) & known
    probs = list(iter_stack_probabilities(predict, images, plan))

    def iou(candidate: InferencePlan) -> float:
        pred = (np.stack([decide_mask(p, candidate) for p in probs]) != 0) & known
        union = int((pred | truth).sum())
        return round(int((pred & truth).sum()) / union, 6) if union else 1.0

    threshold = float(plan.threshold)
    lows = {threshold}
    if plan.threshold_source == "validation":
        lows |= set(HYSTERESIS_THRESHOLDS)
    scores = {"none": iou(plan)}
    best, best_score = plan, scores["none"]
    for low in sorted(lows):
        for seed in (s for s in HYSTERESIS_SEEDS if s > low):
            candidate = plan.with_overrides(threshold=low, seed_threshold=seed)
            scores[f"{low:g}/{seed:g}"] = score = iou(candidate)
            if score > best_score:
                best, best_score = candidate, score
    if best is not plan:
        best = best.with_overrides(validation={**plan.validation, "iou": best_score})
    return best, scores


def _select_engine(
    model: Any,
    plan: InferencePlan,
    images: np.ndarray,
    masks: np.ndarray,
    candidates: Sequence[tuple[str, str]],
    tolerance: float,
    calibration: np.ndarray | None,
) -> tuple[InferencePlan, list[EngineTrial]]:
    from mitoseg.inference.runtime import compile_predictor

    trials: list[EngineTrial] = []
    reference: float | None = None
    for runtime, precision in [
        ("keras", "fp32"),
        *[c for c in candidates if c != ("keras", "fp32")],
    ]:
        name = f"{runtime}/{precision}"
        try:
            predict = compile_predictor(model, runtime, precision, calibration=calibration)
            _score(predict, images[:1], masks[:1], plan)  # warm-up: compile, trace shapes
            start = time.perf_counter()
            score = _score(predict, images, masks, plan)
            seconds = time.perf_counter() - start
        except Exception as exc:  # an engine that fails here is simply not chosen
            trials.append(EngineTrial(name, 0.0, 0.0, False, f"{type(exc).__name__}: {exc}"))
            continue
        if reference is None:
            reference = score
        ok = abs(score - reference) <= tolerance
        trials.append(EngineTrial(name, round(seconds, 4), round(score, 6), ok))
    eligible = [t for t in trials if t.eligible]
    best = min(eligible, key=lambda t: t.seconds)
    runtime, precision = best.engine.split("/")
    return plan.with_overrides(runtime=runtime, precision=precision), trials


def planning_slices(
    n_slices: int, val_slices: Sequence[int], plan_on: str
) -> tuple[list[int], list[int]]:
    """Which slices of the training stack :func:`make_plan` chooses on (``evaluate.plan_on``).

    ``validation``: the validation block alone. ``labelled``: every slice of the training
    stack in z order (the validation block and the training slices; unlabelled pixels
    count nowhere). Engines are timed on the validation block either way. With no
    validation block there is nothing to choose on.

    Args:
        n_slices: slices in the training stack.
        val_slices: indexes of the validation block in it.
        plan_on: ``validation`` or ``labelled``.

    Returns:
        ``(chosen_on, engine)``: indexes into the training stack (z order), and the
        positions of the validation block inside ``chosen_on``.

    Raises:
        ValueError: an unknown ``plan_on``, a validation index outside the stack.

    >>> planning_slices(6, [1, 2], "labelled")
    ([0, 1, 2, 3, 4, 5], [1, 2])
    >>> planning_slices(6, [2, 1], "validation")
    ([1, 2], [0, 1])
    """
    if plan_on not in ("validation", "labelled"):
        raise ValueError(
            f"planning_slices: plan_on must be 'validation' or 'labelled', got {plan_on!r}"
        )
    val = sorted({int(i) for i in val_slices})
    bad = [i for i in val if not 0 <= i < n_slices]
    if bad:
        raise ValueError(
            f"planning_slices: validation slices {bad} outside the training stack's "
            f"{n_slices} slices"
        )
    if plan_on == "validation" or not val:
        return val, list(range(len(val)))
    return list(range(n_slices)), val


def make_plan(
    model: Any,
    cfg: EvaluateConfig,
    class_names: Sequence[str],
    val_images: np.ndarray | None,
    val_masks: np.ndarray | None,
    *,
    voxel_size_nm: Sequence[float] | None = None,
    calibration_images: np.ndarray | None = None,
    engine_slices: Sequence[int] | None = None,
    progress: bool = False,
) -> tuple[InferencePlan, PlanReport]:
    """Decide the inference plan of a trained model (see the module docstring).

    Args:
        model: the trained Keras model.
        cfg: ``evaluate:`` settings (``threshold: auto`` chooses it on validation).
        class_names: class names in index order.
        val_images: ``(Z, H, W)`` raw slices the choices are made on (consecutive
            sections: :func:`planning_slices`), or None (then the threshold is
            ``cfg.threshold`` or 0.5 and the engine Keras FP32).
        val_masks: ``(Z, H, W)`` their class indexes (``IGNORE_INDEX`` where unlabelled),
            or None.
        voxel_size_nm: ``[z, y, x]`` of the training data, if known.
        calibration_images: ``(N, H, W)`` uint8 network inputs x 255 (normalised training
            slices) for engines that quantise (int8); stored with the plan
            (:meth:`InferencePlan.with_calibration`) so every consumer compiles the same
            engine. None: int8 is not tried.
        engine_slices: positions in ``val_images`` the engines are timed and scored on
            (the validation block); None: all of them.
        progress: show progress bars.

    Returns:
        ``(plan, report)``.
    """
    plan, field_ = draft_plan(model, cfg, class_names, voxel_size_nm)
    if calibration_images is not None:
        plan = plan.with_calibration(calibration_images)
    report = PlanReport(receptive_field=field_)
    has_val = val_images is not None and val_masks is not None and len(val_images) > 0
    predict: Any = None
    if has_val:  # Keras FP32 for every choice but the engine's, each tile run once
        from mitoseg.inference.runtime import compile_predictor

        predict = MemoPredictor(compile_predictor(model))
    if plan.n_classes == 2:
        if cfg.threshold != "auto":
            plan = plan.with_overrides(threshold=float(cfg.threshold), threshold_source="params")
        elif has_val:
            choice = choose_threshold(predict, val_images, val_masks, plan, progress=progress)
            plan = plan.with_overrides(
                threshold=choice.threshold,
                threshold_source="validation",
                calibration=choice.calibration,
                validation={"iou": round(choice.iou, 6)},
            )
            report.threshold_curve = choice.curve
    if plan.n_classes == 2 and isinstance(cfg.seed_threshold, float):
        plan = plan.with_overrides(seed_threshold=cfg.seed_threshold)
    if has_val:
        plan, report.border = _choose_border(predict, plan, val_images, val_masks, progress)
        if cfg.z_average == "auto" and len(val_images) >= 2:  # one slice: nothing to average
            plan, report.z_average = _choose_z_average(
                predict, plan, val_images, val_masks, [0, 1], progress
            )
        plan, report.seed_threshold = _choose_seed_threshold(
            predict, plan, val_images, val_masks, cfg.seed_threshold
        )
        report.forward_passes = {"run": predict.misses, "remembered": predict.hits}
        from mitoseg.inference.runtime import available_engines

        candidates = [e for e in available_engines() if f"{e[0]}/{e[1]}" in cfg.engines]
        timed = list(range(len(val_images))) if engine_slices is None else list(engine_slices)
        plan, report.engines = _select_engine(
            model,
            plan,
            np.asarray(val_images)[timed],
            np.asarray(val_masks)[timed],
            candidates,
            cfg.engine_tolerance,
            plan.calibration_images(),
        )
    return plan, report


def evaluate_split(
    model: Any,
    plan: InferencePlan,
    images: np.ndarray,
    masks: np.ndarray,
    *,
    progress: bool = False,
) -> EvaluationResult:
    """Score labelled slices with exactly ``plan`` (its engine, tiling and threshold).

    Args:
        model: the Keras model the plan belongs to.
        plan: from :func:`make_plan` or :func:`mitoseg.tracking.load_model_and_plan`.
        images: ``(Z, H, W)`` raw slices.
        masks: ``(Z, H, W)`` class indexes.
        progress: show a progress bar.
    """
    from mitoseg.inference.runtime import predictor_for_plan

    return evaluate_stack(predictor_for_plan(model, plan), images, masks, plan, progress)
