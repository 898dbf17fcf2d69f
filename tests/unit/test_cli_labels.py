"""``mitoseg labels init|add|list`` on a tiny TIFF volume (the store itself:
tests/unit/test_labelstore.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from typer.testing import CliRunner

from mitoseg.cli import app
from mitoseg.io import write_stack
from mitoseg.labelstore import read_manifest, read_slice

runner = CliRunner()
SHAPE = (4, 10, 12)


def _run(*args: str):
    return runner.invoke(app, ["--no-progress", *args])


@pytest.fixture()
def vol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # no ./params.yaml: built-in class table
    path = tmp_path / "vol.tif"
    write_stack(path, np.full(SHAPE, 100, np.uint8), (40.0, 5.0, 5.0))
    return path


def _mask_file(tmp: Path, name: str, box: tuple[int, int, int, int], value: int = 255) -> Path:
    m = np.full(SHAPE[1:], 254, np.uint8)
    y0, y1, x0, x1 = box
    m[y0:y1, x0:x1] = value
    tifffile.imwrite(tmp / name, m)
    return tmp / name


def test_init_add_list(vol: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MITOSEG_AUTHOR", "ana")
    store = tmp_path / "labels"
    r = _run("labels", "init", str(vol), "--store", str(store))
    assert r.exit_code == 0, r.output
    assert r.output.strip() == (
        f"label store {store} for {vol} (4 x 10 x 12): classes "
        "{'background': 0, 'mitochondria': 255}, ignore_value 254"
    )
    m1 = _mask_file(tmp_path, "m1.tif", (1, 3, 2, 6))
    add = ["labels", "add", "--store", str(store)]
    r = _run(*add, "--z", "2", "--mask", str(m1), "--split", "test", "--note", "suggest rank 3",
             "--model", "models:/mito/7")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert r.output.strip() == f"slice 2 (test, new): 8 labelled pixels -> {store}/z00002.tif"
    m0 = _mask_file(tmp_path, "m0.tif", (0, 10, 0, 12), value=0)
    r = _run(*add, "--z", "0", "--mask", str(m0))
    assert r.exit_code == 0, r.output
    np.testing.assert_array_equal(read_slice(store, 2), tifffile.imread(m1))
    entries = read_manifest(store).entries
    assert [(e.z, e.split, e.labelled_pixels) for e in entries] == [
        (0, "train", 120),
        (2, "test", 8),
    ]
    p = entries[1].provenance
    assert (p.tool, p.author, p.model) == ("cli", "ana", "models:/mito/7")
    assert p.note == "suggest rank 3"

    r = _run("labels", "list", "--store", str(store))
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert lines[0].split() == ["z", "split", "labelled", "author", "time", "(UTC)", "model"]
    when = [e.provenance.time.strftime("%Y-%m-%d %H:%M:%S") for e in entries]
    assert lines[1].split() == ["0", "train", "120", "ana", *when[0].split(), "-"]
    assert lines[2].split() == ["2", "test", "8", "ana", *when[1].split(), "models:/mito/7"]
    assert lines[3] == f"2 labelled slices, 128 labelled pixels ({vol})"


def test_add_replace_and_allow_test_change(vol: Path, tmp_path: Path) -> None:
    store = tmp_path / "labels"
    assert _run("labels", "init", str(vol), "--store", str(store)).exit_code == 0
    a, b = _mask_file(tmp_path, "a.tif", (0, 2, 0, 2)), _mask_file(tmp_path, "b.tif", (5, 6, 5, 9))
    base = ["labels", "add", "--store", str(store), "--z", "1"]
    assert _run(*base, "--mask", str(a), "--split", "test").exit_code == 0
    r = _run(*base, "--mask", str(b), "--split", "test")
    assert r.exit_code == 1
    assert "slice 1: split: the slice is a test slice" in r.output
    r = _run(*base, "--mask", str(b), "--split", "test", "--replace", "--allow-test-change")
    assert r.exit_code == 0, r.output
    assert r.output.startswith("slice 1 (test, replace): 4 labelled pixels")
    np.testing.assert_array_equal(read_slice(store, 1), tifffile.imread(b))


def test_init_takes_the_class_table_from_params(vol: Path, tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(
        "base:\n  classes:\n    background: 0\n    mito: 1\n    er: 2\n  ignore_value: 7\n"
    )
    r = _run("labels", "init", str(vol), "--store", "st")
    assert r.exit_code == 0, r.output
    raw = json.loads((tmp_path / "st" / "store.json").read_text())
    assert (raw["classes"], raw["ignore_value"]) == ({"background": 0, "mito": 1, "er": 2}, 7)
    r = _run("labels", "init", str(vol), "--store", "st2", "--ignore-value", "9")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "st2" / "store.json").read_text())["ignore_value"] == 9


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["init", "missing.tif", "--store", "s"], "error: missing.tif: file not found"),
        (["init", "vol.tif", "--store", "s", "--ignore-value", "0"],
         "error: s/store.json: base.ignore_value 0 is a mask value of base.classes"),
        (["add", "--store", "nowhere", "--z", "0", "--mask", "m.tif"],
         "error: nowhere/store.json: no label store here"),
        (["add", "--store", "s0", "--z", "0", "--mask", "gone.tif"], "error: gone.tif"),
        (["add", "--store", "s0", "--z", "4", "--mask", "m.tif"],
         "error: s0/store.json: z 4 is outside the volume's slices 0..3"),
        (["add", "--store", "s0", "--z", "0", "--mask", "m.tif", "--split", "val"],
         "error: --split must be train or test, got 'val'"),
        (["list", "--store", "nowhere"], "error: nowhere/store.json: no label store here"),
    ],
    ids=["no-volume", "ignore-is-class", "add-no-store", "no-mask", "z-range", "split", "list"],
)  # fmt: skip
def test_errors(vol: Path, tmp_path: Path, args: list[str], message: str) -> None:
    assert _run("labels", "init", str(vol), "--store", "s0").exit_code == 0
    _mask_file(tmp_path, "m.tif", (0, 1, 0, 1))
    r = _run("labels", *args)
    assert r.exit_code == 1, r.output
    assert r.output.strip().splitlines()[-1].startswith(message), r.output
