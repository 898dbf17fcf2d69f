"""The per-slice statistics table the validation suite checks (:func:`slice_table`,
one row per split/slice: shape, dtype, intensity statistics, mask values and class
fractions)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mitoseg.config import BaseConfig
from mitoseg.data.layout import split_paths
from mitoseg.data.validate_report import ROW_ID
from mitoseg.labels import IGNORE_INDEX

__all__ = ["class_column", "slice_table", "split_table"]


# per-slice statistics table


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


def class_column(name: str) -> str:
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
                row.update({class_column(n): float("nan") for n in names})
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
            row.update({class_column(n): float(f) for n, f in zip(names, fractions, strict=True)})
            rows.append(row)
    columns = [
        ROW_ID, "file", "mask_file", "split", "slice", "height", "width", "dtype", "finite",
        "min", "max", "mean", "std", "intensity_range", "has_mask", "mask_dtype",
        "mask_height", "mask_width", "shape_match", "mask_values", "unexpected_mask_values",
        "mask_values_allowed", "foreground_fraction", *[class_column(n) for n in names],
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


def split_table(table: pd.DataFrame) -> pd.DataFrame:
    """One row per split present in ``table``: ``split, file, n_slices``."""
    grouped = table.groupby("split", sort=False).agg(
        file=("file", "first"), n_slices=("slice", "size")
    )
    return grouped.reset_index()[["split", "file", "n_slices"]]
