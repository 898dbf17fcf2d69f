"""How much a recipe's test IoU depends on the seed: the schema of the stability results.

``benchmarks/stability.py`` trains each recipe at equal optimizer steps with several
training seeds and writes ``benchmarks/results/stability*.json`` through
:class:`StabilityReport`; the train stage reads it back with :func:`read_stability` and
logs the spread of the recipe it trains (:func:`spread_tags`) beside the run's seed, so a
run in the MLflow UI says how far another seed may land from it.

Imports nothing heavy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mitoseg.io import read_json_model

__all__ = ["RecipeSummary", "SeedSpread", "StabilityReport", "read_stability", "spread_tags"]


class SeedSpread(BaseModel):
    """One figure over seeds."""

    model_config = ConfigDict(extra="forbid")

    n: int = Field(ge=1)
    mean: float
    sd: float | None = Field(None, description="sample standard deviation; None for n = 1")
    min: float
    max: float

    def text(self) -> str:
        """E.g. ``0.790 +- 0.008 (5 seeds, 0.780-0.801)``."""
        sd = "n/a" if self.sd is None else f"{self.sd:.3f}"
        seeds = "seed" if self.n == 1 else "seeds"
        return f"{self.mean:.3f} +- {sd} ({self.n} {seeds}, {self.min:.3f}-{self.max:.3f})"


class RecipeSummary(BaseModel):
    """A recipe on one dataset over its seeds."""

    model_config = ConfigDict(extra="forbid")

    seeds: list[int]
    test_iou: SeedSpread
    object_f1: SeedSpread
    mean_abs_delta_val_iou: SeedSpread
    runs_with_collapsed_validation: int = Field(ge=0)
    test_false_objects_per_slice: SeedSpread | None = Field(
        None, description="objects with no labelled mitochondrion under them, per test slice"
    )
    test_long_false_objects_per_slice: SeedSpread | None = Field(
        None, description="the same, elongation >= 3 (long dark processes, mostly)"
    )
    distant_long_objects_per_slice: SeedSpread | None = Field(
        None, description="long objects called per unlabelled slice 50+ sections away"
    )


class StabilityReport(BaseModel):
    """``benchmarks/results/stability*.json``: ``summary`` is keyed ``<dataset>/<recipe>``."""

    model_config = ConfigDict(extra="forbid")

    what: str
    steps: int = Field(ge=1)
    machine: dict[str, Any]
    summary: dict[str, RecipeSummary]
    runs: list[dict[str, Any]]


def read_stability(path: str | Path) -> StabilityReport:
    """Read a stability results file.

    Raises:
        DataError: missing, not JSON, or not a :class:`StabilityReport` (names the file
            and the field).
    """
    return read_json_model(path, StabilityReport, "stability results")


def spread_tags(report: StabilityReport, recipe: str) -> dict[str, str]:
    """MLflow tags with the measured spread of ``recipe`` on every dataset of ``report``.

    Returns:
        ``{"stability.<dataset>.test_iou": "mean +- sd (n seeds, min-max)", ...,
        "stability.measured_at": "<commit>, <cpu>, <steps> steps"}``; only the second key
        when the report has no row for ``recipe``.
    """
    tags = {
        f"stability.{key.split('/', 1)[0]}.test_iou": row.test_iou.text()
        for key, row in sorted(report.summary.items())
        if key.split("/", 1)[1] == recipe
    }
    commit = report.machine.get("git_commit", "unknown")
    cpu = report.machine.get("cpu", "unknown CPU")
    tags["stability.measured_at"] = (
        f"{commit}, {cpu}, {report.steps} steps" if tags else f"recipe {recipe!r} not measured"
    )
    return tags
