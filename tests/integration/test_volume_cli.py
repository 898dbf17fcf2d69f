"""``mitoseg predict`` on volumes: a real EM crop in OME-Zarr with small odd chunks, on an
embedded LocalCluster, on a ``dask scheduler`` + ``dask worker`` started as processes,
from and to a real loopback S3 server, and killed with SIGKILL then resumed.

The model is a small Keras CNN built here (two 3x3 convolutions, fixed weights): its
receptive field crosses tile and block borders. The reference is ``mitoseg predict`` on
the same crop as a TIFF stack.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import zarr
from typer.testing import CliRunner

from mitoseg.cli import app
from mitoseg.inference.plan import InferencePlan
from mitoseg.io import write_stack
from mitoseg.volume.cluster import DROPPED_WORKER_ENV, EXTERNAL_WORKER_ENV, local_cluster
from servers import free_port
from volumes import write_ome_zarr

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "vnc" / "vnc_stack1_raw.tif"
VOXEL = (50.0, 4.6, 4.6)
runner = CliRunner()


@pytest.fixture(scope="module")
def crop() -> np.ndarray:
    if not DATA.is_file():
        pytest.skip(f"real EM data not found at {DATA} (shared/data is not in this checkout)")
    with tifffile.TiffFile(DATA) as tif:
        return np.stack([tif.pages[z].asarray()[300:470, 200:391] for z in range(7)])


def _model(root: Path, crop: np.ndarray, width: int = 6, size: int = 3) -> Path:
    """Fixed-seed CNN; the plan's threshold is the 75th percentile of its output on the
    crop, so about a quarter of it is foreground, in blobs."""
    import keras

    from mitoseg.inference.normalize import normalize_slice

    keras.utils.set_random_seed(7)
    inp = keras.Input((None, None, 1))
    x = keras.layers.Conv2D(width, size, padding="same", activation="relu")(inp)
    x = keras.layers.Conv2D(width, size, padding="same", activation="relu")(x)
    out = keras.layers.Conv2D(1, 1, activation="sigmoid")(x)
    net = keras.Model(inp, out)
    path = root / "cnn.keras"
    net.save(path)
    probs = net.predict_on_batch(normalize_slice(crop[:2])[..., None])
    threshold = round(float(np.quantile(probs, 0.75)), 4)
    InferencePlan.default_for(
        1, 1, tile_size=64, halo=8, threshold=threshold, source="evaluate"
    ).write(root / "cnn.inference_plan.json")
    return path


@pytest.fixture(scope="module")
def model(crop: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _model(tmp_path_factory.mktemp("model"), crop)


def _ome(path: Path, data: np.ndarray, chunks=(3, 37, 41)) -> str:
    return write_ome_zarr(path, data, VOXEL, chunks)


@pytest.fixture(scope="module")
def reference(crop: np.ndarray, model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The TIFF path: whole-stack ``mitoseg predict --instances``."""
    root = tmp_path_factory.mktemp("reference")
    write_stack(root / "crop.tif", crop, VOXEL)
    out = root / "out"
    result = runner.invoke(
        app, ["--no-progress", "predict", "--model", str(model), str(root / "crop.tif"),
              "--out", str(out), "--instances"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    mask = tifffile.imread(out / "crop_mask.tif") != 0
    assert 0.01 < mask.mean() < 0.9  # the model finds something, not everything
    return {
        "mask": mask,
        "instances": tifffile.imread(out / "crop_instances.tif"),
        "objects": (out / "crop_objects.csv").read_text(),
        "ome": _ome(root / "crop.ome.zarr", crop),
    }


def _check(out: str, reference: dict) -> None:
    from mitoseg.volume.store import open_volume

    mask = open_volume(f"{out}/labels/mask")
    np.testing.assert_array_equal(mask.read(0, mask.shape[0]) != 0, reference["mask"])
    inst = open_volume(f"{out}/labels/instances")
    np.testing.assert_array_equal(inst.read(0, inst.shape[0]), reference["instances"])
    image = open_volume(out)
    assert image.voxel_size_nm == pytest.approx(VOXEL)


def test_local_cluster_matches_tiff_predict(reference: dict, model: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "out.ome.zarr")
    args = ["--no-progress", "predict", "--model", str(model), reference["ome"], "--out", out]
    result = runner.invoke(app, [*args, "--workers", "2", "--block-z", "2"])
    assert result.exit_code == 0, result.output
    assert "4 blocks (0 already done)" in result.output
    _check(out, reference)
    assert Path(out, "objects.csv").read_text() == reference["objects"]
    result = runner.invoke(app, [*args, "--workers", "1", "--block-z", "2"])
    assert result.exit_code != 0
    assert f"{out}: exists (a completed job); use --force to replace it" in result.output


def test_scale_without_unit_comes_through_predict(
    crop: np.ndarray, model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``mitoseg predict`` on an OME-Zarr whose axes have a scale but no unit: the output
    carries that scale unchanged (not 1, 1, 1), and the missing unit is reported."""
    import logging

    from mitoseg.volume.ngff_meta import PhysicalScale
    from mitoseg.volume.store import open_volume

    src = write_ome_zarr(tmp_path / "nounit.ome.zarr", crop[:2], VOXEL, (2, 64, 64), unit=None)
    out = str(tmp_path / "out.ome.zarr")
    with caplog.at_level(logging.WARNING, logger="mitoseg.volume"):
        result = runner.invoke(
            app, ["--no-progress", "predict", "--model", str(model), src, "--out", out,
                  "--workers", "1"],
        )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"{src}: axes z, y, x have a scale but no unit" in caplog.text
    want = PhysicalScale(scale=VOXEL, units=(None, None, None))
    for path in ("", "/labels/mask", "/labels/instances"):
        back = open_volume(out + path)
        assert back.scale == want and back.voxel_size_nm is None


def test_yx_tiles_match_whole_slice_predict(reference: dict, model: Path, tmp_path: Path) -> None:
    """Blocks of 3 slices x 48 x 48 pixels on 170 x 191 slices stored in (3, 37, 41)
    chunks, a 64-pixel tile grid with an 8-pixel halo: tiles, chunks and blocks all cross
    each other. Mask, instances (stitched across z, y and x faces) and objects.csv equal
    whole-slice ``mitoseg predict`` on the TIFF."""
    out = str(tmp_path / "out.ome.zarr")
    result = runner.invoke(
        app, ["--no-progress", "predict", "--model", str(model), reference["ome"], "--out", out,
              "--workers", "2", "--block-z", "3", "--block-yx", "48"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "48 blocks (0 already done)" in result.output  # 3 x 4 x 4
    _check(out, reference)
    assert Path(out, "objects.csv").read_text() == reference["objects"]
    root = zarr.open_group(out, mode="r")
    assert root["labels/mask/0"].chunks == (3, 48, 48)
    assert root["1"].chunks == (3, 24, 24)  # 48 = 16 x 3: levels stay aligned


def _worker_env(c: Any) -> list[tuple[str | None, str | None]]:
    """``(MALLOC_TRIM_THRESHOLD_, OMP_NUM_THREADS)`` in each worker's environment."""
    trim, omp = (c.run(os.getenv, k) for k in ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS"))
    return [(trim[w], omp[w]) for w in sorted(trim)]


def test_embedded_cluster_workers_start_without_malloc_trim_threshold() -> None:
    from distributed import Client

    assert DROPPED_WORKER_ENV == ("MALLOC_TRIM_THRESHOLD_",)
    with local_cluster(2) as cluster, Client(cluster) as c:
        c.wait_for_workers(2, timeout=60)
        assert _worker_env(c) == [(None, "1"), (None, "1")]


def test_attached_to_dask_scheduler_and_worker_processes(
    reference: dict, model: Path, tmp_path: Path
) -> None:
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    bindir = Path(sys.executable).parent
    procs = [
        subprocess.Popen(
            [
                str(bindir / "dask"),
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-dashboard",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    try:
        procs.append(
            subprocess.Popen(
                [
                    str(bindir / "dask"),
                    "worker",
                    address,
                    "--nthreads",
                    "1",
                    "--nworkers",
                    "1",
                    "--no-dashboard",
                ],
                env={**os.environ, **EXTERNAL_WORKER_ENV},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        from distributed import Client

        with Client(address, timeout="60s") as c:
            c.wait_for_workers(1, timeout=60)
            # the documented worker environment: Dask's defaults less DROPPED_WORKER_ENV
            assert _worker_env(c) == [(None, "1")]
        out = str(tmp_path / "out.ome.zarr")
        result = runner.invoke(
            app, ["--no-progress", "predict", "--model", str(model), reference["ome"], "--out",
                  out, "--scheduler", address, "--block-z", "3"],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        _check(out, reference)
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


def test_s3_in_and_out(reference: dict, model: Path, s3_env, tmp_path: Path) -> None:
    from distributed import Client, LocalCluster

    from mitoseg import tracking
    from mitoseg.volume.job import run_volume_job

    bucket = s3_env.make_bucket("volumes")
    client = s3_env.client()
    src = Path(reference["ome"])
    for f in src.rglob("*"):
        if f.is_file():
            client.upload_file(str(f), bucket, f"in.ome.zarr/{f.relative_to(src)}")
    net, plan = tracking.load_model_and_plan(str(model))
    out = f"s3://{bucket}/out.ome.zarr"
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None
        ) as cluster,
        Client(cluster) as c,
    ):
        summary = run_volume_job(f"s3://{bucket}/in.ome.zarr", out, net, plan, client=c, block_z=3)
    assert summary["blocks"] == 3
    _check(out, reference)
    body = client.get_object(Bucket=bucket, Key="out.ome.zarr/objects.csv")["Body"].read()
    assert body.decode() == reference["objects"]


def _done_rows(out: Path) -> int:
    try:
        done = zarr.open_group(str(out), mode="r")["mitoseg_done"][:]
    except Exception:
        return 0
    return int((done[:, 0] > 0).sum())


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_output(crop: np.ndarray, tmp_path: Path) -> None:
    """A slower model (wider layers) on 14 one-slice blocks, killed once 2 are recorded."""
    model = _model(tmp_path, crop, width=48, size=5)
    data = np.concatenate([crop, crop[::-1]])
    src = _ome(tmp_path / "in.ome.zarr", data, chunks=(5, 53, 61))
    out = tmp_path / "out.ome.zarr"
    exe = str(Path(sys.executable).parent / "mitoseg")
    cmd = [exe, "--no-progress", "predict", "--model", str(model), src,
           "--out", str(out), "--workers", "1", "--block-z", "1"]  # fmt: skip
    proc = subprocess.Popen(
        cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 240
    while _done_rows(out) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI, its LocalCluster nanny and worker
    proc.wait(timeout=30)
    done = _done_rows(out)
    assert 2 <= done < 14, f"killed too late or too early: {done} blocks recorded"
    root = zarr.open_group(str(out), mode="r")
    assert dict(root.attrs)["mitoseg"]["status"] == "running"
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"({done} already done)" in resumed.stdout
    fresh = tmp_path / "fresh.ome.zarr"
    uninterrupted = subprocess.run(
        [*cmd[:-6], "--out", str(fresh), "--workers", "1", "--block-z", "1"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert uninterrupted.returncode == 0, uninterrupted.stdout + uninterrupted.stderr
    a, b = zarr.open_group(str(out), mode="r"), zarr.open_group(str(fresh), mode="r")
    for name in ("0", "labels/mask/0", "labels/instances/0"):
        np.testing.assert_array_equal(a[name][:], b[name][:])
    assert (out / "objects.csv").read_text() == (fresh / "objects.csv").read_text()
    assert dict(a.attrs)["mitoseg"]["status"] == "complete"
