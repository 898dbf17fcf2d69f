"""Blockwise volume prediction on a real in-process Dask cluster with a known predictor.

The "model" is a 5x5 box blur of the mean input channel (so tiles, halos and blending
matter and a 2.5D plan's context slices change the answer); the reference is
whole-stack :func:`mitoseg.inference.predict.segment_stack` with the same plan. Inputs are
OME-Zarr (NGFF 0.4 and 0.5), plain Zarr and TIFF with small odd chunks, so every block
and chunk border is crossed.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from distributed import Client, LocalCluster

from mitoseg.inference.objects import instance_labels, measure_objects
from mitoseg.inference.plan import InferencePlan
from mitoseg.inference.predict import segment_stack
from mitoseg.io import DataError
from mitoseg.volume import ngff
from mitoseg.volume.job import BLOCK_PARTS, run_volume_job
from mitoseg.volume.spec import auto_block_z
from mitoseg.volume.stitch import kept_regions, plane_pairs, stitch_global
from mitoseg.volume.store import is_volume_uri, open_volume
from volumes import write_ome_zarr

VOXEL = (50.0, 4.0, 4.0)


def blur(batch: np.ndarray) -> np.ndarray:
    """``(B, H, W, C_in)`` -> ``(B, H, W, 1)``: 5x5 box mean of the channel mean."""
    from scipy import ndimage

    x = batch.mean(axis=-1, keepdims=True)
    return ndimage.uniform_filter(x, size=(1, 5, 5, 1), mode="nearest").astype(np.float32)


def _plan(**fields) -> InferencePlan:
    return InferencePlan.default_for(
        1, 1, **{"tile_size": 32, "halo": 6, "batch_size": 3, "threshold": 0.45, **fields}
    )


def _volume(z: int = 11, h: int = 45, w: int = 52, seed: int = 0) -> np.ndarray:
    """Blobs (some spanning slices and block faces) on noise, uint8."""
    rng = np.random.default_rng(seed)
    vol = rng.integers(0, 60, (z, h, w)).astype(np.uint8)
    zz, yy, xx = np.mgrid[:z, :h, :w]
    for _ in range(9):
        cz, cy, cx = rng.uniform(0, z), rng.uniform(0, h), rng.uniform(0, w)
        r = rng.uniform(3, 8)
        vol[((zz - cz) * 3) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 220
    vol[0] = 0  # a blank slice: background without a forward pass
    return vol


def _ome(path: Path, data: np.ndarray, version: str, chunks=(3, 7, 11)) -> str:
    return write_ome_zarr(path, data, VOXEL, chunks, version)


@pytest.fixture(scope="module")
def client():
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        Client(cluster) as c,
    ):
        yield c


def test_is_volume_uri(tmp_path: Path) -> None:
    assert is_volume_uri("s3://bucket/x") and is_volume_uri(str(tmp_path / "a.zarr"))
    assert not is_volume_uri(str(tmp_path / "a.tif"))
    plain = tmp_path / "plain"
    zarr.create_array(str(plain), shape=(2, 2), dtype="uint8")
    assert is_volume_uri(str(plain))


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_job_matches_whole_stack_predict(
    client: Client, tmp_path: Path, version: str
) -> None:
    data = _volume()
    plan = _plan()
    src = _ome(tmp_path / "in.ome.zarr", data, version)
    out = str(tmp_path / "out.ome.zarr")
    summary = run_volume_job(src, out, blur, plan, client=client, block_z=4, ngff_version=version)
    expected = segment_stack(blur, data, plan)
    root = zarr.open_group(out, mode="r")
    mask = root["labels/mask/0"][:]
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(root["0"][:], data)
    labels = root["labels/instances/0"][:]
    ref, n = instance_labels(expected)
    np.testing.assert_array_equal(labels, ref)  # stitched across block faces, scan order
    assert summary["objects"] == n > 3 and summary["blocks"] == 3 and summary["skipped"] == 0
    assert list(summary["model_loads"].values()) == [1, 1]  # once per worker, not per block
    parts = summary["block_parts_seconds"]
    assert list(parts) == list(BLOCK_PARTS) and all(v >= 0 for v in parts.values())
    assert sum(parts.values()) <= summary["block_seconds"]["mean"] * 3 + 1e-3
    # pyramid (y, x halved while >= 64 px: none here beyond level 0 for 45 x 52)
    assert "1" not in root
    info = dict(root.attrs)["mitoseg"]
    assert info["status"] == "complete" and info["objects"] == n
    assert ngff.LOCAL_ARRAY not in root
    with open(f"{out}/objects.csv") as fh:
        rows = list(csv.DictReader(fh))
    want = measure_objects(ref, data, VOXEL)
    assert [int(r["voxels"]) for r in rows] == [r["voxels"] for r in want]
    assert float(rows[0]["volume_nm3"]) == pytest.approx(want[0]["volume_nm3"])
    assert [int(r["slices"]) for r in rows] == [r["slices"] for r in want]
    # the output is an OME-Zarr image with labels that ome-zarr's reader understands
    back = open_volume(out)
    assert back.voxel_size_nm == pytest.approx(VOXEL) and back.ngff_version == version
    assert open_volume(f"{out}/labels/instances").dtype == np.uint32
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    nodes = list(Reader(parse_url(out))())
    assert nodes and nodes[0].metadata["axes"][0]["name"] == "z"
    assert any("labels" in str(n.zarr) for n in nodes)


def test_scale_without_unit_comes_out_unchanged(
    client: Client, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An input scale without a unit (NGFF allows it) is carried to every image of the
    output as it is (it used to come out as 1, 1, 1), and the missing unit is reported."""
    import logging

    from mitoseg.volume.ngff_meta import PhysicalScale, read_multiscale

    data = _volume(z=4, seed=3)
    src = write_ome_zarr(tmp_path / "in.zarr", data, VOXEL, (2, 45, 52), "0.4", unit=None)
    out = str(tmp_path / "out.ome.zarr")
    with caplog.at_level(logging.WARNING, logger="mitoseg.volume"):
        summary = run_volume_job(src, out, blur, _plan(), client=client, block_z=2)
    assert f"{src}: axes z, y, x have a scale but no unit" in caplog.text
    assert summary["voxel_size_nm"] is None
    want = PhysicalScale(scale=VOXEL, units=(None, None, None))
    root = zarr.open_group(out, mode="r")
    for path in ("", "labels/mask", "labels/instances"):
        ms = read_multiscale(root[path] if path else root, path)
        assert ms is not None and ms.physical() == want
        assert all("unit" not in a for a in ms.axes)
    assert dict(root.attrs)["mitoseg"]["scale"] == want.model_dump(mode="json")


@pytest.mark.parametrize(
    "fields", [{"z_context": 1}, {"z_average": 1}, {"z_context": 1, "z_average": 2}]
)
def test_z_halo_plans_read_context_across_blocks(
    client: Client, tmp_path: Path, fields: dict
) -> None:
    """2.5D context and z-averaging cross block faces: blocks read plan.z_halo more."""
    data = _volume(z=9, seed=2)
    plan = _plan(**fields)
    store = tmp_path / "plain.zarr"
    arr = zarr.create_array(str(store), shape=data.shape, chunks=(2, 13, 9), dtype="uint8")
    arr[:] = data
    out = str(tmp_path / "out.zarr")
    run_volume_job(str(store), out, blur, plan, client=client, block_z=2, voxel_size_nm=VOXEL)
    mask = zarr.open_group(out, mode="r")["labels/mask/0"][:]
    expected = segment_stack(blur, data, plan)
    np.testing.assert_array_equal(mask, expected)
    assert not np.array_equal(expected, segment_stack(blur, data, _plan()))  # z matters


@pytest.mark.parametrize(
    ("fields", "block_yx"),
    [({}, 16), ({}, 7), ({"z_context": 1, "z_average": 1}, 20), ({"tta": True}, 24),
     ({"tile_size": 64}, 16), ({"seed_threshold": 0.6}, 16),
     ({"seed_threshold": 0.55, "z_average": 1}, 13)],
    ids=["yx16", "yx7-odd", "z-halo", "tta", "one-tile", "hysteresis", "hysteresis-z-odd"],
)  # fmt: skip
def test_yx_blocks_equal_whole_slice_predict(
    client: Client, tmp_path: Path, fields: dict, block_yx: int
) -> None:
    """YX tiles of slices (16 / 7 / 20 / 24 / 13 px on 45 x 52 slices, 32-px network tiles):
    the global tile grid and whole-slice percentiles give identical arrays; instances
    stitch across z, y and x faces (26-connected, edges and corners included)."""
    z = 3 if block_yx < 10 else 7  # small blocks: one z-block (z faces: the other cases)
    data = _volume(z=z, seed=6)
    plan = _plan(**fields)
    src = _ome(tmp_path / "in.ome.zarr", data, "0.5")
    out = str(tmp_path / "out.ome.zarr")
    summary = run_volume_job(src, out, blur, plan, client=client, block_z=3, block_yx=block_yx)
    grid = (-(-z // 3), -(-45 // block_yx), -(-52 // block_yx))
    assert summary["blocks"] == grid[0] * grid[1] * grid[2]
    root = zarr.open_group(out, mode="r")
    expected = segment_stack(blur, data, plan)
    np.testing.assert_array_equal(root["labels/mask/0"][:], expected)
    np.testing.assert_array_equal(root["0"][:], data)
    ref, n = instance_labels(expected)
    np.testing.assert_array_equal(root["labels/instances/0"][:], ref)
    assert summary["objects"] == n > 3
    with open(f"{out}/objects.csv") as fh:
        rows = list(csv.DictReader(fh))
    want = measure_objects(ref, data, VOXEL)
    for key in ("voxels", "slices", "bbox_y0", "bbox_x1"):
        assert [int(r[key]) for r in rows] == [w[key] for w in want], key
    for key in ("centroid_y", "centroid_x", "elongation"):
        assert [float(r[key]) for r in rows] == pytest.approx([w[key] for w in want]), key


def test_yx_pyramid_levels_follow_the_block_side(client: Client, tmp_path: Path) -> None:
    """A 135 x 156 volume has two pyramid levels; 66-px YX blocks (66 = 2 x 33) keep
    both, 33-px blocks keep level 0 only, and chunks never straddle two blocks."""
    data = np.tile(_volume(z=2, seed=4), (1, 3, 3))
    src = _ome(tmp_path / "in.ome.zarr", data, "0.5")
    plan = _plan()
    for side, levels in ((66, 2), (33, 1)):
        out = str(tmp_path / f"out{side}.ome.zarr")
        run_volume_job(src, out, blur, plan, client=client, block_z=2, block_yx=side)
        root = zarr.open_group(out, mode="r")
        assert ("1" in root) == (levels == 2)
        assert root["labels/mask/0"].chunks == (2, side, side)
        np.testing.assert_array_equal(root["labels/mask/0"][:], segment_stack(blur, data, plan))
        if levels == 2:
            assert root["1"].chunks == (2, 33, 33)
            np.testing.assert_array_equal(
                root["labels/mask/1"][:], root["labels/mask/0"][:][:, ::2, ::2]
            )


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16"])
def test_slice_percentiles_from_histogram_equal_numpy(dtype: str) -> None:
    from mitoseg.inference.normalize import robust_range
    from mitoseg.volume.tiles import percentiles_from_counts

    rng = np.random.default_rng(3)
    info = np.iinfo(dtype)
    for n in (1, 2, 3, 199, 200, 201, 4099):
        x = rng.integers(info.min, int(info.max) + 1, n).astype(dtype)
        if n == 4099:
            x[:4000] = x[0]  # mostly one value
        for pcts in ((0.5, 99.5), (0.0, 100.0), (1.0, 99.0)):
            _, lo, hi = robust_range(x, *pcts)
            counts = np.bincount(x.astype(np.int64) - int(info.min))
            assert percentiles_from_counts(counts, int(info.min), pcts) == (lo, hi), (n, pcts)


def test_tiff_input_probabilities_and_pyramid(client: Client, tmp_path: Path) -> None:
    data = np.tile(_volume(z=5, seed=4), (1, 3, 3))  # 135 x 156: two pyramid levels
    tif = tmp_path / "in.tif"
    tifffile.imwrite(tif, data, tile=(32, 48), compression="zlib")
    out = str(tmp_path / "out.ome.zarr")
    plan = _plan()
    run_volume_job(
        str(tif), out, blur, plan, client=client, block_z=3, probabilities=True,
        voxel_size_nm=(40.0, 5.0, 5.0),
    )  # fmt: skip
    root = zarr.open_group(out, mode="r")
    np.testing.assert_array_equal(root["labels/mask/0"][:], segment_stack(blur, data, plan))
    assert root["1"].shape == (5, 68, 78) and "2" not in root
    # image pyramid: 2 x 2 means rounded half to even, the odd last row repeated
    padded = np.pad(data, [(0, 0), (0, 1), (0, 0)], mode="edge").astype(np.float64)
    means = (padded[:, 0::2, 0::2] + padded[:, 1::2, 0::2] + padded[:, 0::2, 1::2]
             + padded[:, 1::2, 1::2]) / 4  # fmt: skip
    np.testing.assert_array_equal(root["1"][:], np.rint(means).astype(data.dtype))
    np.testing.assert_array_equal(
        root["labels/instances/1"][:], root["labels/instances/0"][:][:, ::2, ::2]
    )
    probs = root["probabilities/0"][:]
    assert probs.shape == (1, *data.shape) and probs.dtype == np.uint8
    ms = dict(root.attrs)["ome"]["multiscales"][0]
    assert ms["datasets"][1]["coordinateTransformations"][0]["scale"] == [40.0, 10.0, 10.0]


def test_resume_skips_recorded_blocks_and_force_replaces(client: Client, tmp_path: Path) -> None:
    data = _volume(seed=5)
    plan = _plan()
    src = _ome(tmp_path / "in.ome.zarr", data, "0.5")
    out = str(tmp_path / "out.ome.zarr")
    run_volume_job(src, out, blur, plan, client=client, block_z=4)
    reference = zarr.open_group(out, mode="r")["labels/instances/0"][:]
    # an interrupted job: status running, block 1 unrecorded and its mask chunk garbage
    root = zarr.open_group(out, mode="r+")
    root.attrs.update({"mitoseg": {**dict(root.attrs)["mitoseg"], "status": "running"}})
    root[ngff.DONE_ARRAY][1] = 0
    root["labels/mask/0"][4:8] = 7
    root.create_array(ngff.LOCAL_ARRAY, shape=data.shape, chunks=(4, 45, 52), dtype="uint32")
    for b in range(3):  # local labels are redone only for block 1: put back the others
        local, _ = instance_labels(segment_stack(blur, data[4 * b : 4 * b + 4], plan))
        if b != 1:
            root[ngff.LOCAL_ARRAY][4 * b : 4 * b + 4] = local
    summary = run_volume_job(src, out, blur, plan, client=client, block_z=4)
    assert summary["skipped"] == 2
    root = zarr.open_group(out, mode="r")
    np.testing.assert_array_equal(root["labels/mask/0"][:], segment_stack(blur, data, plan))
    np.testing.assert_array_equal(root["labels/instances/0"][:], reference)
    with pytest.raises(FileExistsError, match="exists \\(a completed job\\); use --force"):
        run_volume_job(src, out, blur, plan, client=client, block_z=4)
    with pytest.raises(FileExistsError, match="written by another job"):
        run_volume_job(src, out, blur, plan, client=client, block_z=5)
    summary = run_volume_job(src, out, blur, plan, client=client, block_z=5, force=True)
    assert summary["blocks"] == 3 and summary["skipped"] == 0


@pytest.mark.parametrize(
    ("fields", "shape", "block_yx", "expected"),
    [
        ({}, (100, 2048, 2048), None, 8),  # no z-averaging: the smallest block
        ({"z_context": 2}, (100, 2048, 2048), None, 8),  # context slices are only read
        ({"z_average": 1}, (100, 2048, 2048), None, 20),  # halo 2 of 20 predictions
        ({"z_average": 2}, (100, 1024, 1024), None, 40),
        ({"z_average": 2}, (100, 4096, 4096), None, 8),  # 2**27 voxels: 8 slices at most
        ({"z_average": 2}, (100, 4096, 4096), 1024, 40),  # YX tiles: the tile's voxels
        ({"z_average": 1}, (12, 512, 512), None, 12),  # never deeper than the volume
        ({"z_average": 1}, (1, 512, 512), None, 1),
    ],
)
def test_auto_block_z(fields: dict, shape, block_yx, expected: int) -> None:
    assert auto_block_z(_plan(**fields), shape, block_yx) == expected


def test_block_z_defaults_to_the_plan_s_choice(client: Client, tmp_path: Path) -> None:
    data = _volume(z=9, seed=3)
    src = _ome(tmp_path / "in.ome.zarr", data, "0.5")
    plan = _plan(z_average=1)
    summary = run_volume_job(src, str(tmp_path / "o.zarr"), blur, plan, client=client)
    assert summary["block_z"] == auto_block_z(plan, data.shape, None) == 9
    assert summary["blocks"] == 1
    mask = zarr.open_group(str(tmp_path / "o.zarr"), mode="r")["labels/mask/0"]
    assert mask.chunks[0] == 9
    np.testing.assert_array_equal(mask[:], segment_stack(blur, data, plan))


def test_plane_pairs_and_stitch_global_by_hand() -> None:
    last = np.array([[1, 0, 0], [0, 0, 0], [0, 0, 2]])
    first = np.array([[0, 3, 0], [0, 0, 0], [0, 0, 0]])
    assert plane_pairs(last, np.pad(first, 1)).tolist() == [[1, 3]]  # diagonals touch
    # global ids 1, 2 (block 0), 3 touching 2 (block 1), 4 alone (block 2), in scan order
    mapping, n = stitch_global(4, np.array([[2, 3]]), np.arange(5))
    assert n == 3 and mapping.tolist() == [0, 1, 2, 2, 3]
    # final ids follow the first voxel of each merged set, not the global ids
    mapping, n = stitch_global(3, np.array([[1, 3]]), np.array([0, 50, 10, 70]))
    assert n == 2 and mapping.tolist() == [0, 2, 1, 2]
    mapping, n = stitch_global(0, np.zeros((0, 2), np.int64), np.zeros(1, np.int64))
    assert n == 0 and mapping.tolist() == [0]


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[str, str]]:
    (tmp_path / "notastore").mkdir()
    (tmp_path / "file.txt").write_text("x")
    flat = tmp_path / "flat.zarr"
    zarr.create_array(str(flat), shape=(8, 9), dtype="uint8")
    group = zarr.open_group(str(tmp_path / "group.zarr"), mode="w")
    group.create_array("raw", shape=(2, 8, 9), dtype="uint8")
    broken = tmp_path / "broken.ome.zarr"
    _ome(broken, _volume(z=4, seed=1), "0.5", chunks=(2, 45, 52))
    for chunk in (broken / "s0" / "c").rglob("*"):
        if chunk.is_file():
            chunk.write_bytes(b"not a chunk")
    missing = tmp_path / "missing.ome.zarr"
    _ome(missing, _volume(z=4, seed=1), "0.4")
    import shutil

    shutil.rmtree(missing / "s0")
    return {
        "not a store": (str(tmp_path / "notastore"), "not a Zarr store"),
        "absent": (str(tmp_path / "absent.zarr"), "absent.zarr: not found"),
        "a file": (str(tmp_path / "file.txt"), "not a Zarr store or TIFF stack"),
        "2D": (str(flat), "expected a 3D \\(Z, Y, X\\) volume, got a 2D array"),
        "no multiscales": (str(tmp_path / "group.zarr"), "without OME-Zarr multiscales"),
        "missing dataset": (str(missing), "dataset 's0' is missing"),
        "unreadable chunk": (str(broken), r"cannot read slices \d\.\.\d \(.*decompression"),
    }


@pytest.mark.parametrize(
    "case",
    ["not a store", "absent", "a file", "2D", "no multiscales", "missing dataset",
     "unreadable chunk"],
)  # fmt: skip
def test_bad_inputs_are_named_and_leave_no_output(
    client: Client, tmp_path: Path, case: str
) -> None:
    uri, message = _bad_inputs(tmp_path)[case]
    out = tmp_path / "out.ome.zarr"
    with pytest.raises(DataError, match=message) as exc:
        run_volume_job(uri, str(out), blur, _plan(), client=client, block_z=2)
    assert Path(uri.rstrip("/")).name in str(exc.value)
    if case != "unreadable chunk":  # found before anything is written
        assert not out.exists()
    else:  # a failed block leaves a running (resumable) job, never a complete one
        assert dict(zarr.open_group(str(out), mode="r").attrs)["mitoseg"]["status"] == "running"


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        ({"block_z": 0}, ValueError, r"^block_z must be None or >= 1, got 0$"),
        ({"block_z": True}, ValueError, r"^block_z must be None or >= 1, got True$"),
        ({"block_yx": 0}, ValueError, "block_yx must be None or >= 1, got 0"),
        ({"ngff_version": "0.3"}, ValueError, "ngff_version must be one of"),
        ({"voxel_size_nm": (1, 2)}, ValueError, "expected 3 positive numbers"),
    ],
)
def test_argument_errors(client: Client, tmp_path: Path, kwargs, exc, message: str) -> None:
    src = _ome(tmp_path / "in.ome.zarr", _volume(z=3), "0.5")
    plan = _plan(**kwargs.pop("plan", {}))
    with pytest.raises(exc, match=message):
        run_volume_job(src, str(tmp_path / "o.zarr"), blur, plan, client=client, **kwargs)
    assert not (tmp_path / "o.zarr").exists()
    with pytest.raises(ValueError, match="the output must differ from the input"):
        run_volume_job(src, src, blur, _plan(), client=client)


def test_existing_non_output_needs_force(client: Client, tmp_path: Path) -> None:
    src = _ome(tmp_path / "in.ome.zarr", _volume(z=3), "0.5")
    other = tmp_path / "other.zarr"
    zarr.open_group(str(other), mode="w").attrs["x"] = 1
    with pytest.raises(FileExistsError, match=r"other\.zarr: exists and is not a mitoseg"):
        run_volume_job(src, str(other), blur, _plan(), client=client)
    run_volume_job(src, str(other), blur, _plan(), client=client, force=True)
    assert dict(zarr.open_group(str(other), mode="r").attrs)["mitoseg"]["status"] == "complete"


_KILL_SCRIPT = """
import os, sys, time
import numpy as np
from distributed import Client, LocalCluster
from mitoseg.inference.plan import InferencePlan
from mitoseg.volume.job import run_volume_job


def slow_blur(batch):
    from scipy import ndimage

    time.sleep(float(os.environ.get("SLOW_BLUR_S", "0")))  # slow only the run to kill
    x = batch.mean(axis=-1, keepdims=True)
    return ndimage.uniform_filter(x, size=(1, 5, 5, 1), mode="nearest").astype(np.float32)


def plan_and_blocks(hysteresis):
    # the plan and block shape: whole slices, or 16-px YX blocks of a hysteresis plan
    seed = {"seed_threshold": 0.6} if hysteresis else {}
    plan = InferencePlan.default_for(1, 1, tile_size=32, halo=6, batch_size=3,
                                     threshold=0.45, **seed)
    return plan, ({"block_z": 2, "block_yx": 16} if hysteresis else {"block_z": 1})


if __name__ == "__main__":
    plan, blocks = plan_and_blocks(sys.argv[3] == "hysteresis")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        s = run_volume_job(sys.argv[1], sys.argv[2], slow_blur, plan, client=client, **blocks)
    print("skipped", s["skipped"], "regions_skipped", s["regions_skipped"])
"""


@pytest.mark.parametrize(
    ("mode", "record", "z", "blocks"),
    [("slices", ngff.DONE_ARRAY, 12, 12), ("hysteresis", ngff.REGIONS_DONE_ARRAY, 4, 24)],
)
def test_sigkill_mid_job_then_restart_matches_uninterrupted(
    tmp_path: Path, mode: str, record: str, z: int, blocks: int
) -> None:
    """A job process killed with SIGKILL once 2 blocks are recorded (whole-slice blocks;
    or the regions of YX blocks with hysteresis, in their first pass); the restarted
    process skips them and the output equals an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "job.py"
    script.write_text(_KILL_SCRIPT)
    data = _volume(z=z, seed=6)
    src = _ome(tmp_path / "in.ome.zarr", data, "0.5")
    out = tmp_path / "out.ome.zarr"
    cmd = [sys.executable, str(script), src, str(out), mode]
    env = {**os.environ, "SLOW_BLUR_S": "0.15"}
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 120

    def recorded() -> int:
        try:
            return int((zarr.open_group(str(out), mode="r")[record][:][:, 0] > 0).sum())
        except Exception:
            return 0

    while recorded() < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    done = recorded()
    assert 2 <= done < blocks, f"killed too late: {done} of {blocks} blocks recorded"
    assert dict(zarr.open_group(str(out), mode="r").attrs)["mitoseg"]["status"] == "running"
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    skipped = (0, done) if mode == "hysteresis" else (done, 0)
    assert f"skipped {skipped[0]} regions_skipped {skipped[1]}" in resumed.stdout
    sys.path.insert(0, str(tmp_path))
    try:
        from job import plan_and_blocks, slow_blur  # the same predictor, in this process
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("job", None)
    fresh = tmp_path / "fresh.ome.zarr"
    plan, kwargs = plan_and_blocks(mode == "hysteresis")
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        Client(cluster) as c,
    ):
        run_volume_job(src, str(fresh), slow_blur, plan, client=c, **kwargs)
    a, b = zarr.open_group(str(out), mode="r"), zarr.open_group(str(fresh), mode="r")
    for name in ("0", "labels/mask/0", "labels/instances/0"):
        np.testing.assert_array_equal(a[name][:], b[name][:])
    np.testing.assert_array_equal(b["labels/mask/0"][:], segment_stack(blur, data, plan))
    assert (out / "objects.csv").read_text() == (fresh / "objects.csv").read_text()
    assert dict(a.attrs)["mitoseg"]["status"] == "complete"


def _bar_volume() -> np.ndarray:
    """A faint bar across a 45 x 52 slice (through many 12-px tiles) that reaches the seed
    in one place only, and a faint square that never does."""
    data = np.zeros((3, 45, 52), np.uint8)
    data[:, 2, 0] = 255  # the same intensity range in every slice
    data[:, 20:25, 2:50] = 150  # above the threshold, below the seed ...
    data[:, 20:25, 40:46] = 250  # ... except here
    data[:, 33:41, 5:13] = 150  # never seeded: dropped
    return data


def test_hysteresis_on_yx_blocks_keeps_regions_seeded_in_another_tile(
    client: Client, tmp_path: Path
) -> None:
    """Regions crossing YX blocks are kept or dropped whole: the bar crosses 10 of the
    12-px blocks of a slice and reaches the seed in two of them, yet all of it is kept, as
    on the whole slice."""
    data = _bar_volume()
    plan = _plan(seed_threshold=0.8)
    src = _ome(tmp_path / "in.ome.zarr", data, "0.5")
    out = str(tmp_path / "out.ome.zarr")
    summary = run_volume_job(src, out, blur, plan, client=client, block_z=2, block_yx=12)
    expected = segment_stack(blur, data, plan)
    root = zarr.open_group(out, mode="r")
    np.testing.assert_array_equal(root["labels/mask/0"][:], expected)
    assert expected[:, 22, 3:49].all() and not expected[:, 33:41, 5:13].any()
    assert segment_stack(blur, data, _plan())[:, 33:41, 5:13].any()  # threshold alone keeps it
    assert summary["objects"] == 1 and summary["regions_skipped"] == 0
    assert {"regions", "seams"} <= set(summary["phase_seconds"])
    for name in (ngff.LOCAL_ARRAY, ngff.REGIONS_ARRAY, ngff.REGIONS_DONE_ARRAY):
        assert name not in root


def test_kept_regions_by_hand() -> None:
    pairs = np.array([[1, 2], [2, 4], [5, 6]], np.int64)
    seeded = np.array([False, False, False, False, True, False, False])
    keep = kept_regions(6, pairs, seeded)  # 1-2-4 seeded through 4; 3 alone; 5-6 unseeded
    assert keep.tolist() == [False, True, True, False, True, False, False]
    assert kept_regions(2, np.zeros((0, 2), np.int64), np.array([0, 1, 0], bool)).tolist() == [
        False, True, False,
    ]  # fmt: skip


def test_int8_plans_reach_the_workers_with_their_calibration(
    client: Client, tmp_path: Path
) -> None:
    # the plan's JSON does not hold its calibration images: the job ships them, so each
    # worker compiles the int8 engine the plan was decided with (the champion's plan)
    import keras

    from mitoseg.data.patches import to_uint8

    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    inputs = keras.Input((None, None, 1))
    conv = keras.layers.Conv2D(1, 5, padding="same", activation="sigmoid", use_bias=False,
                               kernel_initializer=keras.initializers.Constant(0.2))  # fmt: skip
    net = keras.Model(inputs, conv(inputs))
    data = _volume(z=4)
    calibration = np.stack([to_uint8(s) for s in data[:2]])
    plan = _plan(threshold=0.7).with_overrides(runtime="openvino", precision="int8")
    plan = plan.with_calibration(calibration)
    out = str(tmp_path / "out.ome.zarr")
    run_volume_job(str(_ome(tmp_path / "in.ome.zarr", data, "0.5")), out, net, plan,
                   client=client, block_z=2)  # fmt: skip
    mask = zarr.open_group(out, mode="r")["labels/mask/0"][:]
    np.testing.assert_array_equal(mask, segment_stack(net, data, plan))
    assert 0 < mask.mean() < 1
