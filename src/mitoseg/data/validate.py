"""Data validation of the canonical raw layout (the ``validate`` stage).

Two layers report into one :class:`~mitoseg.data.validate_report.ValidationReport` with
one failure vocabulary (:mod:`mitoseg.data.validate_report`):

1. A file-level pre-check (:func:`mitoseg.data.validate_files.check_files`):
   ``dataset.json``, every split and stack present, every TIFF structurally complete and
   decodable, masks as deep as their images. Problems here cannot become table rows, so
   they are reported directly as failures naming the file.
2. A per-slice statistics table (:func:`mitoseg.data.slice_table.slice_table`, one row
   per split/slice) checked by a great-expectations 1.x suite whose thresholds come from
   :class:`~mitoseg.config.ValidateConfig` (:func:`build_slice_suite`, here). The context
   is ephemeral (in memory): no GX project directory is written anywhere.

Every failure is a dict ``{"file", "split", "slice", "check", "message"}``; the message
names the file and the slice on its own, so printing the messages names every offender.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mitoseg.config import BaseConfig, ValidateConfig
from mitoseg.data.slice_table import class_column, slice_table, split_table
from mitoseg.data.validate_files import check_files
from mitoseg.data.validate_report import ROW_ID, ValidationReport, failure

__all__ = ["build_slice_suite", "build_split_suite", "validate_dataset"]

# great-expectations suites

#: check name -> (table column naming the offending file, message template). The template
#: is formatted with the row (``r``) and the config (``c``).
_ROW_CHECKS: dict[str, tuple[str, str]] = {
    "dtype": ("file", "image dtype {r[dtype]} is not allowed (validate.allowed_dtypes: {dtypes})"),
    "finite": ("file", "image contains NaN or infinite values"),
    "height": (
        "file",
        "image height {r[height]} is outside validate.min_height..max_height "
        "({c.min_height}..{c.max_height})",
    ),
    "width": (
        "file",
        "image width {r[width]} is outside validate.min_width..max_width "
        "({c.min_width}..{c.max_width})",
    ),
    "constant": (
        "file",
        "intensity std {r[std]:.3f} is below validate.min_intensity_std={c.min_intensity_std} "
        "(constant slice)",
    ),
    "intensity_range": (
        "file",
        "intensity range {r[intensity_range]:g} is below "
        "validate.min_intensity_range={c.min_intensity_range}",
    ),
    "mask_dtype": (
        "mask_file",
        "mask dtype {r[mask_dtype]} is not allowed (validate.allowed_dtypes: {dtypes})",
    ),
    "shape_match": ("mask_file", "{shape_message}"),
    "mask_values": (
        "mask_file",
        "mask values {r[unexpected_mask_values]} are not in the class table base.classes "
        "(allowed values: {allowed})",
    ),
    "foreground_fraction": (
        "mask_file",
        "foreground fraction {r[foreground_fraction]:.3f} exceeds "
        "validate.max_foreground_fraction={c.max_foreground_fraction}",
    ),
}


def build_slice_suite(cfg: ValidateConfig, name: str = "mitoseg-slices") -> Any:
    """The per-slice expectation suite; every threshold comes from ``cfg``.

    Each expectation carries ``meta={"check": <name>}`` (a key of the row checks) so a
    failed result maps back to a check and a message.

    Returns:
        ``great_expectations.ExpectationSuite`` over the :func:`slice_table` columns.
    """
    import great_expectations as gx

    e = gx.expectations
    suite = gx.ExpectationSuite(name=name)
    for exp in (
        e.ExpectColumnValuesToBeInSet(
            column="dtype", value_set=list(cfg.allowed_dtypes), meta={"check": "dtype"}
        ),
        e.ExpectColumnValuesToBeInSet(column="finite", value_set=[True], meta={"check": "finite"}),
        e.ExpectColumnValuesToBeBetween(
            column="height",
            min_value=cfg.min_height,
            max_value=cfg.max_height,
            meta={"check": "height"},
        ),
        e.ExpectColumnValuesToBeBetween(
            column="width",
            min_value=cfg.min_width,
            max_value=cfg.max_width,
            meta={"check": "width"},
        ),
        e.ExpectColumnValuesToBeBetween(
            column="std", min_value=cfg.min_intensity_std, meta={"check": "constant"}
        ),
        e.ExpectColumnValuesToBeBetween(
            column="intensity_range",
            min_value=cfg.min_intensity_range,
            meta={"check": "intensity_range"},
        ),
        e.ExpectColumnValuesToBeInSet(
            column="mask_dtype", value_set=list(cfg.allowed_dtypes), meta={"check": "mask_dtype"}
        ),
        e.ExpectColumnValuesToBeInSet(
            column="shape_match", value_set=[True], meta={"check": "shape_match"}
        ),
        e.ExpectColumnValuesToBeInSet(
            column="mask_values_allowed", value_set=[True], meta={"check": "mask_values"}
        ),
        e.ExpectColumnValuesToBeBetween(
            column="foreground_fraction",
            min_value=0.0,
            max_value=cfg.max_foreground_fraction,
            meta={"check": "foreground_fraction"},
        ),
    ):
        suite.add_expectation(exp)
    return suite


def build_split_suite(cfg: ValidateConfig, name: str = "mitoseg-splits") -> Any:
    """The per-split expectation suite (``n_slices >= validate.min_slices_per_split``).

    Returns:
        ``great_expectations.ExpectationSuite`` over the ``split, file, n_slices`` table.
    """
    import great_expectations as gx

    suite = gx.ExpectationSuite(name=name)
    suite.add_expectation(
        gx.expectations.ExpectColumnValuesToBeBetween(
            column="n_slices", min_value=cfg.min_slices_per_split, meta={"check": "n_slices"}
        )
    )
    return suite


def _ephemeral_context() -> Any:
    """An in-memory GX context: no project directory, no analytics, no progress bars."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        progress_bars=ProgressBarsConfig(globally=False),
        analytics_enabled=False,
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def _run_suite(context: Any, asset_name: str, df: pd.DataFrame, suite: Any, key: str) -> Any:
    source = context.data_sources.add_pandas(f"{asset_name}-source")
    asset = source.add_dataframe_asset(name=asset_name)
    batch_def = asset.add_batch_definition_whole_dataframe(f"{asset_name}-all")
    batch = batch_def.get_batch(batch_parameters={"dataframe": df})
    return batch.validate(
        suite, result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [key]}
    )


def _summarise(result: Any) -> list[dict[str, Any]]:
    out = []
    for r in result.results:
        conf = r.expectation_config
        kwargs = {k: v for k, v in conf.kwargs.items() if k != "batch_id"}
        res = dict(r.result or {})
        out.append(
            {
                "check": (conf.meta or {}).get("check"),
                "expectation": conf.type,
                "kwargs": kwargs,
                "success": bool(r.success),
                "element_count": res.get("element_count"),
                "unexpected_count": res.get("unexpected_count"),
                "observed_value": res.get("observed_value"),
            }
        )
    return out


def _unexpected_keys(r: Any, key: str) -> list[Any]:
    res = dict(r.result or {})
    return [item[key] for item in res.get("unexpected_index_list") or []]


def _row_failures(result: Any, table: pd.DataFrame, cfg: ValidateConfig, base: BaseConfig) -> list:
    by_id = table.set_index(ROW_ID, drop=False)
    dtypes = ", ".join(cfg.allowed_dtypes)
    allowed = ", ".join(str(v) for v in sorted(base.value_to_index()))
    failures = []
    for r in result.results:
        if r.success:
            continue
        check = (r.expectation_config.meta or {}).get("check", r.expectation_config.type)
        file_col, template = _ROW_CHECKS[check]
        for row_id in _unexpected_keys(r, ROW_ID):
            row = by_id.loc[row_id]
            shape_message = ""
            if check == "shape_match":
                if row["has_mask"]:
                    shape_message = (
                        f"mask slice shape {int(row['mask_height'])}x{int(row['mask_width'])} "
                        f"does not match image slice shape {row['height']}x{row['width']}"
                    )
                else:
                    shape_message = f"mask stack has no slice {row['slice']} ({row['file']} has it)"
            message = template.format(
                r=row, c=cfg, dtypes=dtypes, allowed=allowed, shape_message=shape_message
            )
            failures.append(
                failure(row[file_col], check, message, str(row["split"]), int(row["slice"]))
            )
    return failures


def _split_failures(result: Any, splits: pd.DataFrame, cfg: ValidateConfig) -> list:
    by_split = splits.set_index("split", drop=False)
    failures = []
    for r in result.results:
        if r.success:
            continue
        for split in _unexpected_keys(r, "split"):
            row = by_split.loc[split]
            failures.append(
                failure(
                    row["file"],
                    "n_slices",
                    f"split {split!r} has {int(row['n_slices'])} slice(s), fewer than "
                    f"validate.min_slices_per_split={cfg.min_slices_per_split}",
                    str(split),
                )
            )
    return failures


def _split_summary(
    table: pd.DataFrame, stacks: dict[str, tuple[np.ndarray, np.ndarray | None]], base: BaseConfig
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for split, (images, masks) in stacks.items():
        rows = table[table["split"] == split]
        with_mask = rows[rows["has_mask"].astype(bool)]
        summary: dict[str, Any] = {
            "n_slices": int(images.shape[0]),
            "image_shape": list(images.shape),
            "image_dtype": str(images.dtype),
            "mask_shape": list(masks.shape) if masks is not None else None,
            "mask_dtype": str(masks.dtype) if masks is not None else None,
            "intensity_mean": float(rows["mean"].mean()),
            "intensity_std_mean": float(rows["std"].mean()),
            "foreground_fraction": (
                float(with_mask["foreground_fraction"].mean()) if len(with_mask) else None
            ),
            "class_fractions": (
                {n: float(with_mask[class_column(n)].mean()) for n in base.class_names}
                if len(with_mask)
                else None
            ),
        }
        out[split] = summary
    return out


def validate_dataset(
    raw_dir: str | Path, base: BaseConfig, cfg: ValidateConfig
) -> ValidationReport:
    """Validate a canonical raw directory: file pre-check plus the GX slice suite.

    Args:
        raw_dir: ``DIR`` with ``dataset.json`` and ``{train,test}/{images,masks}.tif``.
        base: shared config; ``base.classes`` gives the allowed mask values.
        cfg: thresholds (``params.yaml`` ``validate:``).

    Returns:
        The :class:`ValidationReport`; ``success`` is False when any failure was found.
        Nothing is written: see :func:`write_report`.
    """
    raw = Path(raw_dir)
    stacks, dataset, failures = check_files(raw, cfg)
    table = slice_table(raw, stacks, base)
    expectations: list[dict[str, Any]] = []
    stats = {
        "evaluated_expectations": 0,
        "successful_expectations": 0,
        "unsuccessful_expectations": 0,
    }
    if len(table):
        context = _ephemeral_context()
        splits = split_table(table)
        slice_result = _run_suite(context, "slices", table, build_slice_suite(cfg), ROW_ID)
        split_result = _run_suite(context, "splits", splits, build_split_suite(cfg), "split")
        failures += _row_failures(slice_result, table, cfg, base)
        failures += _split_failures(split_result, splits, cfg)
        for result in (slice_result, split_result):
            expectations += _summarise(result)
            for k in stats:
                stats[k] += int(result.statistics[k])
    evaluated = stats["evaluated_expectations"]
    statistics: dict[str, Any] = {
        **stats,
        "success_percent": 100.0 * stats["successful_expectations"] / evaluated
        if evaluated
        else None,
    }
    return ValidationReport(
        success=not failures,
        table=table,
        failures=failures,
        raw_dir=str(raw),
        expectations=expectations,
        statistics=statistics,
        splits=_split_summary(table, stacks, base),
        dataset=dataset,
        classes=dict(base.classes),
        thresholds=cfg.model_dump(),
    )
