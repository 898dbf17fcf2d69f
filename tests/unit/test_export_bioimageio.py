"""Unit tests of the bioimage.io export: argument checks, test tile choice, normalisation,
cover, metadata and the ``rdf.yaml`` description (validated by ``bioimageio.spec``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mitoseg.cli.export import load_metadata, parse_voxel_size
from mitoseg.export.bioimageio import (
    ExportMetadata,
    _check_formats,
    cover_image,
    network_input,
    resolve_voxel_size,
    select_test_sample,
)
from mitoseg.inference.plan import InferencePlan
from mitoseg.io import DataError


def plan(**fields: object) -> InferencePlan:
    return InferencePlan.default_for(1, 16, halo=16, tile_size=256, **fields)


def em_stack(z: int = 3, h: int = 80, w: int = 100) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(z, h, w)).astype(np.uint8)


# ------------------------------------------------------------------ voxel size


@pytest.mark.parametrize(
    ("plan_voxel", "override", "expected"),
    [
        ([50.0, 4.6, 4.0], None, (4.6, 4.0)),
        ([50.0, 4.6, 4.0], [5.0], (5.0, 5.0)),
        (None, [3.0, 2.0], (3.0, 2.0)),
    ],
)
def test_resolve_voxel_size(plan_voxel, override, expected) -> None:
    assert resolve_voxel_size(plan_voxel, override) == expected


@pytest.mark.parametrize(
    ("plan_voxel", "override", "match"),
    [
        (None, None, "plan has no voxel_size_nm: pass the pixel size in nm"),
        (None, [0.0], r"voxel size must be 1 or 2 positive numbers \(y, x in nm\), got \[0.0\]"),
        (None, [1.0, 2.0, 3.0], "voxel size must be 1 or 2 positive numbers"),
        (None, [float("nan")], "voxel size must be 1 or 2 positive numbers"),
        ([50.0, 4.6, 4.6], [-1.0], "voxel size must be 1 or 2 positive numbers"),
    ],
)
def test_resolve_voxel_size_errors(plan_voxel, override, match) -> None:
    with pytest.raises(ValueError, match=match):
        resolve_voxel_size(plan_voxel, override)


@pytest.mark.parametrize(("text", "expected"), [(None, None), ("4.6", [4.6]), ("4, 5", [4, 5])])
def test_parse_voxel_size(text, expected) -> None:
    assert parse_voxel_size(text) == expected


@pytest.mark.parametrize("text", ["a", "1,2,3", "", "4.6,"])
def test_parse_voxel_size_errors(text: str) -> None:
    with pytest.raises(ValueError, match="--voxel-size must be Y,X or one number in nm, got"):
        parse_voxel_size(text)


# ------------------------------------------------------------------ test tile


def test_select_test_sample_centre_square_multiple_of_divisor() -> None:
    stack = em_stack()
    tile, z = select_test_sample(stack, plan(), max_side=512)
    assert z == 1 and tile.shape == (80, 80, 1) and tile.dtype == np.uint8
    assert np.array_equal(tile[..., 0], stack[1, :, 10:90])
    tile, z = select_test_sample(stack, plan(), index=2, max_side=70)
    assert z == 2 and tile.shape == (64, 64, 1)


def test_select_test_sample_skips_blank_middle_slice() -> None:
    stack = em_stack()
    stack[1] = 7
    assert select_test_sample(stack, plan())[1] in (0, 2)


@pytest.mark.parametrize(
    ("stack", "kwargs", "match"),
    [
        (
            np.zeros(10, np.uint8),
            {},
            r"^sample: expected \(Z, H, W\) or \(H, W\), got shape \(10,\)$",
        ),
        (
            np.zeros((0, 8, 8), np.uint8),
            {},
            r"^sample: expected a non-empty array, got shape \(0, 8, 8\)$",
        ),
        (em_stack(), {"index": 3}, r"sample: slice 3 out of range: choose 0..2 \(3 slices"),
        (em_stack(), {"index": -1}, "sample: slice -1 out of range"),
        (em_stack(), {"max_side": 0}, "max_side must be >= 1, got 0"),
        (em_stack(), {"max_side": 40}, "gives a 32-pixel test tile; the package needs at least 48"),
        (em_stack(h=40), {}, "a 40x100 slice .* gives a 32-pixel test tile"),
        (np.full((2, 64, 64), 9, np.uint8), {"index": 0}, "sample: slice 0 is blank"),
    ],
)
def test_select_test_sample_errors(stack, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        select_test_sample(stack, plan(), **kwargs)


def test_network_input_is_mitoseg_normalisation() -> None:
    from mitoseg.inference.normalize import normalize_slice

    raw = em_stack()[0][..., None]
    x = network_input(raw, plan())
    assert x.shape == (1, 80, 100, 1) and x.dtype == np.float32
    np.testing.assert_array_equal(x[0, ..., 0], normalize_slice(raw[..., 0]))


def test_network_input_blank_channel() -> None:
    with pytest.raises(ValueError, match="network_input: channel 0 of the test tile is blank"):
        network_input(np.zeros((32, 32, 1), np.uint8), plan())


# ------------------------------------------------------------------ formats, cover


@pytest.mark.parametrize(
    ("formats", "match"),
    [
        (["keras_v3", "torchscript"], "unknown weight format.s. torchscript; choose from keras_v3"),
        (["keras_v3", "onnx", "onnx"], "weight formats listed twice"),
        (["onnx"], "weight formats must include keras_v3"),
    ],
)
def test_check_formats_errors(formats, match) -> None:
    with pytest.raises(ValueError, match=match):
        _check_formats(formats)


def test_check_formats_orders_original_first() -> None:
    assert _check_formats(["onnx", "keras_v3"]) == ["keras_v3", "onnx"]


def test_cover_image_tints_the_mask() -> None:
    raw = np.tile(np.arange(64, dtype=np.uint8) * 4, (32, 1))
    probs = np.zeros((32, 64, 1), np.float32)
    probs[8:16, 8:16] = 0.9
    cover = cover_image(raw, probs, 0.5)
    assert cover.shape == (32, 128, 3) and cover.dtype == np.uint8
    left, right = cover[:, :64].astype(int), cover[:, 64:].astype(int)
    assert np.array_equal(left[20:], right[20:])  # background untouched
    tinted = right[8:16, 8:16]
    assert (tinted[..., 1] < tinted[..., 0]).all() and (tinted[..., 1] < tinted[..., 2]).all()


# ------------------------------------------------------------------ metadata


def test_load_metadata_file_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "meta.yaml"
    path.write_text("name: EM mito model\nlicense: CC-BY-4.0\ntags: [em]\n")
    meta = load_metadata(path, {"license": None, "authors": [{"name": "Ada"}]})
    assert meta.name == "EM mito model" and meta.license == "CC-BY-4.0"
    assert [a.name for a in meta.authors] == ["Ada"] and meta.tags == ["em"]
    assert load_metadata(None, {}) == ExportMetadata()
    assert ExportMetadata().weights_license == "CC-BY-NC-SA-3.0"  # the training data's


@pytest.mark.parametrize(
    ("text", "overrides", "match"),
    [
        ("- a\n- b\n", {}, "meta.yaml: package metadata must be a mapping of fields"),
        ("name: [unclosed\n", {}, "meta.yaml: cannot read the package metadata"),
        ("authors: []\n", {}, "meta.yaml: invalid package metadata: authors: List should have"),
        ("colour: red\n", {}, "meta.yaml: invalid package metadata: colour: Extra inputs"),
        ("{}\n", {"name": "ab"}, "invalid package metadata: name: String should have at least"),
    ],
)
def test_load_metadata_errors(tmp_path: Path, text, overrides, match) -> None:
    path = tmp_path / "meta.yaml"
    path.write_text(text)
    with pytest.raises(DataError, match=match):
        load_metadata(path, overrides)


def test_load_metadata_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.yaml: cannot read the package metadata"):
        load_metadata(tmp_path / "nope.yaml", {})


# ------------------------------------------------------------------ export (keras_v3 only)


@pytest.fixture(scope="module")
def tiny_model():
    import keras

    from mitoseg.config import ModelConfig
    from mitoseg.model.unet import build_unet

    keras.utils.set_random_seed(0)
    return build_unet(ModelConfig(depth=2, base_filters=4, batch_norm=False, dropout=0.0), 2)


def test_export_folder_keras_only_validates_and_loads(tiny_model, tmp_path: Path) -> None:
    from bioimageio.spec import load_description
    from bioimageio.spec.model import v0_5

    from mitoseg.export.bioimageio import export_bioimageio

    p = InferencePlan.default_for(
        1, 4, halo=8, tile_size=256, voxel_size_nm=[40, 5, 6], seed_threshold=0.8
    )
    out = tmp_path / "pkg"
    report = export_bioimageio(
        tiny_model, p, em_stack(h=64, w=64), out, weight_formats=["keras_v3"], max_side=48
    )
    assert report.weight_formats == ["keras_v3"] and report.voxel_size_nm == [5.0, 6.0]
    assert report.test_input_shape == [1, 48, 48, 1] == report.test_output_shape
    names = {f.name for f in out.iterdir()}
    assert {"rdf.yaml", "README.md", "cover.png", "test_input.npy", "test_output.npy"} <= names
    assert "weights.keras" in names and "weights.onnx" not in names
    descr = load_description(out / "rdf.yaml")
    assert isinstance(descr, v0_5.ModelDescr)
    assert descr.inputs[0].axes[2].scale == 6.0
    assert descr.inputs[0].axes[1].size.min == 20  # 2 * halo + divisor, a multiple of 4
    readme = (out / "README.md").read_text()
    assert "probability >= 0.5" in readme and "reflect-pads the image border by 8" in readme
    assert "reach probability >= 0.8 somewhere" in readme  # hysteresis, applied afterwards
    expected = tiny_model.predict_on_batch(network_input(np.load(out / "test_input.npy")[0], p))
    np.testing.assert_allclose(np.load(out / "test_output.npy"), expected, atol=1e-6)


@pytest.mark.parametrize(
    ("plan_fields", "out_name", "match"),
    [
        ({"n_classes": 3, "class_names": ["a", "b", "c"], "threshold": None,
          "threshold_source": "argmax"}, "pkg", r"model outputs 1 channel\(s\) but its plan has 3"),
        ({}, "file.txt", "file.txt: exists and is not a folder"),
    ],
)  # fmt: skip
def test_export_errors(tiny_model, tmp_path: Path, plan_fields, out_name, match) -> None:
    from mitoseg.export.bioimageio import export_bioimageio

    (tmp_path / "file.txt").write_text("x")
    base = InferencePlan.default_for(1, 4, halo=8, tile_size=256).model_dump()
    base.update(plan_fields)
    p = InferencePlan.model_validate(base)
    with pytest.raises(ValueError, match=match):
        export_bioimageio(
            tiny_model, p, em_stack(h=64, w=64), tmp_path / out_name,
            voxel_size_nm=[4.0], weight_formats=["keras_v3"], max_side=48,
        )  # fmt: skip


# ------------------------------------------------------------------ CLI errors


@pytest.fixture(scope="module")
def tiny_model_file(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "tiny.keras"
    tiny_model.save(path)
    return path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sample", "nope.tif"], "error: --sample nope.tif: file not found"),
        (["--voxel-size", "x"], "error: --voxel-size must be Y,X or one number in nm, got 'x'"),
        ([], "error: the model's inference plan has no voxel_size_nm"),
        (["--voxel-size", "4", "--weights", "onnx"], "error: weight formats must include keras_v3"),
        (["--voxel-size", "4", "--max-side", "8"], "error: sample: a 512x768 slice (max side 8)"),
        (["--voxel-size", "4", "--name", "ab"], "error: command line: invalid package metadata"),
    ],
)
def test_cli_export_errors(tiny_model_file: Path, tmp_path: Path, args, message) -> None:
    from typer.testing import CliRunner

    from mitoseg.cli import app

    out = tmp_path / "pkg"
    cmd = ["export", "bioimageio", "--model", str(tiny_model_file), "--out", str(out), *args]
    res = CliRunner().invoke(app, cmd)
    assert res.exit_code == 1, res.output
    assert message in res.output
    assert not out.exists()


def test_export_2p5d_model_gets_context_channels(tmp_path: Path) -> None:
    if "z_context" not in InferencePlan.model_fields:
        pytest.skip("this mitoseg's InferencePlan has no z_context (2.5D) field")
    import keras
    from bioimageio.spec import load_description

    from mitoseg.config import ModelConfig
    from mitoseg.export.bioimageio import export_bioimageio
    from mitoseg.model.unet import build_unet

    keras.utils.set_random_seed(0)
    model = build_unet(ModelConfig(depth=1, base_filters=2, batch_norm=False, dropout=0), 2, 3)
    p = InferencePlan.default_for(1, 2, halo=4, tile_size=64, z_context=1)
    stack = em_stack(z=4, h=32, w=32)
    report = export_bioimageio(
        model, p, stack, tmp_path / "pkg", voxel_size_nm=[4.0], weight_formats=["keras_v3"]
    )
    assert report.test_input_shape == [1, 32, 32, 3] and report.source_slice in (1, 2)
    test_input = np.load(tmp_path / "pkg" / "test_input.npy")
    z = report.source_slice
    np.testing.assert_array_equal(test_input[0], np.moveaxis(stack[z - 1 : z + 2], 0, -1))
    descr = load_description(tmp_path / "pkg" / "rdf.yaml")
    assert [str(c) for c in descr.inputs[0].axes[3].channel_names] == ["z_m1", "z", "z_p1"]


def test_export_multiclass_folder_passes_bioimageio_core(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import keras

    from mitoseg.config import ModelConfig
    from mitoseg.export.bioimageio import export_bioimageio
    from mitoseg.export.check import check_package
    from mitoseg.model.unet import build_unet

    keras.utils.set_random_seed(0)
    model = build_unet(ModelConfig(depth=1, base_filters=2, batch_norm=False, dropout=0), 3)
    names = ["background", "membrane", "mitochondria"]
    p = InferencePlan.default_for(3, 2, names, halo=4, tile_size=64, voxel_size_nm=[50, 4, 4])
    out = tmp_path / "pkg"
    export_bioimageio(model, p, em_stack(z=1, h=32, w=32), out, weight_formats=["keras_v3"])
    probs = np.load(out / "test_output.npy")
    assert probs.shape == (1, 32, 32, 3)
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, atol=1e-5)  # softmax, not applied
    assert "argmax over the channels" in (out / "README.md").read_text()
    monkeypatch.setenv("KERAS_BACKEND", "tensorflow")
    (check,) = check_package(out)
    assert (check.weight_format, check.status, check.errors) == ("keras_v3", "passed", [])
    from bioimageio.spec import load_description

    descr = load_description(out)
    assert [str(c) for c in descr.outputs[0].axes[3].channel_names] == names
