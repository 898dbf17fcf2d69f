"""Data validation of the canonical raw layout (the ``validate`` stage).

Why one module of about 900 lines: the file pre-check and the great-expectations suite
report into one :class:`ValidationReport` with one failure vocabulary.

Two layers:

1. A file-level pre-check (:func:`check_files`): ``dataset.json`` present and sane, every
   split directory and stack present, every TIFF structurally complete (no truncated
   page chain, no strip beyond the end of the file) and decodable, mask stacks with as
   many slices as their image stacks. Problems here cannot become table rows, so they are
   reported directly as failures naming the file.
2. A per-slice statistics table (:func:`slice_table`, one row per split/slice) checked by
   a great-expectations 1.x suite whose thresholds come from
   :class:`~mitoseg.config.ValidateConfig` (:func:`build_slice_suite`). The context is
   ephemeral (in memory): no GX project directory is written anywhere.

Every failure is a dict ``{"file", "split", "slice", "check", "message"}``; the message
names the file and the slice on its own, so printing the messages names every offender.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mitoseg.config import BaseConfig, ValidateConfig
from mitoseg.data.layout import DATASET_FILE, SPLITS, split_paths
from mitoseg.io import DataError, atomic_path, read_stack, write_json
from mitoseg.labels import IGNORE_INDEX

__all__ = [
    "MASK_KINDS",
    "ValidationReport",
    "build_slice_suite",
    "build_split_suite",
    "check_files",
    "format_failures",
    "report_to_dict",
    "require_valid_report",
    "slice_table",
    "summary_markdown",
    "validate_dataset",
    "write_report",
]

#: Allowed values of ``dataset.json["mask_kind"]``.
MASK_KINDS: tuple[str, ...] = ("binary", "labels")

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


# --------------------------------------------------------------------------------------
# file-level pre-check
# --------------------------------------------------------------------------------------


def _failure(
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


class _LogCapture(logging.Handler):
    """Collect tifffile's warnings (it logs, rather than raises, on a broken page chain)."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _capture_tifffile_warnings() -> Iterator[_LogCapture]:
    log = logging.getLogger("tifffile")
    handler = _LogCapture()
    old_propagate = log.propagate
    log.addHandler(handler)
    log.propagate = False
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        log.propagate = old_propagate


def _tiff_structure_problem(path: Path) -> str | None:
    """Return why the TIFF at ``path`` is truncated or broken, or None when it looks whole.

    ``tifffile`` silently returns fewer pages when the page chain points past the end of a
    truncated file (it only logs a warning), so the structure is checked explicitly: every
    page must be reachable and every strip/tile must lie inside the file.
    """
    import tifffile

    size = path.stat().st_size
    with _capture_tifffile_warnings() as logs:
        try:
            with tifffile.TiffFile(path) as tif:
                for index, page in enumerate(tif.pages):
                    offsets = getattr(page, "dataoffsets", ())
                    counts = getattr(page, "databytecounts", ())
                    for offset, count in zip(offsets, counts, strict=False):
                        if count and offset + count > size:
                            return (
                                f"truncated TIFF: page {index} data ends at byte "
                                f"{offset + count} but the file has only {size} bytes"
                            )
        except Exception as exc:  # tifffile raises many types for corrupt files
            return f"unreadable TIFF ({type(exc).__name__}: {exc})"
    if logs.messages:
        return "truncated or corrupt TIFF (" + "; ".join(logs.messages) + ")"
    return None


def _read_checked(path: Path, split: str) -> tuple[np.ndarray | None, dict[str, Any] | None]:
    """Read one stack, returning ``(stack, None)`` or ``(None, failure)``."""
    if path.suffix.lower() in (".tif", ".tiff"):
        problem = _tiff_structure_problem(path)
        if problem is not None:
            return None, _failure(path, "unreadable", problem, split)
    try:
        with _capture_tifffile_warnings() as logs:
            stack = read_stack(path)
    except DataError as exc:
        message = str(exc)
        prefix = f"{path}: "
        message = message[len(prefix) :] if message.startswith(prefix) else message
        return None, _failure(path, "unreadable", message, split)
    if logs.messages:
        return None, _failure(
            path, "unreadable", "corrupt TIFF (" + "; ".join(logs.messages) + ")", split
        )
    return stack, None


def _check_dataset_json(raw: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    path = raw / DATASET_FILE
    if not path.is_file():
        return None, [_failure(path, "missing_file", "dataset description file not found")]
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, [_failure(path, "dataset_json", f"not valid JSON ({exc})")]
    if not isinstance(data, dict):
        return None, [_failure(path, "dataset_json", "top level must be a JSON object")]
    kind = data.get("mask_kind")
    if kind is not None and kind not in MASK_KINDS:
        return data, [
            _failure(
                path,
                "dataset_json",
                f"mask_kind {kind!r} is not one of {', '.join(MASK_KINDS)}",
            )
        ]
    return data, []


def check_files(
    raw_dir: str | Path, cfg: ValidateConfig
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray | None]], dict[str, Any] | None, list[dict]]:
    """File-level pre-check of the canonical layout; reads every stack once.

    Args:
        raw_dir: the canonical raw directory (``DIR/{train,test}/{images,masks}.tif``).
        cfg: validation thresholds (``require_test_masks`` is used here).

    Returns:
        ``(stacks, dataset, failures)``: ``stacks[split] = (images (Z, H, W), masks
        (Z', H', W') | None)`` for every split whose image stack is readable (masks None
        when absent or unreadable); ``dataset`` the parsed ``dataset.json`` or None;
        ``failures`` the file-level failures (missing directory, split, file; unreadable
        or truncated TIFF; mask/image slice-count mismatch; invalid ``dataset.json``).
    """
    raw = Path(raw_dir)
    if not raw.is_dir():
        return {}, None, [_failure(raw, "missing_file", "raw data directory not found")]
    dataset, failures = _check_dataset_json(raw)
    stacks: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    for split in SPLITS:
        img_path, mask_path = split_paths(raw, split)
        if not img_path.parent.is_dir():
            failures.append(
                _failure(img_path.parent, "missing_split", f"split {split!r} not found", split)
            )
            continue
        masks_required = split == "train" or cfg.require_test_masks
        images: np.ndarray | None = None
        if img_path.is_file():
            images, problem = _read_checked(img_path, split)
            if problem is not None:
                failures.append(problem)
        else:
            failures.append(_failure(img_path, "missing_file", "image stack not found", split))
        masks: np.ndarray | None = None
        if mask_path.is_file():
            masks, problem = _read_checked(mask_path, split)
            if problem is not None:
                failures.append(problem)
        elif masks_required:
            why = "required for training" if split == "train" else "validate.require_test_masks"
            failures.append(
                _failure(mask_path, "missing_file", f"mask stack not found ({why})", split)
            )
        if images is None:
            continue
        if masks is not None and masks.shape[0] > images.shape[0]:
            failures.append(
                _failure(
                    mask_path,
                    "shape_match",
                    f"mask stack has {masks.shape[0]} slices but image stack {img_path} "
                    f"has {images.shape[0]}",
                    split,
                )
            )
        stacks[split] = (images, masks)
    failures += _check_recorded_shapes(raw, dataset, stacks)
    return stacks, dataset, failures


#: ``dataset.json["splits"][split]`` keys compared with the stacks actually on disk.
_RECORDED_KEYS: tuple[str, ...] = ("n_slices", "height", "width", "dtype", "mask_dtype")


def _check_recorded_shapes(
    raw: Path,
    dataset: dict[str, Any] | None,
    stacks: dict[str, tuple[np.ndarray, np.ndarray | None]],
) -> list[dict[str, Any]]:
    """Compare the per-split shapes/dtypes recorded by ``mitoseg data fetch`` with the files.

    A mismatch means the stacks were replaced without re-running the fetch (stale
    provenance). Keys absent from ``dataset.json`` are not checked.
    """
    recorded = (dataset or {}).get("splits")
    if not isinstance(recorded, dict):
        return []
    failures = []
    for split, (images, masks) in stacks.items():
        entry = recorded.get(split)
        if not isinstance(entry, dict):
            continue
        actual = {
            "n_slices": int(images.shape[0]),
            "height": int(images.shape[1]),
            "width": int(images.shape[2]),
            "dtype": str(images.dtype),
            "mask_dtype": str(masks.dtype) if masks is not None else None,
        }
        for key in _RECORDED_KEYS:
            if (
                key in entry
                and (key != "mask_dtype" or masks is not None)
                and entry[key] != actual[key]
            ):
                failures.append(
                    _failure(
                        raw / DATASET_FILE,
                        "dataset_json",
                        f"splits.{split}.{key} is {entry[key]!r} but the {split} stacks have "
                        f"{actual[key]!r}; re-run `mitoseg data fetch`",
                        split,
                    )
                )
    return failures


# --------------------------------------------------------------------------------------
# per-slice statistics table
# --------------------------------------------------------------------------------------


def _value_counts(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values and their pixel counts of one mask slice."""
    if mask.dtype in (np.uint8, np.uint16):
        counts = np.bincount(mask.ravel(), minlength=1)
        values = np.flatnonzero(counts)
        return values, counts[values]
    return np.unique(mask, return_counts=True)


def _fmt_value(v: Any) -> str:
    f = float(v)
    return str(int(f)) if math.isfinite(f) and f.is_integer() else repr(f)


def _class_column(name: str) -> str:
    return f"class_fraction_{name}"


def slice_table(
    raw_dir: str | Path,
    stacks: dict[str, tuple[np.ndarray, np.ndarray | None]],
    base: BaseConfig,
) -> pd.DataFrame:
    """Per-slice statistics of every readable split.

    Args:
        raw_dir: the raw directory (used to name the files).
        stacks: ``split -> (images (Z, H, W), masks (Z', H', W') | None)`` as returned by
            :func:`check_files`; any numeric dtype.
        base: the class table (``base.classes``).

    Returns:
        DataFrame with one row per image slice and columns ``row_id, file, mask_file,
        split, slice, height, width, dtype, finite, min, max, mean, std,
        intensity_range, has_mask, mask_dtype, mask_height, mask_width, shape_match,
        mask_values, unexpected_mask_values, mask_values_allowed, foreground_fraction``
        plus ``class_fraction_<name>`` for every class. Mask columns are None/NaN where the
        slice has no mask. ``foreground_fraction`` is the fraction of the labelled pixels
        (those not ``base.ignore_value``; 0.0 when none is) in a non-background class;
        ``mask_values``/``unexpected_mask_values`` are comma-joined raw values (those not
        in ``base.value_to_index()`` are unexpected).
    """
    raw = Path(raw_dir)
    v2i = base.value_to_index()
    names = base.class_names
    rows: list[dict[str, Any]] = []
    for split, (images, masks) in stacks.items():
        img_path, mask_path = split_paths(raw, split)
        for z in range(images.shape[0]):
            img = images[z]
            x = img.astype(np.float64)
            finite = bool(np.isfinite(x).all())
            row: dict[str, Any] = {
                ROW_ID: f"{split}:{z}",
                "file": str(img_path),
                "mask_file": str(mask_path) if masks is not None else None,
                "split": split,
                "slice": z,
                "height": int(img.shape[0]),
                "width": int(img.shape[1]),
                "dtype": str(img.dtype),
                "finite": finite,
                "min": float(np.nanmin(x)) if finite else float("nan"),
                "max": float(np.nanmax(x)) if finite else float("nan"),
                "mean": float(x.mean()) if finite else float("nan"),
                "std": float(x.std()) if finite else float("nan"),
            }
            row["intensity_range"] = row["max"] - row["min"]
            mask = masks[z] if masks is not None and z < masks.shape[0] else None
            row["has_mask"] = mask is not None
            if mask is None:
                row.update(
                    mask_dtype=None,
                    mask_height=None,
                    mask_width=None,
                    shape_match=None if masks is None else False,
                    mask_values=None,
                    unexpected_mask_values=None,
                    mask_values_allowed=None,
                    foreground_fraction=float("nan"),
                )
                row.update({_class_column(n): float("nan") for n in names})
                rows.append(row)
                continue
            values, counts = _value_counts(mask)
            total = float(mask.size)
            per_class = np.zeros(len(names), dtype=np.float64)
            unexpected: list[str] = []
            for v, c in zip(values.tolist(), counts.tolist(), strict=True):
                key = float(v)
                idx = v2i.get(int(key)) if math.isfinite(key) and key.is_integer() else None
                if idx is None:
                    unexpected.append(_fmt_value(v))
                elif idx == IGNORE_INDEX:  # base.ignore_value: unlabelled, in no class
                    total -= c
                else:
                    per_class[idx] += c
            fractions = per_class / max(total, 1.0)
            row.update(
                mask_dtype=str(mask.dtype),
                mask_height=int(mask.shape[0]),
                mask_width=int(mask.shape[1]),
                shape_match=tuple(mask.shape) == tuple(img.shape),
                mask_values=",".join(_fmt_value(v) for v in values.tolist()),
                unexpected_mask_values=",".join(unexpected),
                mask_values_allowed=not unexpected,
                foreground_fraction=float(fractions[1:].sum()),
            )
            row.update({_class_column(n): float(f) for n, f in zip(names, fractions, strict=True)})
            rows.append(row)
    columns = [
        ROW_ID, "file", "mask_file", "split", "slice", "height", "width", "dtype", "finite",
        "min", "max", "mean", "std", "intensity_range", "has_mask", "mask_dtype",
        "mask_height", "mask_width", "shape_match", "mask_values", "unexpected_mask_values",
        "mask_values_allowed", "foreground_fraction", *[_class_column(n) for n in names],
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


def _split_table(table: pd.DataFrame) -> pd.DataFrame:
    """One row per split present in ``table``: ``split, file, n_slices``."""
    grouped = table.groupby("split", sort=False).agg(
        file=("file", "first"), n_slices=("slice", "size")
    )
    return grouped.reset_index()[["split", "file", "n_slices"]]


# --------------------------------------------------------------------------------------
# great-expectations suites
# --------------------------------------------------------------------------------------

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
                _failure(row[file_col], check, message, str(row["split"]), int(row["slice"]))
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
                _failure(
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
                {n: float(with_mask[_class_column(n)].mean()) for n in base.class_names}
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
        splits = _split_table(table)
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


# --------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------


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
