"""Tests of mitoseg.data.patches: exact patch round trip, slice split, patch dataset."""

from __future__ import annotations

import json
import shutil
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest

from mitoseg.config import VNC_CLASSES, BaseConfig, PatchifyConfig
from mitoseg.data.patches import (
    PatchGrid,
    make_patch_dataset,
    map_mask_to_classes,
    network_inputs,
    patch_grid,
    patchify_slice,
    patchify_stack,
    split_slices,
    to_uint8,
    unpatchify_slice,
    unpatchify_stack,
)
from mitoseg.inference.plan import context_window
from mitoseg.io import DataError, read_stack, write_stack

SAMPLE = Path(str(files("mitoseg") / "sample_data" / "vnc"))
FILES = ["meta.json", "train_images.npy", "train_masks.npy", "val_images.npy", "val_masks.npy"]

# ---------------------------------------------------------------------------------------
# grid and exact round trip
# ---------------------------------------------------------------------------------------


def test_patch_grid_pads_to_step_grid() -> None:
    g = patch_grid((70, 45), 32, 32, "reflect")
    assert g.grid == (3, 2)
    assert g.padded_shape == (96, 64)
    assert g.padding == ((0, 26), (0, 19))
    assert g.patches_per_slice == 6
    assert g.to_dict()["padding"] == [[0, 26], [0, 19]]
    overlap = patch_grid((100, 77), 32, 20)
    # P + (n - 1) * S >= size: 32 + 4 * 20 = 112 >= 100, 32 + 3 * 20 = 92 >= 77
    assert overlap.grid == (5, 4) and overlap.padded_shape == (112, 92)
    exact = patch_grid((64, 96), 32, 32)
    assert exact.padding == ((0, 0), (0, 0)) and exact.grid == (2, 3)
    tiny = patch_grid((20, 10), 32, 8)
    assert tiny.grid == (1, 1) and tiny.padded_shape == (32, 32)


@pytest.mark.parametrize(
    ("shape", "patch", "step"),
    [
        ((64, 96), 32, 32),  # multiple of the patch size
        ((70, 45), 32, 32),  # not a multiple: padded
        ((64, 64), 32, 16),  # overlapping, on the grid
        ((100, 77), 32, 20),  # overlapping and padded
        ((20, 10), 32, 8),  # smaller than one patch
        ((33, 65), 16, 5),  # step not dividing the patch
    ],
)
@pytest.mark.parametrize("pad_mode", ["reflect", "constant", "edge"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_round_trip_is_exact(
    shape: tuple[int, int], patch: int, step: int, pad_mode: str, dtype: type
) -> None:
    rng = np.random.default_rng(sum(shape) + patch + step)
    image = (rng.random(shape) * 1000).astype(dtype)
    patches, grid = patchify_slice(image, patch, step, pad_mode)
    assert patches.shape == (*grid.grid, patch, patch)
    assert patches.dtype == image.dtype
    back = unpatchify_slice(patches, grid)
    assert back.dtype == image.dtype
    np.testing.assert_array_equal(back, image)
    flat = patches.reshape(-1, patch, patch)
    np.testing.assert_array_equal(unpatchify_slice(flat, grid), image)


@pytest.mark.parametrize("pad_mode", ["reflect", "constant", "edge"])
def test_patches_are_windows_of_the_padded_slice(pad_mode: str) -> None:
    image = np.arange(30 * 41, dtype=np.int32).reshape(30, 41)
    patches, grid = patchify_slice(image, 16, 12, pad_mode)
    padded = np.pad(image, grid.padding, mode=pad_mode)
    assert padded.shape == grid.padded_shape == (40, 52)
    for i in range(grid.grid[0]):
        for j in range(grid.grid[1]):
            np.testing.assert_array_equal(
                patches[i, j], padded[i * 12 : i * 12 + 16, j * 12 : j * 12 + 16]
            )
    if pad_mode == "constant":
        assert (patches[-1, -1][-(40 - 30) :, :] == 0).all()
    if pad_mode == "edge":
        assert (patches[-1, 0][-1] == image[-1, :16]).all()


def test_stack_round_trip_and_order() -> None:
    stack = np.random.default_rng(3).integers(0, 65535, size=(4, 50, 70), dtype=np.uint16)
    patches, grid = patchify_stack(stack, 32, 24, "reflect")
    n = grid.patches_per_slice
    assert patches.shape == (4 * n, 32, 32)
    slice2, _ = patchify_slice(stack[2], 32, 24, "reflect")
    np.testing.assert_array_equal(patches[2 * n : 3 * n], slice2.reshape(n, 32, 32))
    np.testing.assert_array_equal(unpatchify_stack(patches, grid), stack)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: patch_grid((64, 64), 16, 17), r"step \(17\) must not exceed patch_size \(16\)"),
        (lambda: patch_grid((64, 64), 0, 1), "patch_size and step must be >= 1, got 0 and 1"),
        (lambda: patch_grid((0, 64), 16, 16), r"slice shape must be \(H, W\) with H, W >= 1"),
        (
            lambda: patch_grid((64, 64), 16, 16, "wrap"),
            "pad_mode must be one of reflect, constant, edge, got 'wrap'",
        ),
        (
            lambda: patchify_slice(np.zeros((2, 8, 8)), 4, 4),
            r"^patchify_slice: expected \(H, W\), got shape \(2, 8, 8\)$",
        ),
        (
            lambda: patchify_stack(np.zeros((8, 8)), 4, 4),
            r"^patchify_stack: expected \(Z, H, W\), got shape \(8, 8\)$",
        ),
        (
            lambda: unpatchify_slice(np.zeros((3, 4, 4)), patch_grid((8, 8), 4, 4)),
            r"unpatchify_slice: patches of shape \(3, 4, 4\) do not match the grid "
            r"\(2, 2, 4, 4\)",
        ),
        (
            lambda: unpatchify_stack(np.zeros((5, 4, 4)), patch_grid((8, 8), 4, 4)),
            r"unpatchify_stack: patches of shape \(5, 4, 4\) are not \(Z \* 4, 4, 4\)",
        ),
    ],
    ids=["step", "size", "shape", "pad-mode", "slice-3d", "stack-2d", "unpatch", "unstack"],
)
def test_patch_errors(call: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()  # type: ignore[operator]


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def test_split_slices_deterministic_disjoint_complete() -> None:
    train, val = split_slices(15, 0.25, seed=42)
    assert (train, val) == split_slices(15, 0.25, seed=42)
    assert len(val) == 4 and len(train) == 11
    assert set(train).isdisjoint(val)
    assert sorted(train + val) == list(range(15))
    assert train == sorted(train) and val == sorted(val)
    others = {tuple(split_slices(15, 0.25, seed=s)[1]) for s in range(10)}
    assert len(others) > 1


@pytest.mark.parametrize(
    ("n", "fraction", "n_val"),
    [(3, 0.1, 1), (2, 0.9, 1), (1, 0.5, 0), (10, 0.0, 0), (10, 0.3, 3), (4, 0.99, 3)],
)
def test_split_slices_counts(n: int, fraction: float, n_val: int) -> None:
    train, val = split_slices(n, fraction, seed=0)
    assert len(val) == n_val
    assert len(train) == n - n_val >= 1


@pytest.mark.parametrize(
    ("n", "fraction", "message"),
    [
        (0, 0.2, "split_slices: need at least 1 slice, got 0"),
        (5, 1.0, r"split_slices: val_fraction must be in \[0, 1\), got 1.0"),
        (5, -0.1, r"split_slices: val_fraction must be in \[0, 1\), got -0.1"),
    ],
)
def test_split_slices_errors(n: int, fraction: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        split_slices(n, fraction, seed=0)


def test_map_mask_to_classes() -> None:
    binary = BaseConfig().value_to_index()
    m = np.array([[0, 255], [255, 0]], dtype=np.uint8)
    np.testing.assert_array_equal(map_mask_to_classes(m, binary), [[0, 1], [1, 0]])
    np.testing.assert_array_equal(map_mask_to_classes(m // 255, binary), [[0, 1], [1, 0]])
    vnc = BaseConfig(classes=VNC_CLASSES).value_to_index()
    labels = np.array([[255, 0, 32], [159, 191, 223]], dtype=np.uint16)
    out = map_mask_to_classes(labels, vnc)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[0, 1, 1], [2, 3, 4]])
    with pytest.raises(DataError) as info:
        map_mask_to_classes(np.array([[0, 128, 7]]), binary, where="x.tif slice 3")
    assert str(info.value) == (
        "x.tif slice 3: mask values [7, 128] are not in the class table base.classes "
        "(allowed values: 0, 1, 255)"
    )


def test_to_uint8() -> None:
    img = np.random.default_rng(0).integers(100, 4000, size=(40, 40), dtype=np.uint16)
    out = to_uint8(img)
    assert out.dtype == np.uint8 and out.shape == (40, 40)
    assert out.min() == 0 and out.max() == 255
    assert (to_uint8(np.full((8, 8), 9, dtype=np.uint8)) == 0).all()


# ---------------------------------------------------------------------------------------
# the patch dataset
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample_patches(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """Patch dataset of the bundled sample's TRAIN split (binary), default patchify config."""
    tmp = tmp_path_factory.mktemp("patches")
    raw = tmp / "raw"
    (raw / "train").mkdir(parents=True)
    for name in ("images.tif", "masks.tif"):
        shutil.copy(SAMPLE / "train" / name, raw / "train" / name)
    # no test split at all: patchify must not read it
    meta = make_patch_dataset(raw, tmp / "out", BaseConfig(), PatchifyConfig(), seed=42)
    return raw, tmp / "out", meta


def test_patch_dataset_files_and_meta(sample_patches: tuple[Path, Path, dict]) -> None:
    _raw, out, meta = sample_patches
    assert sorted(p.name for p in out.iterdir()) == FILES
    assert json.loads((out / "meta.json").read_text()) == meta
    train, val = split_slices(15, 0.25, seed=42)
    assert meta["train_slices"] == train and meta["val_slices"] == val
    assert meta["slice_shape"] == [512, 768] and meta["padded_shape"] == [512, 768]
    assert meta["patches_per_slice"] == 6
    assert (meta["patch_size"], meta["step"], meta["pad_mode"]) == (256, 256, "reflect")
    assert meta["n_classes"] == 2 and meta["class_names"] == ["background", "mitochondria"]
    assert meta["n_train_patches"] == 66 and meta["n_val_patches"] == 24
    for name, n in [("train", 66), ("val", 24)]:
        images = np.load(out / f"{name}_images.npy")
        masks = np.load(out / f"{name}_masks.npy")
        assert images.shape == masks.shape == (n, 256, 256)
        assert images.dtype == masks.dtype == np.uint8
        assert set(np.unique(masks).tolist()) == {0, 1}
        assert meta["foreground_fraction"][name] == pytest.approx(float(masks.mean()))
        assert 0.05 < meta["foreground_fraction"][name] < 0.15


def test_patch_dataset_content_matches_whole_slices(
    sample_patches: tuple[Path, Path, dict],
) -> None:
    raw, out, meta = sample_patches
    images = read_stack(raw / "train" / "images.tif")
    masks = read_stack(raw / "train" / "masks.tif")
    grid = patch_grid((512, 768), 256, 256)
    val_images = np.load(out / "val_images.npy")
    val_masks = np.load(out / "val_masks.npy")
    for k, z in enumerate(meta["val_slices"]):
        sl = slice(k * 6, (k + 1) * 6)
        np.testing.assert_array_equal(unpatchify_slice(val_images[sl], grid), to_uint8(images[z]))
        np.testing.assert_array_equal(unpatchify_slice(val_masks[sl], grid), masks[z] // 255)
    train_images = np.load(out / "train_images.npy")
    z0 = meta["train_slices"][0]
    np.testing.assert_array_equal(unpatchify_slice(train_images[:6], grid), to_uint8(images[z0]))


def _small_raw(root: Path, masks: np.ndarray | None = None) -> Path:
    rng = np.random.default_rng(5)
    write_stack(root / "train" / "images.tif", rng.integers(0, 4096, (4, 70, 90), dtype=np.uint16))
    if masks is None:
        masks = np.zeros((4, 70, 90), dtype=np.uint8)
        masks[:, 5:25, 10:40] = 255
    write_stack(root / "train" / "masks.tif", masks)
    return root


def test_patch_dataset_non_multiple_overlapping(tmp_path: Path) -> None:
    raw = _small_raw(tmp_path / "raw")
    cfg = PatchifyConfig(patch_size=32, step=16, val_fraction=0.25, pad_mode="edge")
    meta = make_patch_dataset(raw, tmp_path / "out", BaseConfig(), cfg, seed=1)
    assert meta["padded_shape"] == [80, 96]
    assert meta["patches_per_slice"] == 4 * 5
    assert len(meta["val_slices"]) == 1 and len(meta["train_slices"]) == 3
    train = np.load(tmp_path / "out" / "train_images.npy")
    assert train.shape == (60, 32, 32)
    grid = patch_grid((70, 90), 32, 16, "edge")
    images = read_stack(raw / "train" / "images.tif")
    z = meta["train_slices"][1]
    np.testing.assert_array_equal(unpatchify_slice(train[20:40], grid), to_uint8(images[z]))
    again = make_patch_dataset(raw, tmp_path / "out2", BaseConfig(), cfg, seed=1)
    assert again["val_slices"] == meta["val_slices"]
    assert np.array_equal(
        np.load(tmp_path / "out2" / "val_masks.npy"), np.load(tmp_path / "out" / "val_masks.npy")
    )


def test_patch_dataset_no_validation(tmp_path: Path) -> None:
    raw = _small_raw(tmp_path / "raw")
    cfg = PatchifyConfig(patch_size=64, step=64, val_fraction=0.0)
    meta = make_patch_dataset(raw, tmp_path / "out", BaseConfig(), cfg, seed=0)
    assert meta["val_slices"] == [] and meta["n_val_patches"] == 0
    assert np.load(tmp_path / "out" / "val_images.npy").shape == (0, 64, 64)
    assert meta["foreground_fraction"]["val"] == 0.0


def test_patch_dataset_multiclass_labels(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    (raw / "train").mkdir(parents=True)
    shutil.copy(SAMPLE / "train" / "images.tif", raw / "train" / "images.tif")
    shutil.copy(SAMPLE / "train" / "labels.tif", raw / "train" / "masks.tif")
    base = BaseConfig(classes=VNC_CLASSES)
    cfg = PatchifyConfig(patch_size=256, step=256, val_fraction=0.2)
    meta = make_patch_dataset(raw, tmp_path / "out", base, cfg, seed=7)
    assert meta["n_classes"] == 5 and meta["class_names"] == list(VNC_CLASSES)
    masks = np.load(tmp_path / "out" / "train_masks.npy")
    assert set(np.unique(masks).tolist()) == {0, 1, 2, 3, 4}
    assert 0.15 < meta["foreground_fraction"]["train"] < 0.35


def test_patch_dataset_bad_mask_keeps_previous_output(tmp_path: Path) -> None:
    masks = np.zeros((4, 70, 90), dtype=np.uint8)
    masks[2, 3, 3] = 128
    raw = _small_raw(tmp_path / "raw", masks)
    out = tmp_path / "out"
    out.mkdir()
    (out / "meta.json").write_text("previous")
    cfg = PatchifyConfig(patch_size=32, step=32)
    with pytest.raises(DataError) as info:
        make_patch_dataset(raw, out, BaseConfig(), cfg, seed=0)
    assert str(info.value) == (
        f"{raw}/train/masks.tif slice 2: mask values [128] are not in the class table "
        "base.classes (allowed values: 0, 1, 255)"
    )
    assert [p.name for p in out.iterdir()] == ["meta.json"]
    assert (out / "meta.json").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw"]


def test_patch_dataset_missing_masks(tmp_path: Path) -> None:
    raw = _small_raw(tmp_path / "raw")
    (raw / "train" / "masks.tif").unlink()
    message = r"train/masks\.tif: mask stack not found for split 'train'"
    with pytest.raises(DataError, match=message):
        make_patch_dataset(raw, tmp_path / "out", BaseConfig(), PatchifyConfig(), seed=0)
    assert not (tmp_path / "out").exists()


def test_patchgrid_is_frozen() -> None:
    g = patch_grid((10, 10), 16, 16)
    assert isinstance(g, PatchGrid)
    with pytest.raises(AttributeError):
        g.step = 3  # type: ignore[misc]


# ---------------------------------------------------------------------------------------
# 2.5D patches (patchify.z_context)
# ---------------------------------------------------------------------------------------


def test_25d_patches_hold_the_neighbouring_slices_as_channels(tmp_path: Path) -> None:
    raw = _small_raw(tmp_path / "raw")
    cfg = PatchifyConfig(patch_size=32, step=32, val_fraction=0.25, z_context=1)
    meta = make_patch_dataset(raw, tmp_path / "out", BaseConfig(), cfg, seed=3)
    assert meta["z_context"] == 1
    # the validation slices are one block, so each keeps its true neighbours there
    assert len(meta["val_slices"]) == 1
    images = read_stack(raw / "train" / "images.tif")
    grid = patch_grid((70, 90), 32, 32)
    n = grid.patches_per_slice
    for split in ("train", "val"):
        patches = np.load(tmp_path / "out" / f"{split}_images.npy")
        masks = np.load(tmp_path / "out" / f"{split}_masks.npy")
        slices = meta[f"{split}_slices"]
        assert patches.shape == (n * len(slices), 32, 32, 3) and masks.shape == patches.shape[:3]
        for k, z in enumerate(slices):
            for c, source in enumerate(context_window(z, 4, 1)):
                got = unpatchify_slice(patches[k * n : (k + 1) * n, ..., c], grid)
                np.testing.assert_array_equal(got, to_uint8(images[source]))
    assert np.array_equal(
        network_inputs(images, meta["val_slices"], 1)[0],
        np.stack([to_uint8(images[s]) for s in context_window(meta["val_slices"][0], 4, 1)], -1),
    )
    assert network_inputs(images, [0, 2]).shape == (2, 70, 90)


@pytest.mark.parametrize(("n", "fraction", "seed"), [(20, 0.25, 0), (20, 0.25, 7), (4, 0.5, 1)])
def test_split_slices_validation_is_one_block(n: int, fraction: float, seed: int) -> None:
    train, val = split_slices(n, fraction, seed=seed)
    assert val == list(range(val[0], val[0] + len(val)))
    assert sorted(train + val) == list(range(n))
