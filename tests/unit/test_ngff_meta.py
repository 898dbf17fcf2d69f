"""The one NGFF reader/writer (:mod:`mitoseg.volume.ngff_meta`, through ome-zarr-py) on real
OME-Zarr stores written by ome-zarr-py's own writer and by the volume path."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from mitoseg.io import DataError
from mitoseg.napari._reader import read_ome_zarr
from mitoseg.volume.ngff import create_output, write_levels
from mitoseg.volume.ngff_meta import PhysicalScale, read_multiscale
from mitoseg.volume.store import open_volume
from volumes import write_ome_zarr


def _write(
    path: Path,
    scale: tuple[float, float, float],
    unit: str | None,
    version: str = "0.5",
    levels: int = 1,
) -> Path:
    """A ``(3, 128, 128)`` uint8 OME-Zarr written by ome-zarr-py (``unit`` None: none)."""
    data = np.arange(3 * 128 * 128, dtype=np.uint32).reshape(3, 128, 128).astype(np.uint8)
    return Path(write_ome_zarr(path, data, scale, (1, 64, 64), version, unit, levels))


def _edit(path: Path, edit: Callable[[dict[str, Any]], object]) -> None:
    """Apply ``edit`` to the first multiscale of an NGFF 0.4 store's ``.zattrs``."""
    attrs = json.loads((path / ".zattrs").read_text())
    edit(attrs["multiscales"][0])
    (path / ".zattrs").write_text(json.dumps(attrs))


def _set_unit(path: Path, axis: int, unit: str) -> None:
    """Set one axis unit of an NGFF 0.4 store."""
    _edit(path, lambda ms: ms["axes"][axis].update({"unit": unit}))


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_micrometre_store_reads_in_nm_everywhere(tmp_path: Path, version: str) -> None:
    """ome-zarr-py's store in micrometres: the volume store and the napari reader read the
    same sizes in nm from the one reader."""
    store = _write(
        tmp_path / "um.zarr", (0.05, 0.004, 0.005), "micrometer",
        version, levels=2,
    )  # fmt: skip
    vol = open_volume(str(store))
    assert vol.ngff_version == version
    assert vol.voxel_size_nm == pytest.approx((50.0, 4.0, 5.0))
    assert vol.scale == PhysicalScale(scale=vol.voxel_size_nm, units=("nanometer",) * 3)
    [(levels, kw, kind)] = read_ome_zarr(store)
    assert kind == "image" and len(levels) == 2
    assert kw["scale"] == pytest.approx(vol.voxel_size_nm) and kw["units"] == ("nm",) * 3
    assert kw["metadata"]["voxel_size_nm"] == pytest.approx(list(vol.voxel_size_nm))


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_output_round_trips_through_ome_zarr_reader(tmp_path: Path, version: str) -> None:
    """The volume path's output, written through ome-zarr's writer, read back by ome-zarr's
    own reader (axes, units, per-level scale, labels) and by ours."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader

    uri = str(tmp_path / "out.ome.zarr")
    img = np.random.default_rng(0).integers(0, 255, (2, 130, 140), dtype=np.uint8)
    root = create_output(
        uri, shape=img.shape, dtype=img.dtype, voxel_size_nm=(40.0, 5.0, 6.0), block_z=1,
        n_blocks=2, ngff=version, probability_channels=1,
    )  # fmt: skip
    write_levels(root, img, 0, label=False)
    nodes = list(Reader(parse_url(uri))())
    image = next(n for n in nodes if n.specs and isinstance(n.specs[0], Multiscales))
    assert [a["unit"] for a in image.metadata["axes"]] == ["nanometer"] * 3
    scales = [t[0]["scale"] for t in image.metadata["coordinateTransformations"]]
    assert scales == [[40.0, 5.0, 6.0], [40.0, 10.0, 12.0]]
    np.testing.assert_array_equal(np.asarray(image.data[0]), img)
    labels = [n for n in nodes if any(isinstance(s, Label) for s in n.specs)]
    assert sorted(str(n.zarr).split("/")[-1].split(" ")[0] for n in labels) == [
        "instances", "mask",
    ]  # fmt: skip
    for path, channels in (("", 0), ("labels/mask", 0), ("probabilities", 1)):
        group = zarr.open_group(f"{uri}/{path}" if path else uri, mode="r")
        ms = read_multiscale(group, path)
        assert ms is not None and ms.version == version and len(ms.paths) == 2
        assert ms.names == ["c", "z", "y", "x"][1 - channels :]
        assert ms.physical() == PhysicalScale.from_voxel_size_nm((40.0, 5.0, 6.0))


def test_scale_without_unit_is_kept_and_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """NGFF allows a scale without a unit: it is kept as it is (not 1), the voxel size in
    nm is unknown, a warning names the axes; an output written from it carries it."""
    store = _write(tmp_path / "nounit.zarr", (45.0, 4.6, 4.7), None, "0.4")
    with caplog.at_level(logging.WARNING, logger="mitoseg.volume"):
        vol = open_volume(str(store))
    assert vol.voxel_size_nm is None
    assert vol.scale == PhysicalScale(scale=(45.0, 4.6, 4.7), units=(None, None, None))
    assert "axes z, y, x have a scale but no unit" in caplog.text
    assert str(store) in caplog.text
    # only z without a unit: y, x in nm, z kept as it is
    _set_unit(store, 1, "nanometer")
    _set_unit(store, 2, "micrometer")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mitoseg.volume"):
        mixed = open_volume(str(store)).scale
    assert mixed == PhysicalScale(scale=(45.0, 4.6, 4700.0), units=(None, "nanometer",
                                                                    "nanometer"))  # fmt: skip
    assert "axes z have a scale but no unit" in caplog.text
    [(_, kw, _)] = read_ome_zarr(store)  # napari: the same sizes, no units
    assert kw["scale"] == pytest.approx((45.0, 4.6, 4700.0)) and "units" not in kw
    assert kw["metadata"]["ngff_scale"]["units"] == [None, "nanometer", "nanometer"]
    out = str(tmp_path / "out.zarr")
    create_output(out, shape=(3, 128, 128), dtype=np.uint8, voxel_size_nm=None,
                  scale=mixed, block_z=1, n_blocks=3, ngff="0.5")  # fmt: skip
    back = open_volume(out)
    assert back.scale == mixed and back.voxel_size_nm is None
    # an explicit voxel size wins over the metadata
    assert open_volume(str(store), (40, 4, 4)).voxel_size_nm == (40.0, 4.0, 4.0)


#: (store name, unit of every axis, edit of its multiscale, message of both readers)
INVALID = [
    ("unit", "nanometer", lambda ms: ms["axes"][1].update({"unit": "furlong"}),
     r"unit\.zarr: image axis 'y' has unknown unit 'furlong' \(known: .*nanometer"),
    ("zero", None, lambda ms: ms["datasets"][0]["coordinateTransformations"][0].update(
        {"scale": [0, 4.6, 4.6]}), r"zero\.zarr: image axis 'z': scale 0\.0 is not positive"),
    ("axes", None, lambda ms: [ms["axes"][i].update({"type": "channel"}) for i in (0, 1)],
     r"axes\.zarr: image: invalid OME-Zarr metadata \(Only 1 axis can be type"),
    ("ct", None, lambda ms: ms["datasets"][0]["coordinateTransformations"][0].update(
        {"scale": [1, 2]}), r"ct\.zarr: image: invalid OME-Zarr metadata \('scale' list \[1, 2\]"),
    ("version", None, lambda ms: ms.update({"version": "9.9"}),
     r"version\.zarr: image: invalid OME-Zarr metadata \(Version 9\.9 not"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "unit", "edit", "message"), INVALID,
                         ids=[row[0] for row in INVALID])  # fmt: skip
def test_invalid_metadata_is_an_error_naming_the_store(
    tmp_path: Path, name: str, unit: str | None, edit: Callable, message: str
) -> None:
    """The volume store and the napari reader refuse the same stores with one message."""
    path = _write(tmp_path / f"{name}.zarr", (45.0, 4.6, 4.6), unit, "0.4")
    _edit(path, edit)
    with pytest.raises(DataError, match=message):
        read_ome_zarr(path)
    with pytest.raises(DataError, match=message.replace(": image", "")):
        open_volume(str(path))
