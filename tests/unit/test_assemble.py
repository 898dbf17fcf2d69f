"""The ``assemble`` stage: a volume plus its label store become the canonical layout."""

from __future__ import annotations

import json
import re
import runpy
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile

from mitoseg import labelstore
from mitoseg.config import BaseConfig, PatchifyConfig, SourceConfig, ValidateConfig
from mitoseg.data.assemble import (
    assemble_dataset,
    context_slices,
    copy_canonical,
    slice_runs,
    volume_identity,
)
from mitoseg.data.layout import read_split
from mitoseg.data.patches import make_patch_dataset
from mitoseg.data.validate import validate_dataset
from mitoseg.io import DataError, write_stack
from mitoseg.volume.store import open_volume
from volumes import write_ome_zarr

ROOT = Path(__file__).resolve().parents[2]
SHAPE = (12, 40, 48)
VOXEL = (50.0, 4.6, 4.6)
IGNORE = 254
CLASSES = {"background": 0, "mitochondria": 255}
BASE = BaseConfig(classes=CLASSES, ignore_value=IGNORE)
TRAIN, TEST = (3, 7), (10,)


#: ``main`` of the stage script (pipelines/ is no package)
stage_main = runpy.run_path(str(ROOT / "pipelines" / "assemble.py"))["main"]


def _volume() -> np.ndarray:
    """A (12, 40, 48) uint8 volume: noise plus a bright disc drifting with z."""
    rng = np.random.default_rng(0)
    vol = rng.integers(40, 120, SHAPE, dtype=np.uint8)
    yy, xx = np.mgrid[: SHAPE[1], : SHAPE[2]]
    for z in range(SHAPE[0]):
        vol[z][(yy - 20) ** 2 + (xx - 10 - 2 * z) ** 2 < 36] = 220
    return vol


def _mask(vol: np.ndarray, z: int, region: tuple[slice, slice] | None = None) -> np.ndarray:
    """The disc of slice ``z`` as 255 on 0, labelled only inside ``region`` (else all)."""
    full = np.where(vol[z] > 200, 255, 0).astype(np.uint8)
    if region is None:
        return full
    out = np.full(full.shape, IGNORE, np.uint8)
    out[region] = full[region]
    return out


def _store(path: Path, uri: str, vol: np.ndarray, train=TRAIN, test=TEST) -> Path:
    labelstore.init_store(path, uri, CLASSES, IGNORE)
    prov = labelstore.make_provenance("python", author="test")
    for z in train:
        region = (slice(0, 30), slice(0, 40)) if z == train[-1] else None
        labelstore.add_slice(path, z, _mask(vol, z, region), prov, split="train")
    for z in test:
        labelstore.add_slice(path, z, _mask(vol, z), prov, split="test")
    return path


@pytest.fixture(scope="module")
def vol() -> np.ndarray:
    return _volume()


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory, vol: np.ndarray) -> dict[str, str]:
    """The volume as OME-Zarr (one slice per chunk) and as a TIFF stack."""
    root = tmp_path_factory.mktemp("vols")
    tif = root / "vol.tif"
    write_stack(tif, vol, VOXEL)
    ome = write_ome_zarr(root / "vol.ome.zarr", vol, VOXEL, chunks=(1, 40, 48))
    return {"ome-zarr": ome, "tiff": str(tif)}


@pytest.mark.parametrize("kind", ["ome-zarr", "tiff"])
def test_assemble_writes_the_canonical_layout(
    tmp_path: Path, vol: np.ndarray, sources: dict[str, str], kind: str
) -> None:
    uri = sources[kind]
    store = _store(tmp_path / "labels", uri, vol)
    info = assemble_dataset(uri, store, tmp_path / "data", BASE, context=1)

    want = {"train": [2, 3, 4, 6, 7, 8], "test": [9, 10, 11]}
    for split, labelled in (("train", list(TRAIN)), ("test", list(TEST))):
        images, masks = read_split(tmp_path / "data", split)
        meta = info["splits"][split]
        assert meta["volume_slices"] == want[split]
        assert meta["labelled_slices"] == labelled
        np.testing.assert_array_equal(images, vol[want[split]])
        assert masks.dtype == np.uint8
        for row, z in enumerate(want[split]):
            expected = (
                labelstore.read_slice(store, z) if z in labelled else np.full(SHAPE[1:], IGNORE)
            )
            np.testing.assert_array_equal(masks[row], expected)
        assert meta["labelled_pixels"] == int((masks != IGNORE).sum())
    # the region-labelled slice 7 is unlabelled outside rows 0..29, columns 0..39
    seven = read_split(tmp_path / "data", "train")[1][4]
    assert (seven[30:] == IGNORE).all() and (seven[:, 40:] == IGNORE).all()
    assert (seven[:30, :40] != IGNORE).all()

    on_disk = json.loads((tmp_path / "data" / "dataset.json").read_text())
    assert on_disk == info
    assert info["voxel_size_nm"] == pytest.approx(list(VOXEL))
    assert (info["kind"], info["mask_kind"], info["ignore_value"], info["context"]) == (
        "volume", "labels", IGNORE, 1,
    )  # fmt: skip
    v = open_volume(uri)
    assert info["volume"]["fingerprint"] == labelstore.volume_fingerprint(v)
    assert info["volume"]["kind"] == kind and info["volume"]["listing"] == "size"
    assert info["labels"]["n_entries"] == 3

    # what the pipeline does next accepts it: the great-expectations checks and patchify
    report = validate_dataset(tmp_path / "data", BASE, ValidateConfig(min_height=32, min_width=32))
    assert report.success, report.failures
    meta = make_patch_dataset(
        tmp_path / "data", tmp_path / "patches", BASE,
        PatchifyConfig(patch_size=32, step=32, val_fraction=0.0, z_context=1), seed=0,
    )  # fmt: skip
    assert meta["labelled_slices"] == [1, 4]  # rows of slices 3 and 7 in the train stack


def test_only_the_needed_slices_are_read(tmp_path: Path, vol: np.ndarray) -> None:
    """One slice per chunk; the chunks of slices no labelled slice needs are garbage."""
    uri = write_ome_zarr(tmp_path / "v.ome.zarr", vol, VOXEL, chunks=(1, 40, 48))
    store = _store(tmp_path / "labels", uri, vol, train=(2,), test=(9,))
    chunks = sorted((Path(uri) / "s0" / "c").iterdir(), key=lambda p: int(p.name))
    assert [int(p.name) for p in chunks] == list(range(SHAPE[0]))
    for p in chunks:
        if int(p.name) not in (1, 2, 3, 8, 9, 10):
            (p / "0" / "0").write_bytes(b"not a chunk")
    info = assemble_dataset(uri, store, tmp_path / "data", BASE, context=1)
    assert info["splits"]["train"]["volume_slices"] == [1, 2, 3]
    np.testing.assert_array_equal(read_split(tmp_path / "data", "test")[0], vol[[8, 9, 10]])
    # a wider context needs slice 0, whose chunk is garbage: the error names URI and slices
    with pytest.raises(DataError, match=re.escape(f"{uri}: cannot read slices 0..4 (")):
        assemble_dataset(uri, store, tmp_path / "data2", BASE, context=2)
    assert not (tmp_path / "data2").exists()


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_assembly_is_byte_identical_when_nothing_changed(
    tmp_path: Path, vol: np.ndarray, sources: dict[str, str]
) -> None:
    """The DVC stage reruns on every repro; an unchanged output reruns nothing after it."""
    store = _store(tmp_path / "labels", sources["ome-zarr"], vol)
    digests = []
    for name in ("a", "b"):
        assemble_dataset(sources["ome-zarr"], store, tmp_path / name, BASE, context=1)
        digests.append(_files(tmp_path / name))
    assert digests[0] == digests[1]
    # one more labelled training pixel changes the train masks, not the test stacks
    prov = labelstore.make_provenance("python", author="test")
    extra = np.full(SHAPE[1:], IGNORE, np.uint8)
    extra[39, 47] = 0
    labelstore.add_slice(store, 7, extra, prov, split="train")  # outside its region
    assemble_dataset(sources["ome-zarr"], store, tmp_path / "c", BASE, context=1)
    after = _files(tmp_path / "c")
    changed = sorted(k for k in after if after[k] != digests[0][k])
    assert changed == ["dataset.json", "train/masks.tif"]


def test_assemble_from_s3(tmp_path: Path, vol: np.ndarray, sources: dict[str, str], s3_env) -> None:
    bucket = s3_env.make_bucket("assemble")
    client = s3_env.client()
    src = Path(sources["ome-zarr"])
    for f in src.rglob("*"):
        if f.is_file():
            client.upload_file(str(f), bucket, f"vol.ome.zarr/{f.relative_to(src)}")
    uri = f"s3://{bucket}/vol.ome.zarr"
    store = _store(tmp_path / "labels", uri, vol)
    info = assemble_dataset(uri, store, tmp_path / "data", BASE, context=1)
    local = assemble_dataset(src.as_posix(), store, tmp_path / "local", BASE, context=1)
    for split in ("train", "test"):
        assert info["splits"][split]["sha256"] == local["splits"][split]["sha256"]
    ident = info["volume"]
    assert (ident["listing"], ident["uri"]) == ("etag", uri)
    assert ident["objects"] == local["volume"]["objects"]
    assert ident["fingerprint"] == local["volume"]["fingerprint"]
    again = volume_identity(open_volume(uri))
    assert again["listing_sha256"] == ident["listing_sha256"]
    client.put_object(Bucket=bucket, Key="vol.ome.zarr/s0/c/0/0/0", Body=b"rewritten")
    assert volume_identity(open_volume(uri))["listing_sha256"] != ident["listing_sha256"]
    # an S3 location that holds no volume: the error names it
    gone = f"s3://{bucket}/gone.ome.zarr"
    with pytest.raises(DataError, match=re.escape(f"{gone}: not a Zarr store")):
        assemble_dataset(gone, store, tmp_path / "gone", BASE, context=1)
    assert not (tmp_path / "gone").exists()


def _shape_mismatch(tmp: Path, vol: np.ndarray, uri: str) -> tuple[str, Path]:
    other = tmp / "other.tif"
    write_stack(other, vol[:, :, :40], VOXEL)
    return str(other), _store(tmp / "labels", uri, vol)


def _missing_tif(tmp: Path, vol: np.ndarray, uri: str) -> tuple[str, Path]:
    store = _store(tmp / "labels", uri, vol)
    (store / "z00007.tif").unlink()
    return uri, store


def _no_test(tmp: Path, vol: np.ndarray, uri: str) -> tuple[str, Path]:
    return uri, _store(tmp / "labels", uri, vol, test=())


def _no_train(tmp: Path, vol: np.ndarray, uri: str) -> tuple[str, Path]:
    return uri, _store(tmp / "labels", uri, vol, train=())


def _unreadable(tmp: Path, vol: np.ndarray, uri: str) -> tuple[str, Path]:
    return str(tmp / "gone.ome.zarr"), _store(tmp / "labels", uri, vol)


def _not_a_volume(tmp: Path, vol: np.ndarray, uri: str) -> tuple[str, Path]:
    (tmp / "notes.txt").write_text("not a volume")
    return str(tmp / "notes.txt"), _store(tmp / "labels", uri, vol)


def _no_store(tmp: Path, vol: np.ndarray, uri: str) -> tuple[str, Path]:
    return uri, tmp / "labels"


def _corrupt_tif(tmp: Path, vol: np.ndarray, uri: str) -> tuple[str, Path]:
    store = _store(tmp / "labels", uri, vol)
    tifffile.imwrite(store / "z00010.tif", np.zeros((5, 5), np.uint8))
    return uri, store


STORE = r"labels/store\.json: "
OTHER = BaseConfig(classes={"background": 0, "mito": 255}, ignore_value=IGNORE)
NO_IGNORE = BaseConfig(classes=CLASSES, ignore_value=None)


@pytest.mark.parametrize(
    ("make", "base", "message"),
    [
        (_shape_mismatch, BASE,
         STORE + r"volume\.shape is \(12, 40, 48\) but \S*other\.tif has \(12, 40, 40\)"),
        (_missing_tif, BASE, r"labels/z00007\.tif: slice 7: file is listed in store\.json but"),
        (_corrupt_tif, BASE,
         r"labels/z00010\.tif: slice 10: mask is uint8 \(5, 5\), expected uint8 \(40, 48\)"),
        (_no_test, BASE, STORE + r"no slice is labelled for split 'test' \(labelled: \[3, 7\]\); "
         "label at least one test slice"),
        (_no_train, BASE, STORE + r"no slice is labelled for split 'train' \(labelled: \[10\]\)"),
        (_unreadable, BASE, r"gone\.ome\.zarr: not found"),
        (_not_a_volume, BASE, r"notes\.txt: not a Zarr store or TIFF stack"),
        (_no_store, BASE, STORE + r"no label store here"),
        (_missing_tif, OTHER, STORE + r"classes \{'background': 0, 'mitochondria': 255\} differ "
         r"from params base\.classes \{'background': 0, 'mito': 255\}"),
        (_missing_tif, NO_IGNORE, STORE + r"ignore_value 254 differs from params "
         r"base\.ignore_value None; set base\.ignore_value: 254"),
    ],
    ids=["shape", "missing-tif", "bad-tif", "no-test", "no-train", "unreadable-uri",
         "not-a-volume", "no-store", "classes", "ignore-value"],
)  # fmt: skip
def test_assemble_errors(
    tmp_path: Path, vol: np.ndarray, sources: dict[str, str], make: Any, base: BaseConfig,
    message: str,
) -> None:  # fmt: skip
    uri, store = make(tmp_path, vol, sources["tiff"])
    with pytest.raises(DataError, match=message):
        assemble_dataset(uri, store, tmp_path / "data", base, context=1)
    assert not (tmp_path / "data").exists()


def test_context_slices_and_runs() -> None:
    assert context_slices([3, 7], 12, 1) == [2, 3, 4, 6, 7, 8]
    assert context_slices([0, 11], 12, 2) == [0, 1, 2, 9, 10, 11]
    assert context_slices([4, 5], 12, 0) == [4, 5]
    assert slice_runs([2, 3, 4, 6, 7, 8, 11]) == [(2, 5), (6, 9), (11, 12)]
    with pytest.raises(ValueError, match=r"^slices \[12\] are outside the volume's 0\.\.11$"):
        context_slices([3, 12], 12, 1)
    with pytest.raises(ValueError, match=r"^context must be >= 0, got -1$"):
        context_slices([3], 12, -1)


def test_copy_canonical_is_byte_identical(tmp_path: Path, vol: np.ndarray) -> None:
    raw = tmp_path / "raw"
    for split in ("train", "test"):
        write_stack(raw / split / "images.tif", vol[:4])
        write_stack(raw / split / "masks.tif", _mask(vol, 0)[None].repeat(4, 0))
    (raw / "dataset.json").write_text('{"source": "x", "voxel_size_nm": [50, 4.6, 4.6]}')
    info = copy_canonical(raw, tmp_path / "out")
    assert info["source"] == "x"
    files = sorted(p.relative_to(raw) for p in raw.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*")
                           if p.is_file())  # fmt: skip
    for f in files:
        assert (raw / f).read_bytes() == (tmp_path / "out" / f).read_bytes()
    with pytest.raises(DataError, match=r"nope/dataset\.json: canonical raw data not found"):
        copy_canonical(tmp_path / "nope", tmp_path / "out2")


def _params(path: Path, volume: str | None, **source: Any) -> Path:
    import yaml

    path.write_text(
        yaml.safe_dump(
            {
                "base": {"classes": CLASSES, "ignore_value": IGNORE},
                "source": {"volume": volume, **source},
                "patchify": {"z_context": 1},
                "evaluate": {"z_average": "auto"},
            }
        )
    )
    return path


def test_stage_script(
    tmp_path: Path, vol: np.ndarray, sources: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    uri = sources["ome-zarr"]
    store = _store(tmp_path / "labels", uri, vol)
    params = _params(tmp_path / "p.yaml", uri)
    argv = ["--raw", str(tmp_path / "raw"), "--labels", str(store), "--params", str(params)]
    assert stage_main([*argv, "--out", str(tmp_path / "data")]) == 0
    out = capsys.readouterr().out
    assert "(train: 2 labelled of 9 slices, test: 1 labelled of 4 slices, context 2)" in out
    info = json.loads((tmp_path / "data" / "dataset.json").read_text())
    assert info["splits"]["test"]["volume_slices"] == [8, 9, 10, 11]  # cut at the end: 4
    assert info["context"] == 2
    # volume null: data/raw as it is; missing, the error names it
    _params(params, None)
    assert stage_main([*argv, "--out", str(tmp_path / "copy")]) == 1
    assert re.search(r"^error: \S*raw/dataset\.json: canonical raw data not found",
                     capsys.readouterr().err)  # fmt: skip
    shutil.copytree(tmp_path / "data", tmp_path / "raw")
    assert stage_main([*argv, "--out", str(tmp_path / "copy")]) == 0
    assert f"source: canonical {tmp_path / 'raw'} -> {tmp_path / 'copy'}" in capsys.readouterr().out
    # volume: store, the volume store.json names
    _params(params, "store")
    assert stage_main([*argv, "--out", str(tmp_path / "own")]) == 0
    assert f"source: {uri} + {store}" in capsys.readouterr().out
    assert _files(tmp_path / "own") == _files(tmp_path / "data")
    _params(params, uri, context=-1)
    assert stage_main([*argv, "--out", str(tmp_path / "x")]) == 1
    assert "source.context: Value error, context must be 0..16 or 'auto', got -1" in (
        capsys.readouterr().err
    )


def test_source_config_context() -> None:
    assert SourceConfig().resolve_context(0, "auto") == 1
    assert SourceConfig().resolve_context(2, 0) == 2
    assert SourceConfig().resolve_context(1, 3) == 4
    assert SourceConfig(context=5).resolve_context(1, 3) == 5
