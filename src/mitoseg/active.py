"""The active-learning loop, measured: which slices (or regions) to label next, and the
schema of ``benchmarks/active_learning.py``'s results.

A lab labels a few slices of a pool, trains, labels more and trains again. Which slices
it adds is the strategy:

* ``suggest``: the unlabelled slices the current model is least sure of
  (:func:`top_k` over :func:`mitoseg.suggest.suggest_stack`'s slice scores);
* ``random``: unlabelled slices drawn at random (:func:`random_picks`, seeded);
* ``even``: evenly spaced (:func:`even_picks`): from nothing, the centres of ``k`` equal
  bins of the pool; then, one at a time, the unlabelled slice farthest from every labelled
  one (ties: the lowest slice);
* ``partial``: as many labelled pixels as ``even``, spread as square regions over every
  slice of the pool (:func:`region_order`, :func:`regions_for_pixels`,
  :func:`region_mask`): a seeded order of the tiles of all slices, of which each round
  labels the shortest prefix with enough pixels (so the regions of a round include those
  of the round before).

:class:`ActiveLearningReport` is ``benchmarks/results/active_learning*.json``;
:func:`summarise_arms` computes its per strategy and round mean +- sd over seeds.

Pure and light: numpy and pydantic.
"""

from __future__ import annotations

import statistics
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from mitoseg.io import read_json_model
from mitoseg.stability import SeedSpread

__all__ = [
    "STRATEGIES",
    "ActiveLearningReport",
    "ArmResult",
    "Region",
    "RoundResult",
    "RoundSummary",
    "even_picks",
    "random_picks",
    "read_active_learning",
    "region_mask",
    "region_order",
    "regions_for_pixels",
    "summarise_arms",
    "top_k",
]

#: Strategies of the benchmark, in the order of its tables.
STRATEGIES: tuple[str, ...] = ("suggest", "random", "even", "partial")
Strategy = Literal["suggest", "random", "even", "partial"]


# ---------------------------------------------------------------------------- selection


def _check_pick(pool: Sequence[int], labelled: Collection[int], k: int, where: str) -> list[int]:
    """The unlabelled slices of ``pool`` in order, after checking the arguments."""
    if len(set(pool)) != len(pool) or not pool:
        raise ValueError(f"{where}: pool must be distinct slices, got {list(pool)}")
    outside = sorted(set(labelled) - set(pool))
    if outside:
        raise ValueError(f"{where}: labelled slices {outside} are not in the pool")
    free = [z for z in pool if z not in set(labelled)]
    if not 1 <= k <= len(free):
        raise ValueError(f"{where}: k must be in 1..{len(free)} (unlabelled slices), got {k}")
    return free


def even_picks(pool: Sequence[int], labelled: Collection[int], k: int) -> list[int]:
    """``k`` unlabelled slices of ``pool``, evenly spaced.

    Without labelled slices: the centres of ``k`` equal bins of the pool (pool positions
    ``floor((i + 1/2) P / k)``, ``P`` = pool size). With some: one at a time, the unlabelled
    slice whose distance (in pool positions) to the nearest labelled or already picked
    slice is largest; ties go to the lowest position.

    Args:
        pool: the slices that may be labelled, in stack order.
        labelled: slices of ``pool`` already labelled.
        k: slices to add, ``1 .. unlabelled``.

    Returns:
        The ``k`` slices, in the order picked.

    Raises:
        ValueError: a repeated or empty pool, labelled slices outside it, or ``k`` out of range.
    """
    _check_pick(pool, labelled, k, "even_picks")
    n = len(pool)
    if not labelled:
        return [pool[int((i + 0.5) * n / k)] for i in range(k)]
    taken = {pool.index(z) for z in labelled}
    picks: list[int] = []
    for _ in range(k):
        dist = [
            (min(abs(i - j) for j in taken), -i) for i in range(n) if i not in taken
        ]  # fmt: skip
        best = -max(dist)[1]
        taken.add(best)
        picks.append(pool[best])
    return picks


def random_picks(
    pool: Sequence[int], labelled: Collection[int], k: int, seed: int | Sequence[int]
) -> list[int]:
    """``k`` unlabelled slices of ``pool`` drawn without replacement.

    Args:
        pool: the slices that may be labelled.
        labelled: slices of ``pool`` already labelled.
        k: slices to add, ``1 .. unlabelled``.
        seed: seed of :func:`numpy.random.default_rng` (e.g. ``(seed, round)``).

    Returns:
        The ``k`` slices, in the order drawn.

    Raises:
        ValueError: as :func:`even_picks`.
    """
    free = _check_pick(pool, labelled, k, "random_picks")
    rng = np.random.default_rng(list(seed) if isinstance(seed, Sequence) else seed)
    return [free[int(i)] for i in rng.choice(len(free), size=k, replace=False)]


def top_k(scores: Mapping[int, float], labelled: Collection[int], k: int) -> list[int]:
    """The ``k`` unlabelled slices of highest score (ties: the lowest slice).

    Args:
        scores: slice -> score (higher = label first), e.g. ``mitoseg suggest``'s slice
            scores; its keys are the pool.
        labelled: slices already labelled.
        k: slices to add, ``1 .. unlabelled``.

    Returns:
        The ``k`` slices, highest score first.

    Raises:
        ValueError: as :func:`even_picks` (the pool being ``scores``' keys).
    """
    free = _check_pick(sorted(scores), labelled, k, "top_k")
    return sorted(free, key=lambda z: (-scores[z], z))[:k]


class Region(NamedTuple):
    """A labelled rectangle: rows ``top .. top + height - 1``, columns
    ``left .. left + width - 1`` of slice ``slice``."""

    slice: int
    top: int
    left: int
    height: int
    width: int

    @property
    def pixels(self) -> int:
        """Its area in pixels."""
        return self.height * self.width


def region_order(
    slices: Sequence[int], shape: tuple[int, int], tile: int, seed: int | Sequence[int]
) -> list[Region]:
    """Every tile of every slice (a grid from the top-left corner, border tiles cut), in a
    seeded random order.

    Args:
        slices: the slices to cover.
        shape: ``(H, W)`` of a slice.
        tile: tile side, pixels (>= 1).
        seed: seed of :func:`numpy.random.default_rng`.

    Returns:
        ``len(slices) * ceil(H / tile) * ceil(W / tile)`` regions.

    Raises:
        ValueError: no slice, a non-positive shape or ``tile < 1``.
    """
    h, w = shape
    if not slices or h < 1 or w < 1:
        raise ValueError(
            f"region_order: need slices and a positive shape, got {list(slices)}, {shape}"
        )
    if tile < 1:
        raise ValueError(f"region_order: tile must be >= 1, got {tile}")
    grid = [
        Region(z, top, left, min(tile, h - top), min(tile, w - left))
        for z in slices
        for top in range(0, h, tile)
        for left in range(0, w, tile)
    ]
    rng = np.random.default_rng(list(seed) if isinstance(seed, Sequence) else seed)
    return [grid[int(i)] for i in rng.permutation(len(grid))]


def regions_for_pixels(order: Sequence[Region], n_pixels: int) -> list[Region]:
    """The shortest prefix of ``order`` holding at least ``n_pixels`` pixels.

    Args:
        order: regions, e.g. from :func:`region_order`.
        n_pixels: pixels to label (>= 1).

    Returns:
        The prefix (its pixel count is ``n_pixels`` exactly when the tiles add up to it).

    Raises:
        ValueError: ``n_pixels < 1`` or more than all of ``order`` holds.
    """
    total = sum(r.pixels for r in order)
    if not 1 <= n_pixels <= total:
        raise ValueError(f"regions_for_pixels: n_pixels must be in 1..{total}, got {n_pixels}")
    out: list[Region] = []
    count = 0
    for region in order:
        if count >= n_pixels:
            break
        out.append(region)
        count += region.pixels
    return out


def region_mask(
    regions: Sequence[Region], slices: Sequence[int], shape: tuple[int, int]
) -> np.ndarray:
    """Where the regions are.

    Args:
        regions: labelled rectangles.
        slices: the stack's slice numbers (``regions``' ``slice`` values index into it).
        shape: ``(H, W)`` of a slice.

    Returns:
        ``(len(slices), H, W)`` bool, True inside a region.

    Raises:
        ValueError: a region on a slice not in ``slices`` or reaching past the border.
    """
    h, w = shape
    where = {z: i for i, z in enumerate(slices)}
    out = np.zeros((len(slices), h, w), dtype=bool)
    for r in regions:
        if (
            r.slice not in where
            or r.top < 0
            or r.left < 0
            or r.top + r.height > h
            or (r.left + r.width > w)
        ):
            raise ValueError(f"region_mask: {r} is outside slices {list(slices)} of shape {shape}")
        out[where[r.slice], r.top : r.top + r.height, r.left : r.left + r.width] = True
    return out


# ---------------------------------------------------------------------------- schema


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RoundSeconds(_Strict):
    """Wall-clock seconds of one round: choosing its slices, training, scoring."""

    select: float = Field(ge=0)
    train: float = Field(ge=0)
    score: float = Field(ge=0)
    total: float = Field(ge=0)


class RoundResult(_Strict):
    """One round of one arm: what was labelled, how the model then scores on the test slices.

    Attributes:
        round: 0 = the start, then 1 .. rounds.
        added: slices added this round (the start's slices at round 0; ``partial``: slices
            that gained a region).
        labelled_slices: slices holding a labelled pixel after this round.
        labelled_pixels: labelled pixels after this round.
        steps: optimizer steps of this round's training.
        init: ``scratch`` (round 0) or ``previous`` (fine-tuned from the round before).
        test_iou, dice, precision, recall, object_f1: on the fixed test slices.
        plan: the plan's choices (threshold, border, z_average, seed_threshold).
        suggest_scores: ``suggest`` only: the score of every pool slice with the model of
            the round before (what this round's choice was made on).
        seconds: :class:`RoundSeconds`.
    """

    round: int = Field(ge=0)
    added: list[int]
    labelled_slices: list[int]
    labelled_pixels: int = Field(ge=1)
    steps: int = Field(ge=1)
    init: Literal["scratch", "previous"]
    test_iou: float = Field(ge=0, le=1)
    dice: float = Field(ge=0, le=1)
    precision: float = Field(ge=0, le=1)
    recall: float = Field(ge=0, le=1)
    object_f1: float = Field(ge=0, le=1)
    plan: dict[str, Any]
    suggest_scores: dict[int, float] | None = None
    seconds: RoundSeconds


class ArmResult(_Strict):
    """One strategy with one seed, every round (``shared_start``: its round 0 is the model
    trained once for this seed and shared by the whole-slice strategies)."""

    strategy: Strategy
    seed: int
    shared_start: bool
    git_commit: str
    rounds: list[RoundResult] = Field(min_length=1)


class RoundSummary(_Strict):
    """One strategy at one round, over its seeds."""

    strategy: Strategy
    round: int = Field(ge=0)
    seeds: list[int]
    labelled_slices: SeedSpread
    labelled_pixels: SeedSpread
    test_iou: SeedSpread
    object_f1: SeedSpread
    seconds: SeedSpread


class ActiveLearningReport(_Strict):
    """``benchmarks/results/active_learning*.json``.

    Attributes:
        what: what was measured, in words.
        scoring: how a model is scored (the plan's validation, or a fixed threshold).
        data: the stack, crop, pool, validation and test slices.
        settings: rounds, k, start, steps, the training recipe and the other knobs.
        machine: the machine and git commit (``benchmarks/common.machine``).
        summary: per strategy and round, mean +- sd over seeds (:func:`summarise_arms`).
        arms: every (strategy, seed) run.
    """

    what: str
    scoring: str
    data: dict[str, Any]
    settings: dict[str, Any]
    machine: dict[str, Any]
    summary: list[RoundSummary]
    arms: list[ArmResult]


def _spread(values: Sequence[float]) -> SeedSpread:
    return SeedSpread(
        n=len(values),
        mean=round(statistics.fmean(values), 4),
        sd=round(statistics.stdev(values), 4) if len(values) > 1 else None,
        min=round(min(values), 4),
        max=round(max(values), 4),
    )


def summarise_arms(arms: Sequence[ArmResult]) -> list[RoundSummary]:
    """Per strategy (in :data:`STRATEGIES` order) and round: mean, sample sd, min and max
    over the arms' seeds of labelled slices, labelled pixels, test IoU, object F1 and the
    round's seconds (sd None for one seed)."""
    groups: dict[tuple[str, int], list[tuple[int, RoundResult]]] = {}
    for arm in arms:
        for r in arm.rounds:
            groups.setdefault((arm.strategy, r.round), []).append((arm.seed, r))
    out = []
    for (strategy, rnd), rows in sorted(
        groups.items(), key=lambda kv: (STRATEGIES.index(kv[0][0]), kv[0][1])
    ):
        rs = [r for _, r in rows]
        out.append(
            RoundSummary(
                strategy=strategy,  # type: ignore[arg-type]
                round=rnd,
                seeds=[s for s, _ in rows],
                labelled_slices=_spread([len(r.labelled_slices) for r in rs]),
                labelled_pixels=_spread([r.labelled_pixels for r in rs]),
                test_iou=_spread([r.test_iou for r in rs]),
                object_f1=_spread([r.object_f1 for r in rs]),
                seconds=_spread([r.seconds.total for r in rs]),
            )
        )
    return out


def read_active_learning(path: str | Path) -> ActiveLearningReport:
    """Read an active-learning results file.

    Raises:
        DataError: missing, not JSON, or not an :class:`ActiveLearningReport` (names the
            file and the field).
    """
    return read_json_model(path, ActiveLearningReport, "active-learning results")
