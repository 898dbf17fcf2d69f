"""The label store (:mod:`mitoseg.labelstore`) on hand-made tiny volumes: TIFF stacks,
OME-Zarr and (with SeaweedFS) an OME-Zarr on S3."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile

from mitoseg.io import write_stack
from mitoseg.labelstore import (
    SCHEMA,
    LabelStoreError,
    add_slice,
    check_volume,
    init_store,
    iter_slices,
    list_entries,
    make_provenance,
    read_manifest,
    read_slice,
    resolve_volume_uri,
    volume_fingerprint,
)
from mitoseg.labelstore_lock import LOCK_FILE, store_lock
from mitoseg.volume.store import open_volume

SHAPE = (5, 12, 16)
VOXEL = (50.0, 4.6, 4.6)
CLASSES = {"background": 0, "mitochondria": 255}
IGNORE = 254
T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def _volume(tmp: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp / "data" / "vol.tif"
    write_stack(path, rng.integers(0, 255, SHAPE, dtype=np.uint8), VOXEL)
    return path


@pytest.fixture()
def store(tmp_path: Path) -> Path:
    root = tmp_path / "labels"
    init_store(root, str(_volume(tmp_path)), CLASSES, IGNORE)
    return root


def _mask(box: tuple[int, int, int, int], value: int = 255, bg: tuple[int, int] | None = None):
    """A (12, 16) mask: ``value`` in rows y0..y1-1, columns x0..x1-1, background 0 at
    ``bg`` (one pixel), ignore elsewhere."""
    y0, y1, x0, x1 = box
    m = np.full(SHAPE[1:], IGNORE, np.uint8)
    m[y0:y1, x0:x1] = value
    if bg is not None:
        m[bg] = 0
    return m


def _prov(**kw: Any):
    return make_provenance("python", time=T0, author="ana", **kw)


def test_init_reads_only_the_volume_metadata(tmp_path: Path) -> None:
    vol = _volume(tmp_path)
    manifest = init_store(tmp_path / "labels", str(vol), CLASSES, IGNORE)
    raw = json.loads((tmp_path / "labels" / "store.json").read_text())
    assert raw["schema"] == SCHEMA and raw["entries"] == []
    assert raw["volume"]["uri"] == "../data/vol.tif"  # relative to the store
    assert tuple(raw["volume"]["shape"]) == SHAPE
    assert raw["volume"]["voxel_size_nm"] == pytest.approx(list(VOXEL))
    assert raw["classes"] == CLASSES and raw["ignore_value"] == IGNORE
    volume = open_volume(str(vol))
    try:
        assert manifest.volume.fingerprint == volume_fingerprint(volume)
    finally:
        volume.close()
    assert Path(resolve_volume_uri(tmp_path / "labels")).resolve() == vol.resolve()
    assert sorted(p.name for p in (tmp_path / "labels").iterdir()) == [".store.lock", "store.json"]


def test_init_on_an_ome_zarr_volume(tmp_path: Path) -> None:
    from tests.volumes import write_ome_zarr

    data = np.arange(np.prod(SHAPE), dtype=np.uint16).reshape(SHAPE)
    uri = write_ome_zarr(tmp_path / "vol.ome.zarr", data, VOXEL, chunks=(1, 12, 16))
    manifest = init_store(tmp_path / "st", uri, {"bg": 0, "mito": 1, "er": 2}, 9)
    assert manifest.volume.shape == SHAPE
    assert manifest.volume.voxel_size_nm == pytest.approx(VOXEL)
    volume = open_volume(resolve_volume_uri(tmp_path / "st"))
    assert check_volume(tmp_path / "st", volume) == manifest


def test_init_on_a_volume_on_s3(tmp_path: Path, s3_env: Any) -> None:
    from tests.volumes import write_ome_zarr

    src = Path(write_ome_zarr(tmp_path / "v.ome.zarr", np.ones(SHAPE, np.uint8), VOXEL))
    bucket, client = s3_env.make_bucket("labelstore"), s3_env.client()
    for f in src.rglob("*"):
        if f.is_file():
            client.upload_file(str(f), bucket, f"v.ome.zarr/{f.relative_to(src)}")
    uri = f"s3://{bucket}/v.ome.zarr"
    manifest = init_store(tmp_path / "st", uri, CLASSES, IGNORE)
    assert manifest.volume.uri == uri == resolve_volume_uri(tmp_path / "st")
    assert manifest.volume.shape == SHAPE
    assert check_volume(tmp_path / "st", open_volume(uri)).volume.uri == uri


def test_add_writes_the_slice_and_its_entry(store: Path) -> None:
    mask = _mask((2, 5, 3, 9), bg=(7, 1))
    entry = add_slice(store, 3, mask, _prov(model="models:/m/4", note="suggest rank 1"))
    on_disk = tifffile.imread(store / "z00003.tif")
    assert on_disk.dtype == np.uint8
    np.testing.assert_array_equal(on_disk, mask)
    np.testing.assert_array_equal(read_slice(store, 3), mask)
    raw = json.loads((store / "store.json").read_text())["entries"]
    assert raw == [
        {
            "z": 3, "split": "train", "file": "z00003.tif", "labelled_pixels": 3 * 6 + 1,
            "class_pixels": {"background": 1, "mitochondria": 18},
            "bbox": {"y0": 2, "y1": 8, "x0": 1, "x1": 9},
            "provenance": {
                "time": "2026-01-02T03:04:05Z", "author": "ana", "tool": "python",
                "model": "models:/m/4", "note": "suggest rank 1", "mode": "new",
                "labelled_pixels": 19,
            },
            "history": [],
        }
    ]  # fmt: skip
    assert entry.model_dump(mode="json") == raw[0]


def test_relabelling_merges_by_default_and_keeps_the_history(store: Path) -> None:
    first = _mask((0, 4, 0, 4))
    add_slice(store, 1, first, _prov(note="a"))
    second = _mask((2, 6, 2, 6), value=0)  # overlaps the first in rows/cols 2..3
    entry = add_slice(store, 1, second, _prov(note="b"))
    expected = first.copy()
    expected[2:6, 2:6] = 0
    np.testing.assert_array_equal(read_slice(store, 1), expected)
    assert entry.labelled_pixels == int((expected != IGNORE).sum()) == 16 + 16 - 4
    assert entry.class_pixels == {"background": 16, "mitochondria": 12}
    assert (entry.provenance.mode, entry.provenance.note, entry.provenance.labelled_pixels) == (
        "merge", "b", 16,
    )  # fmt: skip
    assert [(h.mode, h.note) for h in entry.history] == [("new", "a")]

    third = _mask((10, 12, 14, 16))
    entry = add_slice(store, 1, third, _prov(note="c"), mode="replace")
    np.testing.assert_array_equal(read_slice(store, 1), third)
    assert entry.bbox.model_dump() == {"y0": 10, "y1": 12, "x0": 14, "x1": 16}
    assert [(h.mode, h.note) for h in entry.history] == [("new", "a"), ("merge", "b")]
    assert entry.provenance.mode == "replace"


def test_test_slices_change_only_with_the_flag(store: Path) -> None:
    add_slice(store, 4, _mask((0, 2, 0, 2)), _prov(), split="test")
    with pytest.raises(LabelStoreError, match=r"slice 4: split: the slice is a test slice"):
        add_slice(store, 4, _mask((5, 6, 5, 6)), _prov(), split="test")
    np.testing.assert_array_equal(read_slice(store, 4), _mask((0, 2, 0, 2)))
    entry = add_slice(store, 4, _mask((5, 6, 5, 6)), _prov(), split="test", allow_test_change=True)
    assert entry.split == "test" and entry.labelled_pixels == 5


def test_list_and_iterate_by_split_in_z_order(store: Path) -> None:
    masks = {3: _mask((0, 1, 0, 3)), 0: _mask((1, 2, 0, 5)), 2: _mask((4, 8, 4, 8), 0)}
    splits = {3: "train", 0: "test", 2: "train"}
    for z, m in masks.items():
        add_slice(store, z, m, _prov(), split=splits[z])
    assert [e.z for e in list_entries(store)] == [0, 2, 3]
    assert [e.z for e in list_entries(store, "train")] == [2, 3]
    got = {e.z: (e.split, m) for e, m in iter_slices(store)}
    assert sorted(got) == [0, 2, 3]
    for z, (split, m) in got.items():
        assert split == splits[z]
        np.testing.assert_array_equal(m, masks[z])
    assert [e.z for e, _ in iter_slices(store, split="test")] == [0]
    assert [e.labelled_pixels for e in read_manifest(store).entries] == [5, 16, 3]


def test_author_defaults_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MITOSEG_AUTHOR", raising=False)
    monkeypatch.setenv("USER", "lab-user")
    prov = make_provenance("cli")
    assert prov.author == "lab-user" and prov.time.tzinfo is not None
    monkeypatch.setenv("MITOSEG_AUTHOR", "Dr. A")
    assert make_provenance("napari", note="").author == "Dr. A"
    assert make_provenance("napari", author=" bo ").author == "bo"


# ---------------------------------------------------------------------------- errors


def _err_shape(s: Path) -> None:
    add_slice(s, 1, np.zeros((12, 15), np.uint8), _prov())


def _err_3d(s: Path) -> None:
    add_slice(s, 1, np.zeros((1, 12, 16), np.uint8), _prov())


def _err_z_high(s: Path) -> None:
    add_slice(s, 5, _mask((0, 1, 0, 1)), _prov())


def _err_z_negative(s: Path) -> None:
    add_slice(s, -1, _mask((0, 1, 0, 1)), _prov())


def _err_values(s: Path) -> None:
    add_slice(s, 1, _mask((0, 1, 0, 1), value=7), _prov())


def _err_float(s: Path) -> None:
    add_slice(s, 1, _mask((0, 1, 0, 1)).astype(np.float32), _prov())


def _err_empty(s: Path) -> None:
    add_slice(s, 1, np.full(SHAPE[1:], IGNORE, np.uint8), _prov())


def _err_split(s: Path) -> None:
    add_slice(s, 1, _mask((0, 1, 0, 1)), _prov(), split="val")  # type: ignore[arg-type]


def _err_mode(s: Path) -> None:
    add_slice(s, 1, _mask((0, 1, 0, 1)), _prov(), mode="add")  # type: ignore[arg-type]


def _err_move(s: Path) -> None:
    add_slice(s, 1, _mask((0, 1, 0, 1)), _prov())
    add_slice(s, 1, _mask((0, 1, 0, 1)), _prov(), split="test")


def _err_not_labelled(s: Path) -> None:
    read_slice(s, 2)


def _err_missing_file(s: Path) -> None:
    add_slice(s, 2, _mask((0, 1, 0, 1)), _prov())
    (s / "z00002.tif").unlink()
    list(iter_slices(s))


def _err_no_store(s: Path) -> None:
    list_entries(s / "elsewhere")


def _err_bad_manifest(s: Path) -> None:
    raw = json.loads((s / "store.json").read_text())
    raw["ignore_value"] = 0  # a class value
    (s / "store.json").write_text(json.dumps(raw))
    read_manifest(s)


def _err_init_twice(s: Path) -> None:
    init_store(s, resolve_volume_uri(s), CLASSES, IGNORE)


def _err_init_ignore_is_class(s: Path) -> None:
    init_store(s.parent / "new", resolve_volume_uri(s), CLASSES, 0)


def _err_init_uint16_class(s: Path) -> None:
    init_store(s.parent / "new", resolve_volume_uri(s), {"bg": 0, "mito": 300}, 1)


def _err_other_volume(s: Path) -> None:
    other = s.parent / "other.tif"
    write_stack(other, np.zeros((5, 12, 17), np.uint8))
    volume = open_volume(str(other))
    try:
        check_volume(s, volume)
    finally:
        volume.close()


def _err_s3_add(s: Path) -> None:
    add_slice("s3://bucket/labels", 1, _mask((0, 1, 0, 1)), _prov())


def _err_s3_init(s: Path) -> None:
    init_store("s3://bucket/labels", resolve_volume_uri(s), CLASSES, IGNORE)


def _err_negative_timeout(s: Path) -> None:
    add_slice(s, 1, _mask((0, 1, 0, 1)), _prov(), lock_timeout_s=-1)


def _err_nan_timeout(s: Path) -> None:
    with store_lock(s, "ana", float("nan")):
        pass


def _err_lock_is_a_directory(s: Path) -> None:
    (s / LOCK_FILE).unlink()
    (s / LOCK_FILE).mkdir()
    add_slice(s, 1, _mask((0, 1, 0, 1)), _prov())


ERRORS = [
    (_err_shape, r"store\.json: slice 1: mask shape \(12, 15\) differs from the volume's "
                 r"\(Y, X\) = \(12, 16\)$"),
    (_err_3d, r"slice 1: mask shape \(1, 12, 16\) differs"),
    (_err_z_high, r"store\.json: z 5 is outside the volume's slices 0\.\.4$"),
    (_err_z_negative, r"z -1 is outside the volume's slices 0\.\.4$"),
    (_err_values, r"slice 1: mask values \[7\] are not in the class table .* nor the "
                  r"ignore_value 254$"),
    (_err_float, r"slice 1: mask dtype float32 is not an integer type$"),
    (_err_empty, r"slice 1: the mask labels no pixel \(all ignore_value 254\)$"),
    (_err_split, r"slice 1: split must be 'train' or 'test', got 'val'$"),
    (_err_mode, r"slice 1: mode must be 'merge' or 'replace', got 'add'$"),
    (_err_move, r"slice 1: split: the slice is in split 'train'; moving it to 'test' needs "
                r"allow_test_change"),
    (_err_not_labelled, r"store\.json: slice 2 is not labelled \(labelled: none\)$"),
    (_err_missing_file, r"z00002\.tif: slice 2: file is listed in store\.json but missing$"),
    (_err_no_store, r"elsewhere/store\.json: no label store here"),
    (_err_bad_manifest, r"store\.json: invalid label store \(store: Value error, "
                        r"base\.ignore_value 0 is a mask value"),
    (_err_init_twice, r"labels/store\.json: a label store already exists here$"),
    (_err_init_ignore_is_class, r"new/store\.json: base\.ignore_value 0 is a mask value"),
    (_err_init_uint16_class, r"new/store\.json: classes: mask value 300 does not fit the "
                             r"store's uint8 masks$"),
    (_err_other_volume, r"store\.json: volume\.shape is \(5, 12, 16\) but .*other\.tif has "
                        r"\(5, 12, 17\)$"),
    (_err_s3_add, r"^s3://bucket/labels: a label store is a local directory \(a shared "
                  r"filesystem for several annotators\); s3:// stores are not supported$"),
    (_err_s3_init, r"^s3://bucket/labels: a label store is a local directory"),
    (_err_negative_timeout, r"labels/store\.json: lock timeout must be a finite number of "
                            r"seconds >= 0, got -1$"),
    (_err_nan_timeout, r"labels/store\.json: lock timeout must be .*, got nan$"),
    (_err_lock_is_a_directory, r"labels/store\.json: cannot lock .*labels/\.store\.lock "
                               r"\(\[Errno 21\] Is a directory"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("call", "message"), ERRORS, ids=[c.__name__.removeprefix("_err_") for c, _ in ERRORS]
)
def test_errors_name_the_store_slice_and_field(store: Path, call: Any, message: str) -> None:
    before = (store / "store.json").read_text()
    with pytest.raises(LabelStoreError, match=message):
        call(store)
    if call not in (_err_move, _err_missing_file, _err_bad_manifest):
        assert (store / "store.json").read_text() == before  # nothing written
