"""``mitoseg predict`` / ``mitoseg evaluate`` with tiny Keras models built here (no training).

The binary model is one 1x1 convolution ``sigmoid(8 x - 4)``: normalised intensity 1 ->
0.98, 0 -> 0.02; its inference plan (32-pixel tiles, halo 4, threshold 0.5) lies beside
it. The multiclass model is a 1x1 convolution to 3 softmax channels without a plan.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

from mitoseg.cli import app
from mitoseg.inference.plan import InferencePlan
from mitoseg.io import write_stack

runner = CliRunner()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import keras

    from tiny_models import save_sigmoid_model

    root = tmp_path_factory.mktemp("models")
    binary = save_sigmoid_model(root)
    inp3 = keras.Input((None, None, 1))
    out3 = keras.layers.Conv2D(3, 1, activation="softmax", kernel_initializer="ones")(inp3)
    multi = root / "multi.keras"
    keras.Model(inp3, out3).save(multi)
    return {"binary": binary, "multi": multi}


def _disc_stack(z: int, h: int, w: int, dtype=np.uint8, high: int = 200) -> np.ndarray:
    """Bright discs (value ``high``) on a dark background (10)."""
    yy, xx = np.mgrid[:h, :w]
    stack = np.full((z, h, w), 10, dtype=dtype)
    for i in range(z):
        disc = (yy - h // 2) ** 2 + (xx - w // 3 - i) ** 2 < (min(h, w) // 4) ** 2
        stack[i][disc] = high
    return stack


def _run(*args: str):
    return runner.invoke(app, ["--no-progress", *args])


def test_predict_stack_2d_16bit_and_rgb(models: dict[str, Path], tmp_path: Path) -> None:
    stack = _disc_stack(2, 40, 50)
    write_stack(tmp_path / "stack.tif", stack)
    img16 = _disc_stack(1, 37, 70, dtype=np.uint16, high=60000)[0]
    tifffile.imwrite(tmp_path / "deep.tif", img16)
    rgb = np.repeat(_disc_stack(1, 33, 45)[0][..., None], 3, axis=-1)
    Image.fromarray(rgb, mode="RGB").save(tmp_path / "colour.png")
    out = tmp_path / "masks"
    result = _run(
        "predict", "--model", str(models["binary"]), str(tmp_path / "stack.tif"),
        str(tmp_path / "deep.tif"), str(tmp_path / "colour.png"), "--out", str(out),
        "--tile-size", "32", "--batch-size", "4",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "colour_mask.tif",
        "deep_mask.tif",
        "stack_mask.tif",
    ]
    m = tifffile.imread(out / "stack_mask.tif")
    assert m.shape == (2, 40, 50) and m.dtype == np.uint8
    assert np.array_equal(m, np.where(stack == 200, 255, 0))
    deep = tifffile.imread(out / "deep_mask.tif")
    assert deep.shape == (37, 70) and np.array_equal(deep, np.where(img16 == 60000, 255, 0))
    colour = tifffile.imread(out / "colour_mask.tif")
    assert colour.shape == (33, 45) and set(np.unique(colour)) == {0, 255}
    assert f"-> {out / 'stack_mask.tif'} (foreground" in result.output


def test_predict_threshold_tta_and_multiclass(models: dict[str, Path], tmp_path: Path) -> None:
    write_stack(tmp_path / "a.tif", _disc_stack(1, 32, 32))
    # threshold 0.99 is above sigmoid(4) = 0.982: nothing is foreground
    result = _run(
        "predict", "--model", str(models["binary"]), str(tmp_path / "a.tif"),
        "--out", str(tmp_path / "o"), "--tile-size", "16", "--halo", "2", "--tta",
        "--threshold", "0.99",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert not tifffile.imread(tmp_path / "o" / "a_mask.tif").any()
    result = _run(
        "predict", "--model", str(models["multi"]), str(tmp_path / "a.tif"),
        "--out", str(tmp_path / "m"), "--tile-size", "16", "--halo", "2",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    mask = tifffile.imread(tmp_path / "m" / "a_mask.tif")
    assert mask.shape == (32, 32) and mask.dtype == np.uint8 and mask.max() <= 2


def test_predict_errors(models: dict[str, Path], tmp_path: Path) -> None:
    write_stack(tmp_path / "a.tif", _disc_stack(1, 20, 20))
    (tmp_path / "sub").mkdir()
    write_stack(tmp_path / "sub" / "a.tif", _disc_stack(1, 20, 20))
    model = str(models["binary"])
    cases = [
        (
            [str(tmp_path / "nope.tif")],
            f"error: input not found: {tmp_path / 'nope.tif'}",
        ),
        (
            [str(tmp_path / "a.tif"), "--halo", "16"],
            "error: invalid override: halo 16 leaves nothing of a 32-pixel tile "
            "(need 2 * halo < tile_size)",
        ),
        (
            [str(tmp_path / "a.tif"), "--threshold", "1.5"],
            "error: --threshold must be in [0, 1], got 1.5",
        ),
        (
            [str(tmp_path / "a.tif"), str(tmp_path / "sub" / "a.tif")],
            "error: two inputs have the same file name stem; their masks would overwrite each "
            "other",
        ),
    ]
    for extra, message in cases:
        result = _run("predict", "--model", model, "--out", str(tmp_path / "o"), *extra)
        assert result.exit_code == 1
        assert result.stderr.strip() == message
    missing = tmp_path / "missing.keras"
    result = _run("predict", "--model", str(missing), str(tmp_path / "a.tif"), "--out", "o")
    assert result.exit_code == 1
    assert (
        result.stderr.strip()
        == f"error: cannot load model {missing}: model file not found: {missing}"
    )
    not_a_model = tmp_path / "junk.keras"
    not_a_model.write_bytes(b"not a zip")
    result = _run("predict", "--model", str(not_a_model), str(tmp_path / "a.tif"), "--out", "o")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: cannot load model {not_a_model}: ")
    bad_image = tmp_path / "bad.tif"
    bad_image.write_bytes(b"garbage")
    result = _run("predict", "--model", model, str(bad_image), "--out", str(tmp_path / "o"))
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: {bad_image}: the file is not a TIFF, PNG or JPEG")
    assert not (tmp_path / "o").exists()


def test_evaluate_json_and_table(models: dict[str, Path], tmp_path: Path) -> None:
    images = _disc_stack(2, 40, 48)
    write_stack(tmp_path / "x.tif", images)
    write_stack(tmp_path / "y.tif", np.where(images == 200, 255, 0).astype(np.uint8))
    write_stack(tmp_path / "y01.tif", (images == 200).astype(np.uint8))
    args = ["--model", str(models["binary"]), "--images", str(tmp_path / "x.tif")]
    result = _run("evaluate", *args, "--masks", str(tmp_path / "y.tif"), "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    for key in ("iou", "mean_iou", "dice", "accuracy", "precision", "recall", "objects"):
        assert key in metrics
    assert metrics["iou"] == 1.0 and metrics["threshold"] == 0.5 and metrics["n_test_slices"] == 2
    assert metrics["objects"]["n_true"] == 2 and metrics["objects"]["n_matched"] == 2
    # 0/1 masks are accepted for a binary table too; threshold 0.99 predicts nothing
    result = _run(
        "evaluate", *args, "--masks", str(tmp_path / "y01.tif"), "--json", "--threshold", "0.99"
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["iou"] == 0.0 and metrics["recall"] == 0.0 and metrics["threshold"] == 0.99
    result = _run("evaluate", *args, "--masks", str(tmp_path / "y.tif"))
    assert result.exit_code == 0, result.output
    assert "mean_iou" in result.stdout and "1.0000" in result.stdout


def test_evaluate_errors(models: dict[str, Path], tmp_path: Path) -> None:
    images = _disc_stack(1, 32, 32)
    write_stack(tmp_path / "x.tif", images)
    write_stack(tmp_path / "small.tif", images[:, :16])
    labels = np.where(images == 200, 7, 0).astype(np.uint8)
    write_stack(tmp_path / "labels.tif", labels)
    params = tmp_path / "params.yaml"
    params.write_text("base:\n  classes: {background: 0, a: 7, b: 9}\nevaluate:\n  tile_size: 16\n")
    model = ["--model", str(models["binary"]), "--images", str(tmp_path / "x.tif")]
    cases = [
        (
            ["--masks", str(tmp_path / "nope.tif")],
            f"error: {tmp_path / 'nope.tif'}: file not found",
        ),
        (
            ["--masks", str(tmp_path / "small.tif")],
            f"error: {tmp_path / 'small.tif'}: mask shape (1, 16, 32) does not match image shape "
            f"(1, 32, 32) of {tmp_path / 'x.tif'}",
        ),
        (
            ["--masks", str(tmp_path / "labels.tif")],
            f"error: {tmp_path / 'labels.tif'} slice 0: mask values [7] are not in the class "
            "table base.classes (allowed values: 0, 1, 255)",
        ),
        (
            ["--masks", str(tmp_path / "labels.tif"), "--params", str(params)],
            "error: the model's plan has 2 classes (background, mitochondria) but the class "
            "table has 3 (background, a, b)",
        ),
        (
            ["--masks", str(tmp_path / "labels.tif"), "--threshold", "-1"],
            "error: --threshold must be in [0, 1], got -1.0",
        ),
    ]
    for extra, message in cases:
        result = _run("evaluate", *model, *extra)
        assert result.exit_code == 1
        assert result.stderr.strip() == message


def test_the_plan_decides_and_flags_override(models: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    model = tmp_path / "m.keras"
    shutil.copy(models["binary"], model)
    InferencePlan.default_for(1, 1, tile_size=16, halo=2, threshold=0.99, source="evaluate").write(
        tmp_path / "inference_plan.json"
    )  # 0.99 is above sigmoid(4) = 0.982: nothing is foreground
    write_stack(tmp_path / "a.tif", _disc_stack(1, 32, 32))
    base = ["predict", "--model", str(model), str(tmp_path / "a.tif")]
    result = _run(*base, "--out", str(tmp_path / "planned"))
    assert result.exit_code == 0 and "warning" not in result.stderr
    assert not tifffile.imread(tmp_path / "planned" / "a_mask.tif").any()
    assert _run(*base, "--out", str(tmp_path / "given"), "--threshold", "0.5").exit_code == 0
    assert tifffile.imread(tmp_path / "given" / "a_mask.tif").max() == 255
    (tmp_path / "inference_plan.json").unlink()
    result = _run(*base, "--out", str(tmp_path / "default"), "--tile-size", "16", "--halo", "2")
    assert result.exit_code == 0
    assert (
        f"warning: {model} has no inference plan; using defaults derived from the network "
        "(threshold 0.5)" in result.stderr
    )
    assert tifffile.imread(tmp_path / "default" / "a_mask.tif").max() == 255


def test_no_hysteresis_drops_the_plans_seed_threshold(
    models: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    model = tmp_path / "m.keras"
    shutil.copy(models["binary"], model)
    InferencePlan.default_for(
        1, 1, tile_size=16, halo=2, threshold=0.5, seed_threshold=0.99, source="evaluate"
    ).write(tmp_path / "inference_plan.json")  # the disc peaks at sigmoid(4) = 0.982 < 0.99
    write_stack(tmp_path / "a.tif", _disc_stack(1, 32, 32))
    base = ["predict", "--model", str(model), str(tmp_path / "a.tif")]
    assert _run(*base, "--out", str(tmp_path / "planned")).exit_code == 0
    assert not tifffile.imread(tmp_path / "planned" / "a_mask.tif").any()
    assert _run(*base, "--out", str(tmp_path / "plain"), "--no-hysteresis").exit_code == 0
    assert tifffile.imread(tmp_path / "plain" / "a_mask.tif").max() == 255
    result = _run(*base, "--out", str(tmp_path / "high"), "--threshold", "0.995")
    assert result.exit_code != 0
    assert "seed_threshold 0.99 needs a binary plan with a lower threshold" in result.stderr
    args = ["--out", str(tmp_path / "high"), "--threshold", "0.995", "--no-hysteresis"]
    assert _run(*base, *args).exit_code == 0


@pytest.mark.parametrize(
    ("input_voxel", "flag", "expected", "note"),
    [
        (None, None, (50.0, 4.6, 4.6), True),  # the input says nothing: the plan's
        ((30.0, 2.0, 2.0), None, (30.0, 2.0, 2.0), False),  # the input's own wins
        (None, "10,3,3", (10.0, 3.0, 3.0), False),  # --voxel-size wins
    ],
    ids=["from_plan", "from_input", "from_flag"],
)
def test_predict_carries_the_voxel_size(
    models: dict[str, Path],
    tmp_path: Path,
    input_voxel: tuple[float, float, float] | None,
    flag: str | None,
    expected: tuple[float, float, float],
    note: bool,
) -> None:
    from mitoseg.io import read_voxel_size

    model = tmp_path / "m.keras"
    model.write_bytes(models["binary"].read_bytes())
    InferencePlan.default_for(
        1, 1, tile_size=32, halo=4, source="evaluate", voxel_size_nm=[50.0, 4.6, 4.6]
    ).write(tmp_path / "inference_plan.json")
    write_stack(tmp_path / "a.tif", _disc_stack(2, 32, 32), input_voxel)
    args = ["predict", "--model", str(model), str(tmp_path / "a.tif"), "--out", str(tmp_path)]
    result = _run(*args, *(["--voxel-size", flag] if flag else []))
    assert result.exit_code == 0, result.output
    assert read_voxel_size(tmp_path / "a_mask.tif") == pytest.approx(expected)
    said = "no voxel size in the input; using the model's training data's 50,4.6,4.6 nm"
    assert (said in result.stderr) is note
