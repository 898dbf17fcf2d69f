"""The validation report: :class:`ValidationReport`, its failure vocabulary
(:func:`failure`: ``{"file", "split", "slice", "check", "message"}``, the message naming
the file and the slice on its own) and its outputs (``report.json``, ``summary.md``,
``slices.csv``; :func:`require_valid_report` for the stages after ``validate``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mitoseg.config import BaseConfig
from mitoseg.io import DataError, atomic_path, write_json

__all__ = [
    "ROW_ID",
    "ValidationReport",
    "failure",
    "format_failures",
    "report_to_dict",
    "require_valid_report",
    "summary_markdown",
    "write_report",
]

#: Name of the per-slice row key column (``"<split>:<slice>"``) used to map GX results back.
ROW_ID = "row_id"


@dataclass
class ValidationReport:
    """Outcome of :func:`validate_dataset`.

    Attributes:
        success: True when the file pre-check and every expectation passed.
        table: per-slice statistics, one row per split/slice (see :func:`slice_table`).
        failures: ``[{"file": str, "split": str | None, "slice": int | None, "check": str,
            "message": str}]``, file-level problems first, then failed expectations.
        raw_dir: the validated directory, as given.
        expectations: summary of every evaluated expectation (``check``, ``expectation``,
            ``kwargs``, ``success``, ``element_count``, ``unexpected_count``,
            ``observed_value``).
        statistics: GX statistics summed over both suites (``evaluated_expectations``,
            ``successful_expectations``, ``unsuccessful_expectations``, ``success_percent``).
        splits: per-split summary (slices, shape, dtypes, intensity, class fractions).
        dataset: the parsed ``dataset.json`` (None when missing or invalid).
        classes: the class table the masks were checked against (``base.classes``).
        thresholds: the ``ValidateConfig`` used, as a dict.
    """

    success: bool
    table: pd.DataFrame
    failures: list[dict[str, Any]]
    raw_dir: str = ""
    expectations: list[dict[str, Any]] = field(default_factory=list)
    statistics: dict[str, Any] = field(default_factory=dict)
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)
    dataset: dict[str, Any] | None = None
    classes: dict[str, Any] = field(default_factory=dict)
    thresholds: dict[str, Any] = field(default_factory=dict)


# file-level pre-check


def failure(
    file: Path | str, check: str, message: str, split: str | None = None, slice_: int | None = None
) -> dict[str, Any]:
    where = f"{file}" if slice_ is None else f"{file} slice {slice_}"
    return {
        "file": str(file),
        "split": split,
        "slice": slice_,
        "check": check,
        "message": f"{where}: {message}",
    }


# outputs


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    return value


def report_to_dict(report: ValidationReport) -> dict[str, Any]:
    """The JSON document of ``report.json`` (also printed by ``mitoseg validate --json``).

    Returns:
        ``{"success", "raw_dir", "dataset", "classes", "thresholds", "statistics",
        "expectations", "failures", "splits", "slices"}``; ``slices`` is the table as
        records with NaN replaced by null.
    """
    records = [
        {k: _json_safe(v) for k, v in rec.items()}
        for rec in report.table.drop(columns=[ROW_ID]).to_dict(orient="records")
    ]
    return {
        "success": report.success,
        "raw_dir": report.raw_dir,
        "dataset": report.dataset,
        "classes": report.classes,
        "thresholds": report.thresholds,
        "statistics": report.statistics,
        "expectations": report.expectations,
        "failures": report.failures,
        "splits": report.splits,
        "slices": records,
    }


def format_failures(report: ValidationReport) -> str:
    """A multi-line message listing every failure (each names its file and slice)."""
    lines = [f"validation of {report.raw_dir} failed ({len(report.failures)} problem(s)):"]
    lines += [f"  - [{f['check']}] {f['message']}" for f in report.failures]
    return "\n".join(lines)


def _fmt(v: Any, spec: str = ".3f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec)


def summary_markdown(report: ValidationReport) -> str:
    """Human-readable ``summary.md``: status, per-split statistics, expectations, failures."""
    status = "PASSED" if report.success else "FAILED"
    lines = [
        f"# Data validation: {status}",
        "",
        f"- raw data: `{report.raw_dir}`",
        f"- source: {(report.dataset or {}).get('source', '-')}",
        f"- mask kind: {(report.dataset or {}).get('mask_kind', '-')}",
        f"- classes: {', '.join(f'{k}={v}' for k, v in report.classes.items())}",
        f"- expectations: {report.statistics.get('successful_expectations', 0)}/"
        f"{report.statistics.get('evaluated_expectations', 0)} passed",
        "",
        "## Splits",
        "",
        "| split | slices | shape | dtype | mean intensity | mean std | foreground |",
        "|---|---|---|---|---|---|---|",
    ]
    for split, s in report.splits.items():
        shape = "x".join(str(d) for d in s["image_shape"][1:])
        lines.append(
            f"| {split} | {s['n_slices']} | {shape} | {s['image_dtype']} | "
            f"{_fmt(s['intensity_mean'], '.1f')} | {_fmt(s['intensity_std_mean'], '.1f')} | "
            f"{_fmt(s['foreground_fraction'])} |"
        )
    lines += ["", "## Class fractions", "", "| split | " + " | ".join(report.classes) + " |"]
    lines.append("|---|" + "---|" * len(report.classes))
    for split, s in report.splits.items():
        fr = s["class_fractions"] or {}
        lines.append(f"| {split} | " + " | ".join(_fmt(fr.get(n)) for n in report.classes) + " |")
    lines += ["", "## Expectations", "", "| check | expectation | result | unexpected |"]
    lines.append("|---|---|---|---|")
    for e in report.expectations:
        result = "pass" if e["success"] else "FAIL"
        lines.append(
            f"| {e['check']} | `{e['expectation']}` | {result} | {e['unexpected_count'] or 0} |"
        )
    lines += ["", "## Failures", ""]
    lines += [f"- [{f['check']}] {f['message']}" for f in report.failures] or ["None."]
    return "\n".join(lines) + "\n"


def write_report(report: ValidationReport, out_dir: str | Path) -> dict[str, Path]:
    """Write ``slices.csv``, ``summary.md`` and ``report.json`` into ``out_dir``, atomically.

    ``report.json`` is written last, so it never describes files that were not written.
    The stage script only calls this for a successful report (a failed run leaves the
    previous outputs untouched).

    Returns:
        ``{"report": path, "summary": path, "slices": path}``.
    """
    out = Path(out_dir)
    paths = {
        "slices": out / "slices.csv",
        "summary": out / "summary.md",
        "report": out / "report.json",
    }
    with atomic_path(paths["slices"]) as tmp:
        report.table.drop(columns=[ROW_ID]).to_csv(tmp, index=False)
    with atomic_path(paths["summary"]) as tmp:
        tmp.write_text(summary_markdown(report))
    write_json(paths["report"], report_to_dict(report))
    return paths


def require_valid_report(report_path: str | Path, base: BaseConfig) -> dict[str, Any]:
    """Load a ``report.json`` and refuse unless it records a successful validation.

    Args:
        report_path: ``artifacts/validate/report.json``.
        base: the current shared config; its class table must be the validated one.

    Returns:
        The parsed report.

    Raises:
        DataError: missing or unreadable report, failed validation, or a report made
            with a different ``base.classes``; the message names the report.
    """
    path = Path(report_path)
    if not path.is_file():
        raise DataError(f"{path}: validation report not found; run the validate stage first")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: validation report is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or "success" not in data:
        raise DataError(f"{path}: not a validation report (no 'success' field)")
    if data["success"] is not True:
        n = len(data.get("failures") or [])
        raise DataError(
            f"{path}: validation report says the data failed validation ({n} failure(s)); "
            "fix the data and re-run the validate stage"
        )
    if data.get("classes") != dict(base.classes):
        raise DataError(
            f"{path}: data was validated with class table {data.get('classes')} but "
            f"base.classes is {dict(base.classes)}; re-run the validate stage"
        )
    return data
