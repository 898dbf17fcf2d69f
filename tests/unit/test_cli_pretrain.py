"""``mitoseg pretrain``: a tiny run whose model a segmentation run can start from, and its
error paths (one case per row)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml
from typer.testing import CliRunner

from mitoseg.cli import app

runner = CliRunner()
TINY = {"model": {"depth": 1, "base_filters": 2, "batch_norm": False, "dropout": 0.0},
        "batch_size": 2, "crop_size": 16}  # fmt: skip


def _params(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"train": TINY}))
    return path


def _stack(path: Path, shape: tuple[int, ...] = (3, 32, 32)) -> Path:
    tifffile.imwrite(path, np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8))
    return path


def test_pretrain_writes_a_model_train_init_from_accepts(tmp_path: Path) -> None:
    import keras

    from mitoseg.config import resolve_train_config
    from mitoseg.train import initial_weights

    out = tmp_path / "models" / "pre.keras"
    args = ["--no-progress", "pretrain", str(_stack(tmp_path / "a.tif")),
            str(_stack(tmp_path / "b.tif", (32, 32))), "--out", str(out), "--steps", "3",
            "--params", str(_params(tmp_path)), "--square", "4"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"{out}: pre-trained 3 steps on 4 slices" in result.output
    assert f"train.init_from: {out}" in result.output
    model = keras.saving.load_model(out, compile=False)
    cfg = resolve_train_config({**TINY, "init_from": str(out)})
    assert len(initial_weights(model, cfg, 2)) == len(model.get_weights())
    assert [p.name for p in out.parent.iterdir()] == ["pre.keras"]  # no temporary left


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "missing.tif: file not found"),
        ("sizes", "b.tif: slices are 40 x 40, those of"),
        ("suffix", "--out"),
        ("crop", "crop_size (16) exceeds the slices' shape (8, 8)"),
        ("params", "train.batch_size"),
    ],
)
def test_pretrain_errors_name_the_file_or_setting(tmp_path: Path, case: str, message: str) -> None:
    params = _params(tmp_path)
    images = [str(_stack(tmp_path / "a.tif"))]
    out = tmp_path / "pre.keras"
    if case == "missing":
        images.append(str(tmp_path / "missing.tif"))
    elif case == "sizes":
        images.append(str(_stack(tmp_path / "b.tif", (2, 40, 40))))
    elif case == "suffix":
        out = tmp_path / "pre.h5"
    elif case == "crop":
        images = [str(_stack(tmp_path / "small.tif", (2, 8, 8)))]
    elif case == "params":
        params.write_text(yaml.safe_dump({"train": {**TINY, "batch_size": 0}}))
    args = ["--no-progress", "pretrain", *images, "--out", str(out), "--steps", "2",
            "--params", str(params), "--square", "4"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert message in result.output
    assert not out.exists()
