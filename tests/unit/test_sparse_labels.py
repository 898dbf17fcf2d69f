"""Sparse labels end to end: the crop sampler, patch loading, the slice split, the patch
dataset and the validate table honour the ignore label, and a tiny model trains on a
stack where only 2 slices are labelled."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mitoseg.config import AugmentConfig, BaseConfig, PatchifyConfig, resolve_train_config
from mitoseg.data.patches import make_patch_dataset, split_slices
from mitoseg.data.validate import slice_table
from mitoseg.io import DataError, write_stack
from mitoseg.labels import IGNORE_INDEX
from mitoseg.train import train_model
from mitoseg.train_data import CropSampler, load_patches

X = IGNORE_INDEX
#: raw masks: 0 background, 255 mitochondria, 128 unlabelled
SPARSE = BaseConfig(classes={"background": 0, "mitochondria": 255}, ignore_value=128)


def test_sampler_never_visits_patches_without_labels() -> None:
    # patch i is filled with intensity 10 * i; patch 1 has no labelled pixel
    images = np.stack([np.full((16, 16), 10 * i, np.uint8) for i in range(3)])
    masks = np.zeros((3, 16, 16), np.uint8)
    masks[1] = X
    s = CropSampler(images, masks, None, 0.0, None, 3, samples_per_epoch=2)
    for epoch in range(3):
        seen = sorted(int(np.rint(s.sample(epoch * 2 + i)[0][0, 0, 0] * 255)) for i in range(2))
        assert seen == [0, 20]  # patches 0 and 2, each once per epoch


def test_sampler_uniform_crops_always_hold_labels() -> None:
    # 32 x 32 patches labelled only in one 4 x 4 corner (patch 0) or one pixel (patch 1,
    # so a uniform 8 x 8 crop almost never holds it: the crop is centred on it instead)
    images = np.zeros((2, 32, 32), np.uint8)
    masks = np.full((2, 32, 32), X, np.uint8)
    masks[0, :4, :4] = 0
    masks[1, 31, 31] = 1
    s = CropSampler(images, masks, 8, 0.0, None, 3, samples_per_epoch=4)
    crops = [s.sample(k)[1][..., 0] for k in range(40)]
    assert all((c != X).any() for c in crops)
    assert sum((c == 1).any() for c in crops) == 20  # every visit of patch 1


def test_sampler_centres_only_on_labelled_foreground() -> None:
    # unlabelled everywhere but a 4 x 4 mitochondrion at rows/cols 20-23: every
    # foreground-centred 8 x 8 crop has it at its centre (an unlabelled pixel never is)
    images = np.zeros((1, 48, 48), np.uint8)
    masks = np.full((1, 48, 48), X, np.uint8)
    masks[0, 20:24, 20:24] = 1
    s = CropSampler(images, masks, 8, 1.0, None, 3, samples_per_epoch=4)
    assert all(s.sample(k)[1][4, 4, 0] == 1 for k in range(16))


def test_sampler_dark_level_uses_labelled_foreground_only() -> None:
    images = np.full((1, 16, 16), 200, np.uint8)
    masks = np.zeros((1, 16, 16), np.uint8)
    images[0, :4], masks[0, :4] = 100, 1  # labelled mitochondria at 100
    images[0, 8:], masks[0, 8:] = 10, X  # unlabelled dark half
    s = CropSampler(images, masks, 8, 0.0, None, 3, samples_per_epoch=4, hard_negative_prob=0.5)
    assert s.dark_level == 100


def test_sampler_without_any_labelled_patch_fails() -> None:
    masks = np.full((2, 16, 16), X, np.uint8)
    with pytest.raises(
        ValueError, match=r"none of the 2 training patches has a labelled pixel \(all are 255"
    ):
        CropSampler(np.zeros((2, 16, 16), np.uint8), masks, 8, 0.0, None, 3, 4)


def _save_patches(d: Path, masks: np.ndarray) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        np.save(d / f"{split}_images.npy", np.zeros(masks.shape, np.uint8))
        np.save(d / f"{split}_masks.npy", masks)
    return d


def test_load_patches_accepts_the_ignore_index_only(tmp_path: Path) -> None:
    ok = np.array([[[0, 1], [X, 0]]], np.uint8)
    data = load_patches(_save_patches(tmp_path / "ok", ok), 2)
    assert data.train_masks.tolist() == ok.tolist()
    bad = np.array([[[0, 2], [X, 0]]], np.uint8)
    with pytest.raises(DataError, match=r"train_masks\.npy: mask class index 2 >= n_classes \(2\)"):
        load_patches(_save_patches(tmp_path / "bad", bad), 2)


@pytest.mark.parametrize("seed", range(6))
def test_split_with_every_slice_labelled_is_unchanged(seed: int) -> None:
    assert split_slices(9, 0.3, seed, [True] * 9) == split_slices(9, 0.3, seed)


@pytest.mark.parametrize("seed", range(6))
def test_split_places_the_block_on_a_labelled_slice(seed: int) -> None:
    # 6 slices, 1 and 4 labelled, blocks of 2: possible starts 0, 1, 3, 4 (not 2: 2-3)
    flags = [False, True, False, False, True, False]
    train, val = split_slices(6, 0.34, seed, flags)
    assert len(val) == 2 and val[0] in (0, 1, 3, 4)
    assert len(train) == 1 and train[0] in (1, 4) and train[0] not in val
    assert sum(flags[z] for z in val) == 1


@pytest.mark.parametrize(
    ("n", "fraction", "flags", "message"),
    [
        (3, 0.3, [True, True], "split_slices: 2 labelled flags for 3 slices"),
        (3, 0.3, [False, False, False], "split_slices: no slice has a labelled pixel"),
        (
            5,
            0.8,
            [False, True, False, True, False],
            r"split_slices: no block of 4 consecutive slices holds a labelled slice and "
            r"leaves one for training \(labelled slices: \[1, 3\]\)",
        ),
    ],
)
def test_split_errors(n: int, fraction: float, flags: list[bool], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        split_slices(n, fraction, 0, flags)


def test_split_with_one_labelled_slice_has_no_validation() -> None:
    assert split_slices(5, 0.4, 0, [False, False, True, False, False]) == ([2], [])


def _sparse_raw(root: Path, labelled: tuple[int, ...] = (1, 4), n: int = 6) -> Path:
    """Train stack of ``n`` 64 x 64 slices, a bright disc (mitochondrion) in each; only the
    slices ``labelled`` carry labels (the others are all 128, unlabelled); slice 1 is
    labelled only in its top-left 32 x 32 quadrant."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    disc = (yy - 20) ** 2 + (xx - 20) ** 2 < 64
    images = np.clip(rng.normal(80, 10, (n, 64, 64)) + 100 * disc, 0, 255).astype(np.uint8)
    masks = np.full((n, 64, 64), 128, np.uint8)
    for z in labelled:
        masks[z] = np.where(disc, 255, 0)
    if 1 in labelled:
        masks[1, 32:, :] = 128
        masks[1, :, 32:] = 128
    for split in ("train", "test"):
        write_stack(root / split / "images.tif", images)
        write_stack(root / split / "masks.tif", masks)
    (root / "dataset.json").write_text(json.dumps({"source": "synthetic"}))
    return root


def test_patch_dataset_uses_labelled_slices_and_patches_only(tmp_path: Path) -> None:
    raw = _sparse_raw(tmp_path / "raw")
    cfg = PatchifyConfig(patch_size=32, step=32, val_fraction=0.34)
    meta = make_patch_dataset(raw, tmp_path / "p", SPARSE, cfg, seed=0)
    assert meta["labelled_slices"] == [1, 4]
    assert len(meta["val_slices"]) == 2 and len(meta["train_slices"]) == 1
    # slice 1 gives 1 patch (its labelled quadrant), slice 4 gives 4
    n = {1: 1, 4: 4}
    assert meta["n_train_patches"] == n[meta["train_slices"][0]]
    assert meta["n_val_patches"] == n[({1, 4} - set(meta["train_slices"])).pop()]
    for split in ("train", "val"):
        masks = np.load(tmp_path / "p" / f"{split}_masks.npy")
        assert set(np.unique(masks).tolist()) <= {0, 1} and (masks != X).any(axis=(1, 2)).all()
        assert meta["labelled_fraction"][split] == 1.0  # the labelled patches are whole


def test_patch_dataset_partial_slice_keeps_unlabelled_pixels_in_its_patches(
    tmp_path: Path,
) -> None:
    raw = _sparse_raw(tmp_path / "raw", labelled=(1, 2, 4))
    masks = np.full((6, 64, 64), 128, np.uint8)
    masks[[2, 4]] = 0
    masks[1, 10:20, 10:20] = 255  # slice 1: a 10 x 10 labelled square, nothing else
    write_stack(raw / "train" / "masks.tif", masks)
    cfg = PatchifyConfig(patch_size=32, step=32, val_fraction=0.0)
    meta = make_patch_dataset(raw, tmp_path / "p", SPARSE, cfg, seed=0)
    assert meta["train_slices"] == [1, 2, 4] and meta["n_train_patches"] == 1 + 4 + 4
    first = np.load(tmp_path / "p" / "train_masks.npy")[0]
    assert int((first == 1).sum()) == 100 and int((first == X).sum()) == 32 * 32 - 100
    assert meta["foreground_fraction"]["train"] == pytest.approx(100 / (100 + 8 * 32 * 32))


def test_patch_dataset_without_labels_fails(tmp_path: Path) -> None:
    raw = _sparse_raw(tmp_path / "raw", labelled=())
    cfg = PatchifyConfig(patch_size=32, step=32, val_fraction=0.34)
    with pytest.raises(
        DataError,
        match=r"train/masks\.tif: no slice has a labelled pixel \(every mask value is "
        r"base\.ignore_value 128, class index 255\)",
    ):
        make_patch_dataset(raw, tmp_path / "p", SPARSE, cfg, seed=0)


def test_validate_table_counts_classes_over_labelled_pixels(tmp_path: Path) -> None:
    images = np.zeros((2, 4, 4), np.uint8)
    masks = np.full((2, 4, 4), 128, np.uint8)
    masks[1, :2] = 0
    masks[1, 0, 0] = 255  # 8 labelled pixels, 1 of them mitochondria
    table = slice_table(tmp_path, {"train": (images, masks)}, SPARSE)
    assert table["mask_values_allowed"].tolist() == [True, True]
    assert table["foreground_fraction"].tolist() == [0.0, 1 / 8]
    assert table["class_fraction_background"].tolist() == [0.0, 7 / 8]


def test_tiny_model_trains_on_two_labelled_slices(tmp_path: Path) -> None:
    raw = _sparse_raw(tmp_path / "raw", labelled=(1, 4))
    make_patch_dataset(
        raw, tmp_path / "p", SPARSE, PatchifyConfig(patch_size=32, step=32, val_fraction=0.34), 0
    )
    cfg = resolve_train_config(
        {
            "model": {"depth": 2, "base_filters": 4, "dropout": 0.0},
            "crop_size": 16,
            "batch_size": 2,
            "steps_per_epoch": 3,
            "epochs": 2,
        }
    )
    out = tmp_path / "out"
    result = train_model(
        tmp_path / "p", AugmentConfig(), cfg, 2, 0, out, tmp_path / "ck", progress=False
    )
    assert result.model_path.is_file() and result.epochs_run == 2
    losses = [r[k] for r in result.history for k in ("loss", "val_loss")]
    assert all(np.isfinite(v) and v > 0 for v in losses)
    assert all(0.0 <= r["iou"] <= 1.0 for r in result.history)
