"""Unit tests of ``mitoseg data fetch`` for local sources, manifests and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

from mitoseg.cli import app
from mitoseg.cli.data import _parse_checksums
from mitoseg.data.fetch import SAMPLE_LICENSE, bundled_manifest, fetch, sample_dir
from mitoseg.data.layout import read_split
from mitoseg.data.sources import normalize_mask, parse_manifest
from mitoseg.io import DataError

RNG = np.random.default_rng(0)


def _stack(z: int, h: int = 32, w: int = 40, dtype: type = np.uint8) -> np.ndarray:
    top = 255 if dtype == np.uint8 else 4095
    return RNG.integers(0, top + 1, size=(z, h, w)).astype(dtype)


def _mask(z: int, h: int = 32, w: int = 40, high: int = 255) -> np.ndarray:
    return (RNG.random((z, h, w)) > 0.7).astype(np.uint8) * high


def _epfl_folder(root: Path, *, mask_high: int = 255, dtype: type = np.uint8) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    arrays = {
        "training.tif": _stack(4, dtype=dtype),
        "training_groundtruth.tif": _mask(4, high=mask_high),
        "testing.tif": _stack(2, dtype=dtype),
        "testing_groundtruth.tif": _mask(2, high=mask_high),
    }
    for name, arr in arrays.items():
        tifffile.imwrite(root / name, arr)
    return arrays


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _no_leftovers(parent: Path) -> None:
    hidden = [p.name for p in parent.iterdir() if p.name.startswith(".")]
    assert hidden == []


# ---------------------------------------------------------------- sample


def test_sample_is_copied_byte_for_byte(tmp_path: Path) -> None:
    out = tmp_path / "raw"
    summary = fetch("sample", out, progress=False)
    src = sample_dir()
    for split in ("train", "test"):
        for name in ("images.tif", "masks.tif"):
            assert (out / split / name).read_bytes() == (src / split / name).read_bytes()
    assert (out / "NOTICE.md").read_bytes() == (src / "NOTICE.md").read_bytes()
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["source"] == "sample:vnc"
    assert meta["mask_kind"] == "binary"
    assert meta["license"] == SAMPLE_LICENSE
    assert meta["splits"]["train"]["n_slices"] == 15
    assert meta["splits"]["test"]["n_slices"] == 5
    assert summary["status"] == "written"
    assert summary["splits"]["train"] == {
        "n_slices": 15,
        "height": 512,
        "width": 768,
        "dtype": "uint8",
        "mask_dtype": "uint8",
    }
    images, masks = read_split(out, "test")
    assert images.shape == masks.shape == (5, 512, 768)
    assert set(np.unique(masks)) <= {0, 255}
    _no_leftovers(tmp_path)


def test_sample_dataset_json_is_deterministic(tmp_path: Path) -> None:
    fetch("sample", tmp_path / "a", progress=False)
    fetch("sample:vnc", tmp_path / "b", progress=False)
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")


def test_refetch_of_identical_sample_is_a_noop(tmp_path: Path) -> None:
    out = tmp_path / "raw"
    fetch("sample", out, progress=False)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    summary = fetch("sample", out, progress=False)
    assert summary["status"] == "unchanged"
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    _no_leftovers(tmp_path)


def test_sample_labels_mask_kind(tmp_path: Path) -> None:
    out = tmp_path / "raw"
    fetch("sample", out, mask_kind="labels", progress=False)
    src = sample_dir()
    assert (out / "train" / "masks.tif").read_bytes() == (src / "train/labels.tif").read_bytes()
    _, masks = read_split(out, "train")
    assert len(np.unique(masks)) > 2
    assert json.loads((out / "dataset.json").read_text())["mask_kind"] == "labels"


def test_other_mask_kind_needs_force(tmp_path: Path) -> None:
    out = tmp_path / "raw"
    fetch("sample", out, progress=False)
    before = _tree(out)
    with pytest.raises(
        DataError,
        match=r"raw: already exists and holds other data \(not a fetch of 'sample:vnc' with "
        r"mask kind 'labels'\); pass --force",
    ):
        fetch("sample", out, mask_kind="labels", progress=False)
    assert _tree(out) == before
    assert fetch("sample", out, mask_kind="labels", force=True, progress=False)["status"] == (
        "written"
    )
    assert json.loads((out / "dataset.json").read_text())["mask_kind"] == "labels"


def test_modified_output_of_same_source_needs_force(tmp_path: Path) -> None:
    out = tmp_path / "raw"
    fetch("sample", out, progress=False)
    (out / "extra.txt").write_text("local edit")
    with pytest.raises(DataError, match=r"raw: already exists and differs from the data fetched"):
        fetch("sample", out, progress=False)
    assert (out / "extra.txt").exists()
    fetch("sample", out, force=True, progress=False)
    assert not (out / "extra.txt").exists()
    _no_leftovers(tmp_path)


def test_unrelated_existing_folder_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "raw"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(DataError, match=r"raw: already exists and holds other data"):
        fetch("sample", out, progress=False)
    assert (out / "mine.txt").read_text() == "keep"


def test_existing_file_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "raw"
    out.write_text("x")
    with pytest.raises(DataError, match=r"raw: exists and is not a folder; pass --force"):
        fetch("sample", out, progress=False)


def test_unknown_sample_name(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"sample:fly: unknown sample; available: vnc"):
        fetch("sample:fly", tmp_path / "raw", progress=False)


def test_bad_mask_kind(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"mask_kind must be one of \('binary', 'labels'\)"):
        fetch("sample", tmp_path / "raw", mask_kind="multi", progress=False)


# ---------------------------------------------------------------- local folders


def test_epfl_folder_normalises_01_masks(tmp_path: Path) -> None:
    arrays = _epfl_folder(tmp_path / "epfl", mask_high=1)
    summary = fetch(str(tmp_path / "epfl"), tmp_path / "raw", progress=False)
    assert summary["kind"] == "folder"
    images, masks = read_split(tmp_path / "raw", "train")
    np.testing.assert_array_equal(images, arrays["training.tif"])
    np.testing.assert_array_equal(masks, arrays["training_groundtruth.tif"] * 255)
    assert masks.dtype == np.uint8
    meta = json.loads((tmp_path / "raw" / "dataset.json").read_text())
    assert [i["name"] for i in meta["inputs"]] == [
        str(tmp_path / "epfl" / n)
        for n in (
            "training.tif",
            "training_groundtruth.tif",
            "testing.tif",
            "testing_groundtruth.tif",
        )
    ]
    assert len(meta["inputs"][0]["sha256"]) == 64


def test_epfl_folder_16bit_images_are_kept(tmp_path: Path) -> None:
    arrays = _epfl_folder(tmp_path / "epfl", dtype=np.uint16)
    fetch(str(tmp_path / "epfl"), tmp_path / "raw", progress=False)
    images, masks = read_split(tmp_path / "raw", "test")
    assert images.dtype == np.uint16
    np.testing.assert_array_equal(images, arrays["testing.tif"])
    np.testing.assert_array_equal(masks, arrays["testing_groundtruth.tif"])


def test_epfl_folder_checksum_mismatch_names_file(tmp_path: Path) -> None:
    _epfl_folder(tmp_path / "epfl")
    with pytest.raises(
        DataError, match=r"testing\.tif: sha256 mismatch for testing\.tif: expected 0+"
    ):
        fetch(
            str(tmp_path / "epfl"),
            tmp_path / "raw",
            checksums={"testing.tif": "0" * 64},
            progress=False,
        )
    assert not (tmp_path / "raw").exists()


def test_epfl_folder_missing_file(tmp_path: Path) -> None:
    _epfl_folder(tmp_path / "epfl")
    (tmp_path / "epfl" / "testing_groundtruth.tif").unlink()
    with pytest.raises(
        DataError, match=r"testing_groundtruth\.tif: file not found \(EPFL layout\)"
    ):
        fetch(str(tmp_path / "epfl"), tmp_path / "raw", progress=False)
    assert not (tmp_path / "raw").exists()
    _no_leftovers(tmp_path)


def test_truncated_tiff_names_file_and_keeps_old_output(tmp_path: Path) -> None:
    _epfl_folder(tmp_path / "epfl")
    bad = tmp_path / "epfl" / "testing.tif"
    bad.write_bytes(bad.read_bytes()[:300])
    out = tmp_path / "raw"
    fetch("sample", out, progress=False)
    before = _tree(out)
    with pytest.raises(DataError, match=r"testing\.tif: page 0: cannot decode the pixel data"):
        fetch(str(tmp_path / "epfl"), out, force=True, progress=False)
    assert _tree(out) == before
    _no_leftovers(tmp_path)


def test_mask_shape_mismatch(tmp_path: Path) -> None:
    _epfl_folder(tmp_path / "epfl")
    tifffile.imwrite(tmp_path / "epfl" / "training_groundtruth.tif", _mask(4, h=16))
    with pytest.raises(
        DataError,
        match=r"training_groundtruth\.tif: mask shape \(4, 16, 40\) does not match image .*"
        r"training\.tif shape \(4, 32, 40\)",
    ):
        fetch(str(tmp_path / "epfl"), tmp_path / "raw", progress=False)


def test_non_binary_mask_in_binary_mode(tmp_path: Path) -> None:
    _epfl_folder(tmp_path / "epfl")
    labels = RNG.integers(0, 4, size=(2, 32, 40)).astype(np.uint8) * 60
    tifffile.imwrite(tmp_path / "epfl" / "testing_groundtruth.tif", labels)
    with pytest.raises(
        DataError,
        match=r"testing_groundtruth\.tif: mask is not binary \(values 0, 60, 120, 180\); "
        r"expected 0/1 or 0/255, or use mask kind 'labels'",
    ):
        fetch(str(tmp_path / "epfl"), tmp_path / "raw", progress=False)
    fetch(str(tmp_path / "epfl"), tmp_path / "raw", mask_kind="labels", progress=False)
    _, masks = read_split(tmp_path / "raw", "test")
    np.testing.assert_array_equal(masks, labels)


def test_float_images_are_rejected(tmp_path: Path) -> None:
    _epfl_folder(tmp_path / "epfl")
    tifffile.imwrite(tmp_path / "epfl" / "training.tif", _stack(4).astype(np.float32))
    with pytest.raises(
        DataError, match=r"training\.tif: unsupported image dtype float32; expected uint8 or uint16"
    ):
        fetch(str(tmp_path / "epfl"), tmp_path / "raw", progress=False)


def test_split_slice_sizes_must_agree(tmp_path: Path) -> None:
    _epfl_folder(tmp_path / "epfl")
    tifffile.imwrite(tmp_path / "epfl" / "testing.tif", _stack(2, h=16))
    tifffile.imwrite(tmp_path / "epfl" / "testing_groundtruth.tif", _mask(2, h=16))
    with pytest.raises(
        DataError, match=r"testing\.tif: test slices \(16, 40\) differ from train slices \(32, 40\)"
    ):
        fetch(str(tmp_path / "epfl"), tmp_path / "raw", progress=False)


def test_canonical_folder_without_test_masks(tmp_path: Path) -> None:
    src = tmp_path / "canon"
    for split, z in (("train", 3), ("test", 2)):
        (src / split).mkdir(parents=True)
        tifffile.imwrite(src / split / "images.tif", _stack(z))
    tifffile.imwrite(src / "train" / "masks.tif", _mask(3))
    fetch(str(src), tmp_path / "raw", progress=False)
    images, masks = read_split(tmp_path / "raw", "test", require_masks=False)
    assert images.shape == (2, 32, 40)
    assert masks is None
    meta = json.loads((tmp_path / "raw" / "dataset.json").read_text())
    assert meta["splits"]["test"]["mask_dtype"] is None


def test_canonical_folder_needs_train_masks(tmp_path: Path) -> None:
    src = tmp_path / "canon"
    for split in ("train", "test"):
        (src / split).mkdir(parents=True)
        tifffile.imwrite(src / split / "images.tif", _stack(2))
    with pytest.raises(DataError, match=r"train/masks\.tif: file not found \(canonical layout\)"):
        fetch(str(src), tmp_path / "raw", progress=False)


def _slice_folders(root: Path, *, suffix: str, dtype: type) -> dict[str, np.ndarray]:
    stacks: dict[str, np.ndarray] = {}
    for split, z in (("train", 3), ("test", 2)):
        img, msk = _stack(z, dtype=dtype), _mask(z, high=1)
        stacks[split] = img
        for kind, arr in (("images", img), ("masks", msk)):
            (root / split / kind).mkdir(parents=True)
            for i in range(z):
                # names s1, s2, s10: natural order must win over lexical order
                name = f"s{(1, 2, 10)[i]}{suffix}"
                if suffix == ".png":
                    Image.fromarray(arr[i]).save(root / split / kind / name)
                else:
                    tifffile.imwrite(root / split / kind / name, arr[i])
    return stacks


@pytest.mark.parametrize(("suffix", "dtype"), [(".png", np.uint8), (".tif", np.uint16)])
def test_slice_folders(tmp_path: Path, suffix: str, dtype: type) -> None:
    stacks = _slice_folders(tmp_path / "slices", suffix=suffix, dtype=dtype)
    summary = fetch(str(tmp_path / "slices"), tmp_path / "raw", progress=False)
    assert summary["splits"]["train"]["n_slices"] == 3
    images, masks = read_split(tmp_path / "raw", "train")
    assert images.dtype == dtype
    np.testing.assert_array_equal(images, stacks["train"])
    assert set(np.unique(masks)) <= {0, 255}


def test_slice_folders_unpaired_file(tmp_path: Path) -> None:
    _slice_folders(tmp_path / "slices", suffix=".png", dtype=np.uint8)
    Image.fromarray(_stack(1)[0]).save(tmp_path / "slices" / "test" / "images" / "lonely.png")
    with pytest.raises(DataError, match=r"test/images/lonely\.png: no mask with the same name"):
        fetch(str(tmp_path / "slices"), tmp_path / "raw", progress=False)
    Image.fromarray(_stack(1)[0]).save(tmp_path / "slices" / "test" / "masks" / "lonely.png")
    Image.fromarray(_stack(1)[0]).save(tmp_path / "slices" / "train" / "masks" / "orphan.png")
    with pytest.raises(DataError, match=r"train/masks/orphan\.png: no image with the same name"):
        fetch(str(tmp_path / "slices"), tmp_path / "raw", progress=False)


def test_slice_folders_size_mismatch_and_bad_type(tmp_path: Path) -> None:
    _slice_folders(tmp_path / "slices", suffix=".png", dtype=np.uint8)
    Image.fromarray(_stack(1, h=8)[0]).save(tmp_path / "slices" / "test" / "images" / "s2.png")
    with pytest.raises(DataError, match=r"test/images/s2\.png: slice \(8, 40\) uint8 differs from"):
        fetch(str(tmp_path / "slices"), tmp_path / "raw", progress=False)
    (tmp_path / "slices" / "train" / "images" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"train/images/notes\.txt: unsupported slice file type"):
        fetch(str(tmp_path / "slices"), tmp_path / "raw", progress=False)


def test_slice_folders_test_without_masks(tmp_path: Path) -> None:
    _slice_folders(tmp_path / "slices", suffix=".png", dtype=np.uint8)
    for f in (tmp_path / "slices" / "test" / "masks").iterdir():
        f.unlink()
    (tmp_path / "slices" / "test" / "masks").rmdir()
    fetch(str(tmp_path / "slices"), tmp_path / "raw", progress=False)
    assert not (tmp_path / "raw" / "test" / "masks.tif").exists()
    assert (tmp_path / "raw" / "test" / "images.tif").exists()


def test_unrecognised_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: unrecognised folder layout; expected the EPFL"):
        fetch(str(tmp_path / "empty"), tmp_path / "raw", progress=False)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("nowhere/at/all", r"nowhere/at/all: source not found; expected 'sample', 'epfl'"),
        ("https://example.org/x.tif", r"x\.tif: a URL is not a source by itself"),
        ("missing.yaml", r"missing\.yaml: manifest not found"),
        ("manifest:nope", r"manifest:nope: no bundled manifest; available: cdeep3m, vnc"),
    ],
)
def test_unknown_sources(tmp_path: Path, source: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        fetch(source, tmp_path / "raw", progress=False)
    assert not (tmp_path / "raw").exists()


# ---------------------------------------------------------------- manifests


def _write_manifest(path: Path, doc: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(doc))
    return path


def test_manifest_local_paths_concatenate_and_slice(tmp_path: Path) -> None:
    d = tmp_path / "stacks"
    d.mkdir()
    a, b, t = _stack(3), _stack(2), _stack(5)
    ma, mb, mt = _mask(3), _mask(2, high=1), _mask(5)
    for name, arr in {
        "a.tif": a,
        "b.tif": b,
        "t.tif": t,
        "ma.tif": ma,
        "mb.tif": mb,
        "mt.tif": mt,
    }.items():
        tifffile.imwrite(d / name, arr)
    manifest = _write_manifest(
        d / "m.yaml",
        {
            "license": "CC0",
            "train": [{"image": "a.tif", "mask": "ma.tif"}, {"image": "b.tif", "mask": "mb.tif"}],
            "test": [{"image": "t.tif", "mask": "mt.tif", "slices": [1, 4]}],
        },
    )
    fetch(str(manifest), tmp_path / "raw", progress=False)
    images, masks = read_split(tmp_path / "raw", "train")
    np.testing.assert_array_equal(images, np.concatenate([a, b]))
    np.testing.assert_array_equal(masks, np.concatenate([ma, mb * 255]))
    images, masks = read_split(tmp_path / "raw", "test")
    np.testing.assert_array_equal(images, t[1:4])
    np.testing.assert_array_equal(masks, mt[1:4])
    assert json.loads((tmp_path / "raw" / "dataset.json").read_text())["license"] == "CC0"


def test_manifest_root_is_relative_to_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "data").mkdir()
    tifffile.imwrite(tmp_path / "data" / "i.tif", _stack(2))
    tifffile.imwrite(tmp_path / "data" / "m.tif", _mask(2))
    (tmp_path / "elsewhere").mkdir()
    manifest = _write_manifest(
        tmp_path / "elsewhere" / "m.yaml",
        {
            "root": "data",
            "train": [{"image": "i.tif", "mask": "m.tif"}],
            "test": [{"image": "i.tif"}],
        },
    )
    monkeypatch.chdir(tmp_path)
    refs, license_ = parse_manifest(manifest)
    assert refs["train"][0].image == str(tmp_path / "data" / "i.tif")
    assert license_ is None
    fetch(str(manifest), tmp_path / "raw", progress=False)
    assert (tmp_path / "raw" / "train" / "masks.tif").exists()
    assert not (tmp_path / "raw" / "test" / "masks.tif").exists()


def test_manifest_shape_and_dtype_mismatch(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "a.tif", _stack(2))
    tifffile.imwrite(tmp_path / "b.tif", _stack(2, w=24))
    tifffile.imwrite(tmp_path / "c.tif", _stack(2, dtype=np.uint16))
    tifffile.imwrite(tmp_path / "ma.tif", _mask(2))
    tifffile.imwrite(tmp_path / "mb.tif", _mask(2, w=24))
    doc = {
        "train": [{"image": "a.tif", "mask": "ma.tif"}, {"image": "b.tif", "mask": "mb.tif"}],
        "test": [{"image": "a.tif"}],
    }
    m = _write_manifest(tmp_path / "m.yaml", doc)
    with pytest.raises(
        DataError,
        match=r"b\.tif: slice size \(32, 24\) differs from .*a\.tif \(32, 40\); "
        r"stacks of one split must share \(H, W\)",
    ):
        fetch(str(m), tmp_path / "raw", progress=False)
    doc["train"][1] = {"image": "c.tif", "mask": "ma.tif"}
    m = _write_manifest(tmp_path / "m.yaml", doc)
    with pytest.raises(DataError, match=r"c\.tif: dtype uint16 differs from .*a\.tif uint8"):
        fetch(str(m), tmp_path / "raw", progress=False)
    assert not (tmp_path / "raw").exists()


def test_manifest_mixed_masks_in_split(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "a.tif", _stack(2))
    tifffile.imwrite(tmp_path / "ma.tif", _mask(2))
    m = _write_manifest(
        tmp_path / "m.yaml",
        {
            "train": [{"image": "a.tif", "mask": "ma.tif"}],
            "test": [{"image": "a.tif", "mask": "ma.tif"}, {"image": "a.tif"}],
        },
    )
    with pytest.raises(DataError, match=r"a\.tif: no mask given, but other test stacks have masks"):
        fetch(str(m), tmp_path / "raw", progress=False)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"train": [], "test": []}, r"'train' must be a non-empty list"),
        ({"train": [{"image": "a.tif", "mask": "b.tif"}]}, r"'test' must be a non-empty list"),
        ({"extra": 1}, r"unknown manifest key\(s\) \['extra'\]"),
        (["a"], r"expected a manifest mapping with 'train' and 'test' lists"),
        ({"train": ["a.tif"], "test": [{"image": "a"}]}, r"train\[0\]: entry must be a mapping"),
        ({"train": [{"mask": "m.tif"}], "test": []}, r"train\[0\]: 'image' is required"),
        ({"train": [{"image": "a.tif"}], "test": []}, r"train\[0\]: 'mask' is required"),
        (
            {"train": [{"image": "a", "mask": "b", "z": 1}], "test": []},
            r"train\[0\]: unknown key\(s\) \['z'\]",
        ),
        (
            {"train": [{"image": "a", "mask": "b", "slices": [3, 1]}], "test": []},
            r"train\[0\]: 'slices' must be \[start, stop\] with 0 <= start < stop",
        ),
    ],
)
def test_manifest_errors(tmp_path: Path, doc: object, message: str) -> None:
    m = _write_manifest(tmp_path / "m.yaml", doc)  # type: ignore[arg-type]
    with pytest.raises(DataError, match=message):
        parse_manifest(m)


def test_manifest_invalid_yaml_and_slices_out_of_range(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(DataError, match=r"bad\.yaml: not valid YAML"):
        fetch(str(bad), tmp_path / "raw", progress=False)
    tifffile.imwrite(tmp_path / "a.tif", _stack(2))
    tifffile.imwrite(tmp_path / "ma.tif", _mask(2))
    m = _write_manifest(
        tmp_path / "m.yaml",
        {
            "train": [{"image": "a.tif", "mask": "ma.tif", "slices": [0, 5]}],
            "test": [{"image": "a.tif"}],
        },
    )
    with pytest.raises(DataError, match=r"a\.tif: slices \[0, 5\) out of range for a stack of 2"):
        fetch(str(m), tmp_path / "raw", progress=False)


def test_manifest_missing_stack_names_file(tmp_path: Path) -> None:
    m = _write_manifest(
        tmp_path / "m.yaml",
        {"train": [{"image": "gone.tif", "mask": "m.tif"}], "test": [{"image": "gone.tif"}]},
    )
    with pytest.raises(DataError, match=r"gone\.tif: file not found"):
        fetch(str(m), tmp_path / "raw", progress=False)


def test_bundled_manifests_point_at_shared_data(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    refs, license_ = parse_manifest(bundled_manifest("vnc"))
    assert refs["train"][0].image == str(tmp_path / "../shared/data/vnc/vnc_stack1_raw.tif")
    assert refs["train"][0].slices == (0, 15)
    assert refs["test"][0].slices == (15, 20)
    assert license_ is not None and "CC BY-NC-SA 3.0" in license_
    refs, _ = parse_manifest(bundled_manifest("cdeep3m"))
    assert refs["test"][0].mask is None
    refs, _ = parse_manifest(bundled_manifest("vnc_labels"))
    assert refs["train"][0].mask.endswith("vnc_stack1_labels.tif")


def test_normalize_mask_rules() -> None:
    assert normalize_mask(np.zeros((1, 2, 2), np.uint8), "binary", "m").max() == 0
    out = normalize_mask(np.array([[[0, 1]]], dtype=np.uint16), "binary", "m")
    assert out.dtype == np.uint8 and out.tolist() == [[[0, 255]]]
    assert normalize_mask(np.array([[[True, False]]]), "labels", "m").dtype == np.uint8
    with pytest.raises(DataError, match=r"m: unsupported label dtype int32"):
        normalize_mask(np.zeros((1, 2, 2), np.int32), "labels", "m")
    with pytest.raises(
        DataError, match=r"m: mask is not binary \(values 0, 1, 2, 3, 4, 5, 6, 7, \.\.\.\)"
    ):
        normalize_mask(np.arange(12, dtype=np.uint8).reshape(1, 3, 4), "binary", "m")


# ---------------------------------------------------------------- CLI


def test_cli_fetch_sample_and_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "raw"
    result = runner.invoke(
        app, ["--no-progress", "data", "fetch", "--source", "sample", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "raw: written; source sample:vnc (sample)" in result.output
    assert "train: 15 slices 512x768 uint8, masks uint8 (binary)" in result.output
    result = runner.invoke(app, ["data", "fetch", "--source", "sample", "--out", str(out)])
    assert result.exit_code == 0
    assert "unchanged (identical data already there)" in result.output
    result = runner.invoke(
        app, ["data", "fetch", "--source", "sample", "--out", str(out), "--mask-kind", "labels"]
    )
    assert result.exit_code == 1
    assert "error: " in result.output and "pass --force" in result.output
    result = runner.invoke(
        app,
        [
            "data",
            "fetch",
            "--source",
            "sample",
            "--out",
            str(out),
            "--mask-kind",
            "labels",
            "--force",
        ],
    )
    assert result.exit_code == 0
    assert "masks uint8 (labels)" in result.output
    result = runner.invoke(
        app, ["data", "fetch", "--source", "sample", "--out", str(out), "--sha256", "x"]
    )
    assert result.exit_code == 1
    assert "--sha256 'x': expected NAME=HEX" in result.output


def test_parse_checksums() -> None:
    assert _parse_checksums(["training.tif=" + "AB" * 32]) == {"training.tif": "ab" * 32}
    with pytest.raises(ValueError, match=r"--sha256 '=abc': expected NAME=HEX"):
        _parse_checksums(["=abc"])
    with pytest.raises(ValueError, match=r"--sha256 'a=xyz': the checksum must be 64 hex digits"):
        _parse_checksums(["a=xyz"])


# ---------------------------------------------------------------- voxel size


def test_sample_records_its_voxel_size(tmp_path: Path) -> None:
    summary = fetch("sample", tmp_path / "raw", progress=False)
    meta = json.loads((tmp_path / "raw" / "dataset.json").read_text())
    assert meta["voxel_size_nm"] == summary["voxel_size_nm"] == [50.0, 4.6, 4.6]


@pytest.mark.parametrize(
    ("voxels", "expected"),
    [
        ({}, None),  # no calibration anywhere: nothing is invented
        ({"training.tif": (40.0, 5.0, 5.0), "testing.tif": (40.0, 5.0, 5.0)}, [40.0, 5.0, 5.0]),
        ({"testing.tif": (30.0, 6.0, 6.0)}, [30.0, 6.0, 6.0]),  # stacks without one agree
    ],
    ids=["untagged", "imagej_tags", "one_stack_tagged"],
)
def test_folder_voxel_size_from_tiff_tags(
    tmp_path: Path, voxels: dict[str, tuple[float, float, float]], expected: list[float] | None
) -> None:
    from mitoseg.io import read_voxel_size, write_stack

    arrays = _epfl_folder(tmp_path / "epfl")
    for name, vs in voxels.items():
        write_stack(tmp_path / "epfl" / name, arrays[name], vs)
    summary = fetch(str(tmp_path / "epfl"), tmp_path / "raw", progress=False)
    meta = json.loads((tmp_path / "raw" / "dataset.json").read_text())
    assert meta["voxel_size_nm"] == summary["voxel_size_nm"]
    for split in ("train", "test"):  # the written stacks carry it too
        for name in ("images.tif", "masks.tif"):
            got = read_voxel_size(tmp_path / "raw" / split / name)
            assert got == (None if expected is None else pytest.approx(expected))
    if expected is None:
        assert meta["voxel_size_nm"] is None
    else:
        assert meta["voxel_size_nm"] == pytest.approx(expected)


def test_folder_stacks_with_different_voxel_sizes(tmp_path: Path) -> None:
    from mitoseg.io import write_stack

    arrays = _epfl_folder(tmp_path / "epfl")
    write_stack(tmp_path / "epfl" / "training.tif", arrays["training.tif"], (40.0, 5.0, 5.0))
    write_stack(tmp_path / "epfl" / "testing.tif", arrays["testing.tif"], (40.0, 8.0, 8.0))
    message = (
        f"{tmp_path / 'epfl' / 'testing.tif'}: voxel size [40.0, 8.0, 8.0] nm differs from "
        f"{tmp_path / 'epfl' / 'training.tif'}: [40.0, 5.0, 5.0] nm"
    )
    with pytest.raises(DataError, match="^" + message.replace("[", r"\[").replace(".", r"\.")):
        fetch(str(tmp_path / "epfl"), tmp_path / "raw", progress=False)
    assert not (tmp_path / "raw").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "sample voxel size not found"),
        ('{"voxel_size_nm": [4.6, 4.6]}', "voxel_size_nm: expected 3 positive numbers"),
        ('{"voxel_size_nm": [50, 0, 4.6]}', "voxel_size_nm: expected 3 positive numbers"),
        ("[50, 4.6, 4.6]", "expected a JSON object"),
    ],
    ids=["missing", "two_numbers", "zero", "not_an_object"],
)
def test_sample_voxel_size_errors(tmp_path: Path, content: str | None, message: str) -> None:
    from mitoseg.data.fetch import sample_voxel_size

    if content is not None:
        (tmp_path / "voxel_size.json").write_text(content)
    with pytest.raises(DataError, match=f"^{tmp_path / 'voxel_size.json'}.*{message}"):
        sample_voxel_size(tmp_path)
