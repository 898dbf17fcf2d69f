"""End-to-end runs of pipelines/validate.py and pipelines/make_patches.py (subprocess)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
import yaml

from mitoseg.io import read_stack, write_stack

REPO = Path(__file__).resolve().parents[2]
SAMPLE = Path(str(files("mitoseg") / "sample_data" / "vnc"))
OUTPUTS = ["report.json", "slices.csv", "summary.md"]


def _run(script: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "pipelines" / script), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def _params(path: Path, **sections: dict) -> Path:
    data = {
        "base": {"seed": 42, "classes": {"background": 0, "mitochondria": 255}},
        "validate": {"min_height": 64, "min_width": 64},
        "patchify": {"patch_size": 256, "step": 256, "val_fraction": 0.25, "pad_mode": "reflect"},
    }
    data.update(sections)
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def stage_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """validate then patchify on a copy of the sample; returns paths and results."""
    tmp = tmp_path_factory.mktemp("stages")
    raw = tmp / "raw"
    for split in ("train", "test"):
        (raw / split).mkdir(parents=True)
        for name in ("images.tif", "masks.tif"):
            shutil.copy(SAMPLE / split / name, raw / split / name)
    (raw / "dataset.json").write_text(json.dumps({"source": "sample", "mask_kind": "binary"}))
    params = _params(tmp / "params.yaml")
    out = tmp / "validate"
    validate = _run("validate.py", "--raw", raw, "--out", out, "--params", params)
    patches = tmp / "patches"
    patchify = _run(
        "make_patches.py", "--raw", raw, "--report", out / "report.json", "--out", patches,
        "--params", params,
    )  # fmt: skip
    return {
        "tmp": tmp, "raw": raw, "params": params, "out": out, "patches": patches,
        "validate": validate, "patchify": patchify,
    }  # fmt: skip


def test_validate_stage_writes_outputs(stage_run: dict) -> None:
    result = stage_run["validate"]
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("validation passed: 20 slices, 11 expectations -> ")
    out: Path = stage_run["out"]
    assert sorted(p.name for p in out.iterdir()) == OUTPUTS
    report = json.loads((out / "report.json").read_text())
    assert report["success"] is True and report["failures"] == []
    assert report["raw_dir"] == str(stage_run["raw"])


def test_patchify_stage_writes_patches(stage_run: dict) -> None:
    result = stage_run["patchify"]
    assert result.returncode == 0, result.stderr
    assert "66 train (11 slices), 24 val (4 slices), 256px step 256" in result.stdout
    patches: Path = stage_run["patches"]
    meta = json.loads((patches / "meta.json").read_text())
    assert meta["seed"] == 42 and meta["n_train_patches"] == 66
    assert np.load(patches / "train_images.npy").shape == (66, 256, 256)
    assert np.load(patches / "val_masks.npy").shape == (24, 256, 256)


def test_failing_validation_names_slices_and_keeps_outputs(stage_run: dict) -> None:
    tmp: Path = stage_run["tmp"]
    bad = tmp / "bad_raw"
    shutil.copytree(stage_run["raw"], bad)
    masks = read_stack(bad / "train" / "masks.tif")
    masks[3, 0, 0] = 128
    masks[7, 5, 5] = 64
    write_stack(bad / "train" / "masks.tif", masks)
    images = read_stack(bad / "test" / "images.tif")
    images[1] = 17
    write_stack(bad / "test" / "images.tif", images)
    out: Path = stage_run["out"]
    before = {n: ((out / n).read_bytes(), (out / n).stat().st_mtime_ns) for n in OUTPUTS}
    result = _run("validate.py", "--raw", bad, "--out", out, "--params", stage_run["params"])
    assert result.returncode == 1
    err = result.stderr
    assert f"{bad}/train/masks.tif slice 3: mask values 128 are not in the class table" in err
    assert f"{bad}/train/masks.tif slice 7: mask values 64 are not in the class table" in err
    assert f"{bad}/test/images.tif slice 1: intensity std 0.000 is below" in err
    assert f"{bad}/test/images.tif slice 1: intensity range 0 is below" in err
    assert f"validation of {bad} failed (4 problem(s)):" in err
    assert f"outputs in {out} were not updated" in err
    after = {n: ((out / n).read_bytes(), (out / n).stat().st_mtime_ns) for n in OUTPUTS}
    assert after == before
    assert sorted(p.name for p in out.iterdir()) == OUTPUTS


def test_patchify_refuses_failed_report(stage_run: dict) -> None:
    tmp: Path = stage_run["tmp"]
    report = tmp / "failed_report.json"
    report.write_text(json.dumps({"success": False, "failures": [{"check": "x"}]}))
    out = tmp / "refused"
    result = _run(
        "make_patches.py", "--raw", stage_run["raw"], "--report", report, "--out", out,
        "--params", stage_run["params"],
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"error: {report}: validation report says the data failed validation (1 failure(s)); "
        "fix the data and re-run the validate stage"
    )
    assert not out.exists()
    missing = _run(
        "make_patches.py", "--raw", stage_run["raw"], "--report", tmp / "none.json", "--out", out,
        "--params", stage_run["params"],
    )  # fmt: skip
    assert missing.returncode == 1
    assert f"{tmp}/none.json: validation report not found; run the validate stage first" in (
        missing.stderr
    )


def test_stage_config_errors(stage_run: dict) -> None:
    tmp: Path = stage_run["tmp"]
    bad = _params(tmp / "bad_params.yaml", patchify={"patch_size": 64, "step": 128})
    result = _run(
        "make_patches.py", "--raw", stage_run["raw"], "--report", stage_run["out"] / "report.json",
        "--out", tmp / "x", "--params", bad,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.startswith("error: invalid params (1 problem(s)): patchify")
    assert "patchify.step (128) must not exceed patchify.patch_size (64)" in result.stderr
    missing = _run(
        "validate.py", "--raw", stage_run["raw"], "--out", tmp / "v", "--params", tmp / "no.yaml"
    )
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"error: {tmp}/no.yaml: params file not found"
