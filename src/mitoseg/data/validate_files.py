"""The file-level pre-check of the canonical raw layout (:func:`check_files`).

``dataset.json`` present and sane, every split directory and stack present, every TIFF
structurally complete (no truncated page chain, no strip beyond the end of the file) and
decodable, mask stacks with as many slices as their image stacks, and the shapes that
``mitoseg data fetch`` recorded matching the files. Problems here cannot become table
rows, so they are reported directly as failures naming the file
(:func:`mitoseg.data.validate_report.failure`).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mitoseg.config import ValidateConfig
from mitoseg.data.layout import DATASET_FILE, SPLITS, split_paths
from mitoseg.data.validate_report import failure
from mitoseg.io import DataError, read_stack

__all__ = ["MASK_KINDS", "check_files"]

#: Allowed values of ``dataset.json["mask_kind"]``.
MASK_KINDS: tuple[str, ...] = ("binary", "labels")


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
            return None, failure(path, "unreadable", problem, split)
    try:
        with _capture_tifffile_warnings() as logs:
            stack = read_stack(path)
    except DataError as exc:
        message = str(exc)
        prefix = f"{path}: "
        message = message[len(prefix) :] if message.startswith(prefix) else message
        return None, failure(path, "unreadable", message, split)
    if logs.messages:
        return None, failure(
            path, "unreadable", "corrupt TIFF (" + "; ".join(logs.messages) + ")", split
        )
    return stack, None


def _check_dataset_json(raw: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    path = raw / DATASET_FILE
    if not path.is_file():
        return None, [failure(path, "missing_file", "dataset description file not found")]
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, [failure(path, "dataset_json", f"not valid JSON ({exc})")]
    if not isinstance(data, dict):
        return None, [failure(path, "dataset_json", "top level must be a JSON object")]
    kind = data.get("mask_kind")
    if kind is not None and kind not in MASK_KINDS:
        return data, [
            failure(
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
        return {}, None, [failure(raw, "missing_file", "raw data directory not found")]
    dataset, failures = _check_dataset_json(raw)
    stacks: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    for split in SPLITS:
        img_path, mask_path = split_paths(raw, split)
        if not img_path.parent.is_dir():
            failures.append(
                failure(img_path.parent, "missing_split", f"split {split!r} not found", split)
            )
            continue
        masks_required = split == "train" or cfg.require_test_masks
        images: np.ndarray | None = None
        if img_path.is_file():
            images, problem = _read_checked(img_path, split)
            if problem is not None:
                failures.append(problem)
        else:
            failures.append(failure(img_path, "missing_file", "image stack not found", split))
        masks: np.ndarray | None = None
        if mask_path.is_file():
            masks, problem = _read_checked(mask_path, split)
            if problem is not None:
                failures.append(problem)
        elif masks_required:
            why = "required for training" if split == "train" else "validate.require_test_masks"
            failures.append(
                failure(mask_path, "missing_file", f"mask stack not found ({why})", split)
            )
        if images is None:
            continue
        if masks is not None and masks.shape[0] > images.shape[0]:
            failures.append(
                failure(
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
                    failure(
                        raw / DATASET_FILE,
                        "dataset_json",
                        f"splits.{split}.{key} is {entry[key]!r} but the {split} stacks have "
                        f"{actual[key]!r}; re-run `mitoseg data fetch`",
                        split,
                    )
                )
    return failures
