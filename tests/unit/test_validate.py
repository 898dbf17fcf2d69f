"""Tests of mitoseg.data.validate (GX suite, file pre-check, report) and `mitoseg validate`."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from mitoseg.config import VNC_CLASSES, BaseConfig, ValidateConfig
from mitoseg.data.validate import build_slice_suite, validate_dataset
from mitoseg.data.validate_report import (
    ValidationReport,
    format_failures,
    report_to_dict,
    require_valid_report,
    write_report,
)
from mitoseg.io import DataError, write_stack

SAMPLE = Path(str(files("mitoseg") / "sample_data" / "vnc"))
BINARY = BaseConfig()
CFG = ValidateConfig()

# ---------------------------------------------------------------------------------------
# synthetic raw directories
# ---------------------------------------------------------------------------------------


def _images(z: int, h: int = 72, w: int = 80, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(z, h, w), dtype=np.uint8)


def _masks(z: int, h: int = 72, w: int = 80) -> np.ndarray:
    m = np.zeros((z, h, w), dtype=np.uint8)
    m[:, 10:30, 20:50] = 255
    return m


def make_raw(
    root: Path,
    *,
    train: tuple[np.ndarray | None, np.ndarray | None] | None = None,
    test: tuple[np.ndarray | None, np.ndarray | None] | None = None,
    dataset: dict | None = None,
) -> Path:
    """Write a canonical raw dir; default: train (3, 72, 80), test (2, 72, 80), valid."""
    root.mkdir(parents=True, exist_ok=True)
    splits = {
        "train": train if train is not None else (_images(3), _masks(3)),
        "test": test if test is not None else (_images(2, seed=1), _masks(2)),
    }
    for split, (images, masks) in splits.items():
        if images is not None:
            write_stack(root / split / "images.tif", images)
        if masks is not None:
            write_stack(root / split / "masks.tif", masks)
    meta = dataset if dataset is not None else {"source": "synthetic", "mask_kind": "binary"}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _only(report: ValidationReport, check: str) -> list[dict]:
    return [f for f in report.failures if f["check"] == check]


@pytest.fixture(scope="module")
def sample_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the bundled VNC sample in the canonical layout (binary masks)."""
    root = tmp_path_factory.mktemp("sample") / "raw"
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
        for name in ("images.tif", "masks.tif"):
            shutil.copy(SAMPLE / split / name, root / split / name)
    (root / "dataset.json").write_text(json.dumps({"source": "sample", "mask_kind": "binary"}))
    return root


@pytest.fixture(scope="module")
def sample_report(sample_raw: Path) -> ValidationReport:
    return validate_dataset(sample_raw, BINARY, CFG)


@pytest.fixture(scope="module")
def labels_report(tmp_path_factory: pytest.TempPathFactory) -> ValidationReport:
    """The VNC label map validated against the 5-class VNC table."""
    root = tmp_path_factory.mktemp("labels") / "raw"
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
        shutil.copy(SAMPLE / split / "images.tif", root / split / "images.tif")
        shutil.copy(SAMPLE / split / "labels.tif", root / split / "masks.tif")
    (root / "dataset.json").write_text(json.dumps({"source": "sample", "mask_kind": "labels"}))
    return validate_dataset(root, BaseConfig(classes=VNC_CLASSES), CFG)


# ---------------------------------------------------------------------------------------
# the real sample passes
# ---------------------------------------------------------------------------------------


def test_sample_passes_with_full_table(sample_report: ValidationReport) -> None:
    r = sample_report
    assert r.success, format_failures(r)
    assert r.failures == []
    assert len(r.table) == 20
    assert r.table.groupby("split").size().to_dict() == {"train": 15, "test": 5}
    row = r.table.iloc[0]
    assert (row["height"], row["width"], row["dtype"]) == (512, 768, "uint8")
    assert row["mask_values"] == "0,255"
    assert bool(row["mask_values_allowed"]) and bool(row["shape_match"])
    assert 0.05 < row["foreground_fraction"] < 0.15
    assert row["class_fraction_background"] + row["class_fraction_mitochondria"] == pytest.approx(1)
    assert r.statistics["evaluated_expectations"] == 11
    assert r.statistics["unsuccessful_expectations"] == 0
    assert r.statistics["success_percent"] == 100.0
    assert r.splits["train"]["image_shape"] == [15, 512, 768]
    assert r.splits["test"]["n_slices"] == 5


def test_vnc_label_map_validates_with_multiclass_table(labels_report: ValidationReport) -> None:
    r = labels_report
    assert r.success, format_failures(r)
    fractions = r.splits["train"]["class_fractions"]
    assert list(fractions) == list(VNC_CLASSES)
    assert sum(fractions.values()) == pytest.approx(1.0)
    assert all(v > 0 for v in fractions.values())
    assert 0.05 < fractions["mitochondria"] < 0.15
    assert r.splits["train"]["foreground_fraction"] == pytest.approx(1 - fractions["background"])
    assert set(r.table.iloc[0]["mask_values"].split(",")) == {
        "0", "32", "64", "96", "128", "159", "191", "223", "255"
    }  # fmt: skip
    assert r.classes == VNC_CLASSES


def test_label_map_fails_with_binary_table_naming_every_slice(tmp_path: Path) -> None:
    labels = np.zeros((3, 72, 80), dtype=np.uint8)
    labels[:, :10] = 32
    labels[:, 10:20] = 191
    labels[1, 40, 40] = 128
    raw = make_raw(tmp_path / "raw", train=(_images(3), labels))
    r = validate_dataset(raw, BINARY, CFG)
    assert not r.success
    fails = _only(r, "mask_values")
    assert [(f["split"], f["slice"]) for f in fails] == [("train", 0), ("train", 1), ("train", 2)]
    assert fails[1]["message"] == (
        f"{raw}/train/masks.tif slice 1: mask values 32,128,191 are not in the class table "
        "base.classes (allowed values: 0, 1, 255)"
    )
    assert fails[0]["file"] == str(raw / "train" / "masks.tif")


# ---------------------------------------------------------------------------------------
# every failure kind, each naming its file and slice
# ---------------------------------------------------------------------------------------


def _nonbinary(root: Path) -> Path:
    m = _masks(3)
    m[1, 0, 0] = 128
    return make_raw(root, train=(_images(3), m))


def _shape_mismatch(root: Path) -> Path:
    return make_raw(root, test=(_images(2, seed=1), _masks(2, w=70)))


def _constant(root: Path) -> Path:
    im = _images(3)
    im[2] = 100
    return make_raw(root, train=(im, _masks(3)))


def _too_small(root: Path) -> Path:
    return make_raw(root, train=(_images(3, h=32), _masks(3, h=32)))


def _foreground(root: Path) -> Path:
    m = _masks(2)
    m[0] = 255
    return make_raw(root, test=(_images(2, seed=1), m))


def _multiclass_unknown(root: Path) -> Path:
    m = np.full((3, 72, 80), 255, dtype=np.uint8)
    m[:, :5] = 0
    m[2, 50, 50] = 77
    return make_raw(root, train=(_images(3), m))


@pytest.mark.parametrize(
    ("build", "base", "check", "file", "slices", "message"),
    [
        (
            _nonbinary,
            BINARY,
            "mask_values",
            "train/masks.tif",
            [("train", 1)],
            "train/masks.tif slice 1: mask values 128 are not in the class table base.classes "
            "(allowed values: 0, 1, 255)",
        ),
        (
            _shape_mismatch,
            BINARY,
            "shape_match",
            "test/masks.tif",
            [("test", 0), ("test", 1)],
            "test/masks.tif slice 0: mask slice shape 72x70 does not match image slice shape 72x80",
        ),
        (
            _constant,
            BINARY,
            "constant",
            "train/images.tif",
            [("train", 2)],
            "train/images.tif slice 2: intensity std 0.000 is below "
            "validate.min_intensity_std=2.0 (constant slice)",
        ),
        (
            _constant,
            BINARY,
            "intensity_range",
            "train/images.tif",
            [("train", 2)],
            "train/images.tif slice 2: intensity range 0 is below "
            "validate.min_intensity_range=10.0",
        ),
        (
            _too_small,
            BINARY,
            "height",
            "train/images.tif",
            [("train", 0), ("train", 1), ("train", 2)],
            "train/images.tif slice 0: image height 32 is outside "
            "validate.min_height..max_height (64..65536)",
        ),
        (
            _foreground,
            BINARY,
            "foreground_fraction",
            "test/masks.tif",
            [("test", 0)],
            "test/masks.tif slice 0: foreground fraction 1.000 exceeds "
            "validate.max_foreground_fraction=0.9",
        ),
        (
            _multiclass_unknown,
            BaseConfig(classes=VNC_CLASSES),
            "mask_values",
            "train/masks.tif",
            [("train", 2)],
            "train/masks.tif slice 2: mask values 77 are not in the class table base.classes "
            "(allowed values: 0, 32, 64, 96, 128, 159, 191, 223, 255)",
        ),
    ],
    ids=[
        "non-binary-mask",
        "shape-mismatch",
        "constant-std",
        "constant-range",
        "too-small",
        "foreground",
        "multiclass-unknown",
    ],
)
def test_slice_failures_name_file_and_slice(
    tmp_path: Path,
    build: Callable[[Path], Path],
    base: BaseConfig,
    check: str,
    file: str,
    slices: list[tuple[str, int]],
    message: str,
) -> None:
    raw = build(tmp_path / "raw")
    r = validate_dataset(raw, base, CFG)
    assert not r.success
    fails = _only(r, check)
    assert [(f["split"], f["slice"]) for f in fails] == slices
    assert all(f["file"] == str(raw / file) for f in fails)
    assert fails[0]["message"] == f"{raw}/{message}"
    text = format_failures(r)
    for _split, z in slices:
        assert f"{raw}/{file} slice {z}:" in text
    failed_checks = {e["check"] for e in r.expectations if not e["success"]}
    assert check in failed_checks


@pytest.mark.parametrize(("dtype", "split"), [("float32", "train"), ("int32", "test")])
def test_wrong_dtype_names_every_slice(tmp_path: Path, dtype: str, split: str) -> None:
    images = _images(3 if split == "train" else 2).astype(dtype)
    masks = _masks(images.shape[0])
    raw = make_raw(tmp_path / "raw", **{split: (images, masks)})
    r = validate_dataset(raw, BINARY, CFG)
    fails = _only(r, "dtype")
    assert [f["slice"] for f in fails] == list(range(images.shape[0]))
    assert fails[0]["message"] == (
        f"{raw}/{split}/images.tif slice 0: image dtype {dtype} is not allowed "
        "(validate.allowed_dtypes: uint8, uint16)"
    )
    assert {f["check"] for f in r.failures} == {"dtype"}


def test_nan_image_fails_finite_check(tmp_path: Path) -> None:
    images = _images(3).astype(np.float32)
    images[1, 5, 5] = np.nan
    raw = make_raw(tmp_path / "raw", train=(images, _masks(3)))
    r = validate_dataset(raw, BINARY, CFG)
    fails = _only(r, "finite")
    assert [(f["split"], f["slice"]) for f in fails] == [("train", 1)]
    assert (
        fails[0]["message"]
        == f"{raw}/train/images.tif slice 1: image contains NaN or infinite values"
    )


def test_wrong_mask_dtype(tmp_path: Path) -> None:
    raw = make_raw(tmp_path / "raw", test=(_images(2, seed=1), _masks(2).astype(np.int32)))
    fails = _only(validate_dataset(raw, BINARY, CFG), "mask_dtype")
    assert [f["slice"] for f in fails] == [0, 1]
    assert fails[1]["message"] == (
        f"{raw}/test/masks.tif slice 1: mask dtype int32 is not allowed "
        "(validate.allowed_dtypes: uint8, uint16)"
    )


def test_mask_stack_with_fewer_slices(tmp_path: Path) -> None:
    raw = make_raw(tmp_path / "raw", train=(_images(3), _masks(2)))
    fails = _only(validate_dataset(raw, BINARY, CFG), "shape_match")
    assert [(f["file"], f["slice"]) for f in fails] == [(str(raw / "train/masks.tif"), 2)]
    assert fails[0]["message"] == (
        f"{raw}/train/masks.tif slice 2: mask stack has no slice 2 ({raw}/train/images.tif has it)"
    )


def test_mask_stack_with_more_slices(tmp_path: Path) -> None:
    raw = make_raw(tmp_path / "raw", train=(_images(3), _masks(4)))
    r = validate_dataset(raw, BINARY, CFG)
    assert r.failures == [
        {
            "file": str(raw / "train/masks.tif"),
            "split": "train",
            "slice": None,
            "check": "shape_match",
            "message": f"{raw}/train/masks.tif: mask stack has 4 slices but image stack "
            f"{raw}/train/images.tif has 3",
        }
    ]


@pytest.mark.parametrize("keep", [0.4, 0.95], ids=["page-chain", "strip-data"])
def test_truncated_tiff_is_reported(tmp_path: Path, keep: float) -> None:
    raw = make_raw(tmp_path / "raw")
    path = raw / "test" / "images.tif"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    r = validate_dataset(raw, BINARY, CFG)
    assert not r.success
    fails = _only(r, "unreadable")
    assert len(fails) == 1
    assert fails[0]["file"] == str(path)
    assert fails[0]["split"] == "test" and fails[0]["slice"] is None
    assert fails[0]["message"].startswith(f"{path}: truncated")
    # the unreadable split contributes no rows; the other split is still checked
    assert set(r.table["split"]) == {"train"}


def test_garbage_tiff_is_unreadable(tmp_path: Path) -> None:
    raw = make_raw(tmp_path / "raw")
    (raw / "train" / "masks.tif").write_bytes(b"this is not a tiff at all")
    fails = _only(validate_dataset(raw, BINARY, CFG), "unreadable")
    assert [f["file"] for f in fails] == [str(raw / "train" / "masks.tif")]
    assert fails[0]["message"].startswith(f"{raw}/train/masks.tif: unreadable TIFF (")


def test_missing_split(tmp_path: Path) -> None:
    raw = make_raw(tmp_path / "raw")
    shutil.rmtree(raw / "test")
    r = validate_dataset(raw, BINARY, CFG)
    assert r.failures == [
        {
            "file": str(raw / "test"),
            "split": "test",
            "slice": None,
            "check": "missing_split",
            "message": f"{raw}/test: split 'test' not found",
        }
    ]


def test_missing_files(tmp_path: Path) -> None:
    raw = make_raw(tmp_path / "raw")
    (raw / "train" / "masks.tif").unlink()
    (raw / "test" / "images.tif").unlink()
    r = validate_dataset(raw, BINARY, CFG)
    assert [f["message"] for f in r.failures] == [
        f"{raw}/train/masks.tif: mask stack not found (required for training)",
        f"{raw}/test/images.tif: image stack not found",
    ]
    assert {f["check"] for f in r.failures} == {"missing_file"}


def test_test_masks_optional_when_configured(tmp_path: Path) -> None:
    raw = make_raw(tmp_path / "raw")
    (raw / "test" / "masks.tif").unlink()
    strict = validate_dataset(raw, BINARY, CFG)
    assert [f["message"] for f in strict.failures] == [
        f"{raw}/test/masks.tif: mask stack not found (validate.require_test_masks)"
    ]
    lenient = validate_dataset(raw, BINARY, ValidateConfig(require_test_masks=False))
    assert lenient.success, format_failures(lenient)
    test_rows = lenient.table[lenient.table["split"] == "test"]
    assert not test_rows["has_mask"].any()
    assert lenient.splits["test"]["foreground_fraction"] is None


def test_missing_raw_dir(tmp_path: Path) -> None:
    r = validate_dataset(tmp_path / "nope", BINARY, CFG)
    assert not r.success
    assert r.failures[0]["message"] == f"{tmp_path}/nope: raw data directory not found"
    assert r.table.empty
    assert r.statistics["evaluated_expectations"] == 0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "dataset.json: dataset description file not found"),
        ("{not json", "dataset.json: not valid JSON (Expecting property name enclosed"),
        ("[1, 2]", "dataset.json: top level must be a JSON object"),
        ('{"mask_kind": "rgb"}', "dataset.json: mask_kind 'rgb' is not one of binary, labels"),
    ],
    ids=["missing", "not-json", "not-object", "bad-mask-kind"],
)
def test_dataset_json_problems(tmp_path: Path, content: str | None, message: str) -> None:
    raw = make_raw(tmp_path / "raw")
    if content is None:
        (raw / "dataset.json").unlink()
    else:
        (raw / "dataset.json").write_text(content)
    r = validate_dataset(raw, BINARY, CFG)
    assert len(r.failures) == 1
    assert r.failures[0]["message"].startswith(f"{raw}/{message}")


def test_dataset_json_recorded_shapes_must_match(tmp_path: Path) -> None:
    recorded = {
        "train": {
            "n_slices": 3,
            "height": 72,
            "width": 80,
            "dtype": "uint8",
            "mask_dtype": "uint8",
        },
        "test": {"n_slices": 5, "height": 72, "width": 80, "dtype": "uint16"},
    }
    raw = make_raw(tmp_path / "raw", dataset={"mask_kind": "binary", "splits": recorded})
    r = validate_dataset(raw, BINARY, CFG)
    assert [f["message"] for f in r.failures] == [
        f"{raw}/dataset.json: splits.test.n_slices is 5 but the test stacks have 2; "
        "re-run `mitoseg data fetch`",
        f"{raw}/dataset.json: splits.test.dtype is 'uint16' but the test stacks have 'uint8'; "
        "re-run `mitoseg data fetch`",
    ]
    assert [f["split"] for f in r.failures] == ["test", "test"]


def test_min_slices_per_split_from_config(tmp_path: Path) -> None:
    raw = make_raw(tmp_path / "raw")
    r = validate_dataset(raw, BINARY, ValidateConfig(min_slices_per_split=3))
    fails = _only(r, "n_slices")
    assert fails == [
        {
            "file": str(raw / "test/images.tif"),
            "split": "test",
            "slice": None,
            "check": "n_slices",
            "message": f"{raw}/test/images.tif: split 'test' has 2 slice(s), fewer than "
            "validate.min_slices_per_split=3",
        }
    ]


# ---------------------------------------------------------------------------------------
# thresholds come from the config
# ---------------------------------------------------------------------------------------


def test_suite_thresholds_come_from_config() -> None:
    cfg = ValidateConfig(
        allowed_dtypes=["uint16"],
        min_height=10,
        max_height=20,
        min_width=11,
        max_width=21,
        min_intensity_std=7.5,
        min_intensity_range=33.0,
        max_foreground_fraction=0.25,
    )
    suite = build_slice_suite(cfg)
    kwargs = {e.meta["check"]: e.configuration.kwargs for e in suite.expectations}
    assert kwargs["dtype"]["value_set"] == ["uint16"]
    assert kwargs["mask_dtype"]["value_set"] == ["uint16"]
    assert (kwargs["height"]["min_value"], kwargs["height"]["max_value"]) == (10, 20)
    assert (kwargs["width"]["min_value"], kwargs["width"]["max_value"]) == (11, 21)
    assert kwargs["constant"]["min_value"] == 7.5
    assert kwargs["intensity_range"]["min_value"] == 33.0
    assert kwargs["foreground_fraction"]["max_value"] == 0.25


def test_strict_thresholds_fail_the_sample(sample_raw: Path) -> None:
    cfg = ValidateConfig(
        allowed_dtypes=["uint16"],
        min_intensity_std=60.0,
        max_foreground_fraction=0.09,
        max_width=700,
    )
    r = validate_dataset(sample_raw, BINARY, cfg)
    assert not r.success
    checks = {f["check"] for f in r.failures}
    assert checks == {"dtype", "mask_dtype", "constant", "foreground_fraction", "width"}
    assert len(_only(r, "dtype")) == 20
    # only slices whose std is below 60 / foreground above 0.09 are named
    table = r.table.set_index("row_id")
    for f in _only(r, "constant"):
        assert table.loc[f"{f['split']}:{f['slice']}", "std"] < 60.0
    fg = {(f["split"], f["slice"]) for f in _only(r, "foreground_fraction")}
    table_rows = r.table[["split", "slice", "foreground_fraction"]].itertuples(index=False)
    expected = {(s, z) for s, z, v in table_rows if v > 0.09}
    assert fg == expected and 0 < len(fg) < 20
    summary = {e["check"]: e for e in r.expectations}
    assert summary["constant"]["kwargs"]["min_value"] == 60.0
    assert summary["foreground_fraction"]["unexpected_count"] == len(fg)


# ---------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------


def test_write_report_outputs(sample_report: ValidationReport, tmp_path: Path) -> None:
    out = tmp_path / "validate"
    paths = write_report(sample_report, out)
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "slices.csv", "summary.md"]
    doc = json.loads(paths["report"].read_text())
    assert doc["success"] is True
    assert doc["classes"] == {"background": 0, "mitochondria": 255}
    assert doc["thresholds"]["min_intensity_std"] == 2.0
    assert doc["statistics"]["evaluated_expectations"] == 11
    assert len(doc["expectations"]) == 11 and all(e["success"] for e in doc["expectations"])
    assert doc["failures"] == []
    assert len(doc["slices"]) == 20
    assert doc["splits"]["train"]["class_fractions"]["mitochondria"] > 0
    csv = pd.read_csv(paths["slices"])
    assert len(csv) == 20
    assert {"file", "split", "slice", "std", "foreground_fraction"} <= set(csv.columns)
    md = paths["summary"].read_text()
    assert md.startswith("# Data validation: PASSED")
    assert "| train | 15 | 512x768 | uint8 |" in md
    assert "## Failures\n\nNone." in md


def test_report_to_dict_is_json_with_nulls(tmp_path: Path) -> None:
    raw = make_raw(tmp_path / "raw")
    (raw / "test" / "masks.tif").unlink()
    r = validate_dataset(raw, BINARY, ValidateConfig(require_test_masks=False))
    doc = json.loads(json.dumps(report_to_dict(r), allow_nan=False))
    test_rows = [s for s in doc["slices"] if s["split"] == "test"]
    assert test_rows[0]["foreground_fraction"] is None
    assert test_rows[0]["mask_file"] is None


def test_format_failures_lists_every_failure(tmp_path: Path) -> None:
    raw = _nonbinary(tmp_path / "raw")
    (raw / "test" / "images.tif").write_bytes(b"junk")
    r = validate_dataset(raw, BINARY, CFG)
    text = format_failures(r)
    assert text.splitlines()[0] == f"validation of {raw} failed (2 problem(s)):"
    assert f"  - [unreadable] {raw}/test/images.tif: unreadable TIFF" in text
    assert f"  - [mask_values] {raw}/train/masks.tif slice 1: mask values 128" in text


# ---------------------------------------------------------------------------------------
# the report gate used by patchify
# ---------------------------------------------------------------------------------------


def test_require_valid_report_accepts_success(
    sample_report: ValidationReport, tmp_path: Path
) -> None:
    paths = write_report(sample_report, tmp_path)
    assert require_valid_report(paths["report"], BINARY)["success"] is True


@pytest.mark.parametrize(
    ("content", "base", "message"),
    [
        (None, BINARY, "validation report not found; run the validate stage first"),
        ("{oops", BINARY, "validation report is not valid JSON"),
        ("[]", BINARY, "not a validation report (no 'success' field)"),
        (
            '{"success": false, "failures": [{}, {}], "classes": {}}',
            BINARY,
            "validation report says the data failed validation (2 failure(s)); "
            "fix the data and re-run the validate stage",
        ),
        (
            '{"success": true, "classes": {"background": 0, "mitochondria": 255}}',
            BaseConfig(classes=VNC_CLASSES),
            "data was validated with class table {'background': 0, 'mitochondria': 255} but "
            "base.classes is",
        ),
    ],
    ids=["missing", "not-json", "not-report", "failed", "other-classes"],
)
def test_require_valid_report_refuses(
    tmp_path: Path, content: str | None, base: BaseConfig, message: str
) -> None:
    path = tmp_path / "report.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError) as info:
        require_valid_report(path, base)
    assert str(info.value).startswith(f"{path}: {message}")


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------


def _cli(args: list[str]) -> object:
    from mitoseg.cli import app

    return CliRunner().invoke(app, args)


def test_cli_validate_json_success(sample_raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _cli(["validate", str(sample_raw), "--json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["success"] is True and len(doc["slices"]) == 20
    assert (out / "report.json").is_file()


def test_cli_validate_failure_names_files_and_keeps_outputs(tmp_path: Path) -> None:
    raw = _nonbinary(tmp_path / "raw")
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("previous")
    result = _cli(["validate", str(raw), "--out", str(out)])
    assert result.exit_code == 1
    assert f"{raw}/train/masks.tif slice 1: mask values 128" in result.stderr
    assert (out / "report.json").read_text() == "previous"


def test_cli_validate_params_file(tmp_path: Path) -> None:
    raw = make_raw(tmp_path / "raw")
    params = tmp_path / "params.yaml"
    params.write_text("validate:\n  min_height: 100\n")
    result = _cli(["validate", str(raw), "--params", str(params)])
    assert result.exit_code == 1
    assert "image height 72 is outside validate.min_height..max_height (100..65536)" in (
        result.stderr
    )
    params.write_text("validate:\n  min_hieght: 100\n")
    bad = _cli(["validate", str(raw), "--params", str(params)])
    assert bad.exit_code == 1
    assert "error: invalid params (1 problem(s)): validate.min_hieght: Extra inputs" in bad.stderr
    missing = _cli(["validate", str(raw), "--params", str(tmp_path / "none.yaml")])
    assert missing.exit_code == 1
    assert f"error: {tmp_path}/none.yaml: params file not found" in missing.stderr


def test_cli_validate_defaults_without_params(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = make_raw(tmp_path / "raw")
    monkeypatch.chdir(tmp_path)
    result = _cli(["validate", str(raw)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "validation passed: 5 slices, 11 expectations"
