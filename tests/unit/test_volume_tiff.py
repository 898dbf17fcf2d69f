"""Calibrated TIFF output and ``mitoseg predict --instances`` on TIFF stacks."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from typer.testing import CliRunner

from mitoseg.cli import app
from mitoseg.inference.objects import instance_labels
from mitoseg.inference.plan import InferencePlan
from mitoseg.io import DataError, read_voxel_size, write_stack

runner = CliRunner()


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.uint32])
def test_write_stack_voxel_size_round_trips(tmp_path: Path, dtype) -> None:
    path = tmp_path / "a.tif"
    write_stack(path, np.zeros((3, 8, 9), dtype=dtype), (50.0, 4.6, 4.7))
    assert read_voxel_size(path) == pytest.approx((50.0, 4.6, 4.7))
    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        if dtype == np.uint32:  # not an ImageJ type: plain tags in pixels per cm
            assert page.tags["ResolutionUnit"].value == 3
            num, den = page.tags["XResolution"].value
            assert num / den == pytest.approx(1e7 / 4.7)
        else:  # ImageJ hyperstack: Fiji reads unit, spacing and pixels per micron
            assert tif.imagej_metadata["unit"] == "um"
            assert tif.imagej_metadata["spacing"] == pytest.approx(0.05)
            num, den = page.tags["YResolution"].value
            assert num / den == pytest.approx(1e3 / 4.6)
        assert tif.asarray().dtype == dtype


def test_read_voxel_size_of_foreign_files(tmp_path: Path) -> None:
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, np.zeros((2, 4, 4), np.uint8))
    assert read_voxel_size(plain) is None
    dpi = tmp_path / "dpi.tif"
    tifffile.imwrite(dpi, np.zeros((4, 4), np.uint8), resolution=(72, 72), resolutionunit=2)
    assert read_voxel_size(dpi) is None  # scanner dpi says nothing about the specimen
    cm = tmp_path / "cm.tif"
    tifffile.imwrite(cm, np.zeros((4, 4), np.uint8), resolution=(1e6, 2e6), resolutionunit=3)
    assert read_voxel_size(cm) == pytest.approx((10.0, 5.0, 10.0))
    ij = tmp_path / "ij.tif"
    tifffile.imwrite(
        ij, np.zeros((2, 4, 4), np.uint8), imagej=True, resolution=(0.25, 0.25),
        metadata={"unit": "nm", "spacing": 40.0, "axes": "ZYX"},
    )  # fmt: skip
    assert read_voxel_size(ij) == pytest.approx((40.0, 4.0, 4.0))
    png = tmp_path / "a.png"
    png.write_bytes(b"")
    assert read_voxel_size(png) is None
    with pytest.raises(DataError, match=r"missing\.tif: file not found"):
        read_voxel_size(tmp_path / "missing.tif")


@pytest.mark.parametrize(
    ("value", "message"),
    [((1.0, 2.0), "expected 3 positive numbers"), ((1.0, -2.0, 3.0), "expected 3 positive")],
)
def test_write_stack_bad_voxel_size(tmp_path: Path, value, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_stack(tmp_path / "a.tif", np.zeros((2, 2), np.uint8), value)
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def binary_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import keras

    root = tmp_path_factory.mktemp("model")
    inp = keras.Input((None, None, 1))
    out = keras.layers.Conv2D(
        1, 1, activation="sigmoid", kernel_initializer=keras.initializers.Constant(8.0),
        bias_initializer=keras.initializers.Constant(-4.0),
    )(inp)  # fmt: skip
    path = root / "binary.keras"
    keras.Model(inp, out).save(path)
    InferencePlan.default_for(1, 1, tile_size=32, halo=4, source="evaluate").write(
        root / "binary.inference_plan.json"
    )
    return path


def _blobs() -> np.ndarray:
    stack = np.full((3, 20, 24), 10, dtype=np.uint8)
    stack[0:2, 2:6, 2:6] = 200  # one object across two slices
    stack[2, 10:14, 15:20] = 200  # a second one
    stack[2, 17:19, 1:3] = 200  # a third
    return stack


def test_predict_instances_and_voxel_size(binary_model: Path, tmp_path: Path) -> None:
    stack = _blobs()
    write_stack(tmp_path / "vol.tif", stack, (45.0, 4.6, 4.6))
    out = tmp_path / "out"
    args = ["--no-progress", "predict", "--model", str(binary_model), str(tmp_path / "vol.tif")]
    result = runner.invoke(app, [*args, "--out", str(out), "--instances"])
    assert result.exit_code == 0, result.output
    assert "3 objects" in result.output
    mask = tifffile.imread(out / "vol_mask.tif")
    labels = tifffile.imread(out / "vol_instances.tif")
    assert labels.dtype == np.uint32
    np.testing.assert_array_equal(labels, instance_labels(mask)[0])
    for name in ("vol_mask.tif", "vol_instances.tif"):
        assert read_voxel_size(out / name) == pytest.approx((45.0, 4.6, 4.6))
    with (out / "vol_objects.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["voxels"]) for r in rows] == [32, 20, 4]
    assert float(rows[0]["volume_nm3"]) == pytest.approx(32 * 45 * 4.6 * 4.6)
    assert [int(r["slices"]) for r in rows] == [2, 1, 1]
    # --voxel-size wins over the file's calibration
    result = runner.invoke(app, [*args, "--out", str(out), "--voxel-size", "30,5,6"])
    assert result.exit_code == 0, result.output
    assert read_voxel_size(out / "vol_mask.tif") == pytest.approx((30.0, 5.0, 6.0))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--voxel-size", "1,2"], "--voxel-size: expected 3 positive numbers Z,Y,X in nm"),
        (["--voxel-size", "a,b,c"], "--voxel-size: expected 3 positive numbers"),
    ],
)
def test_predict_voxel_size_errors(
    binary_model: Path, tmp_path: Path, extra: list[str], message: str
) -> None:
    write_stack(tmp_path / "vol.tif", _blobs())
    result = runner.invoke(
        app,
        ["--no-progress", "predict", "--model", str(binary_model), str(tmp_path / "vol.tif"),
         "--out", str(tmp_path / "out"), *extra],
    )  # fmt: skip
    assert result.exit_code != 0
    assert message in result.output


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("not a store", "notastore.zarr: not found"),
        ("two inputs", "a volume job takes exactly one input"),
        ("output exists", "old.zarr: exists and is not a mitoseg volume output; use --force"),
    ],
)
def test_predict_volume_errors_before_any_work(
    binary_model: Path, tmp_path: Path, case: str, message: str
) -> None:
    import zarr

    vol = tmp_path / "vol.zarr"
    zarr.create_array(str(vol), shape=(3, 20, 24), dtype="uint8")[:] = _blobs()
    out = tmp_path / "out.zarr"
    inputs = {"not a store": [str(tmp_path / "notastore.zarr")], "two inputs": [str(vol)] * 2}
    if case == "output exists":
        out = tmp_path / "old.zarr"
        zarr.open_group(str(out), mode="w").attrs["other"] = True
    result = runner.invoke(
        app,
        ["--no-progress", "predict", "--model", str(binary_model),
         *inputs.get(case, [str(vol)]), "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code != 0
    assert message in result.output
    assert (out.exists() and case == "output exists") or not out.exists()
    if case == "output exists":
        assert dict(zarr.open_group(str(out), mode="r").attrs) == {"other": True}


def test_predict_volume_without_the_volume_extra(binary_model: Path, tmp_path: Path) -> None:
    """In a fresh interpreter where ``distributed`` cannot be imported (this process's
    ``sys.modules`` is left alone: other tests hold its modules)."""
    args = ["--no-progress", "predict", "--model", str(binary_model), str(tmp_path / "in.zarr"),
            "--out", str(tmp_path / "out.zarr")]  # fmt: skip
    code = (
        "import sys\n"
        "sys.modules['distributed'] = None  # as if not installed\n"
        f"sys.argv = ['mitoseg', *{args!r}]\n"
        "from mitoseg.cli import main\n"
        "main()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1, result.stderr
    assert "(distributed is missing): pip install 'mitoseg[volume]'" in result.stderr
    assert not (tmp_path / "out.zarr").exists()
