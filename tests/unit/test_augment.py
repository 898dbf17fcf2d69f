"""Augmentation invariants, preview and the augment stage script."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from mitoseg.augment import (
    augment_pair,
    augment_spec,
    is_identity,
    measure_augment_cost,
    read_augment_spec,
    select_preview,
    write_preview,
)
from mitoseg.config import AugmentConfig
from mitoseg.io import DataError

REPO = Path(__file__).resolve().parents[2]
OFF = AugmentConfig(
    rotation_deg=0,
    shift_fraction=0,
    zoom_range=0,
    shear_deg=0,
    hflip=False,
    vflip=False,
    elastic_prob=0,
    brightness=0,
    contrast=0,
    gamma=0,
    noise_std=0,
    blur_prob=0,
)
STRONG = AugmentConfig(elastic_prob=1.0, blur_prob=1.0, noise_std=0.05)


def _pair(size: int = 64, labels: tuple[int, ...] = (1,), seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    mask = np.zeros((size, size), np.uint8)
    for label in labels:
        cy, cx = rng.uniform(12, size - 12, 2)
        mask[((yy - cy) / 9) ** 2 + ((xx - cx) / 6) ** 2 < 1] = label
    image = np.clip(rng.normal(0.3, 0.05, (size, size)) + 0.5 * (mask > 0), 0, 1)
    return image.astype(np.float32), mask


@pytest.mark.parametrize("labels", [(1,), (1, 3, 4)])
@pytest.mark.parametrize("cfg", [AugmentConfig(), STRONG], ids=["default", "strong"])
def test_mask_keeps_original_labels_and_image_range(labels, cfg):
    image, mask = _pair(labels=labels)
    original = set(np.unique(mask).tolist())
    rng = np.random.default_rng(1)
    changed = 0
    for _ in range(10):
        out_img, out_mask = augment_pair(image, mask, rng, cfg)
        assert out_mask.dtype == np.uint8 and out_mask.shape == mask.shape
        assert set(np.unique(out_mask).tolist()) <= original
        assert out_img.dtype == np.float32 and out_img.shape == image.shape
        assert out_img.min() >= 0.0 and out_img.max() <= 1.0
        changed += not np.array_equal(out_mask, mask)
    assert changed >= 8  # the geometry really changes


def test_reproducible_with_seed_and_differs_across_seeds():
    image, mask = _pair()
    a = augment_pair(image, mask, np.random.default_rng(7), STRONG)
    b = augment_pair(image, mask, np.random.default_rng(7), STRONG)
    c = augment_pair(image, mask, np.random.default_rng(8), STRONG)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_identity_when_all_strengths_zero():
    image, mask = _pair()
    assert is_identity(OFF) and not is_identity(AugmentConfig())
    out_img, out_mask = augment_pair(image, mask, np.random.default_rng(0), OFF)
    np.testing.assert_array_equal(out_img, image)
    np.testing.assert_array_equal(out_mask, mask)


def test_flips_only_are_exact_flips():
    image, mask = _pair()
    cfg = OFF.model_copy(update={"hflip": True, "vflip": True})
    flips = [(image, mask)] + [
        (np.flip(image, ax), np.flip(mask, ax)) for ax in ((0,), (1,), (0, 1))
    ]
    for seed in range(8):
        out_img, out_mask = augment_pair(image, mask, np.random.default_rng(seed), cfg)
        assert any(np.array_equal(out_img, fi) and np.array_equal(out_mask, fm) for fi, fm in flips)


def test_affine_mask_follows_image():
    """Image and mask get the same geometry: the bright region stays on the foreground."""
    image, mask = _pair(size=96)
    cfg = OFF.model_copy(update={"rotation_deg": 90, "shear_deg": 10, "zoom_range": 0.2})
    out_img, out_mask = augment_pair(image, mask, np.random.default_rng(3), cfg)
    assert not np.array_equal(out_mask, mask)
    assert out_img[out_mask == 1].mean() > out_img[out_mask == 0].mean() + 0.3


def test_intensity_only_leaves_mask_alone():
    image, mask = _pair()
    cfg = OFF.model_copy(update={"brightness": 0.2, "contrast": 0.3, "gamma": 0.3})
    out_img, out_mask = augment_pair(image, mask, np.random.default_rng(0), cfg)
    np.testing.assert_array_equal(out_mask, mask)
    assert not np.allclose(out_img, image)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda image, mask: (image[None, ..., None], mask),
            r"^augment_pair: expected \(H, W, C\) or \(H, W\), got shape \(1, 64, 64, 1\)$",
        ),
        (
            lambda image, mask: (image, mask[:, :63]),
            r"^augment_pair: mask shape \(64, 63\) differs from image shape \(64, 64\)$",
        ),
        (
            lambda image, mask: (image, mask.astype(np.float32)),
            r"^augment_pair: mask must hold integer class indices, got float32$",
        ),
    ],
)
def test_augment_pair_errors(change: Callable, message: str) -> None:
    image, mask = change(*_pair())
    with pytest.raises(ValueError, match=message):
        augment_pair(image, mask, np.random.default_rng(0), OFF)


def test_augment_spec_roundtrip_and_errors(tmp_path):
    path = tmp_path / "augment.json"
    cfg = AugmentConfig(rotation_deg=45)
    path.write_text(json.dumps(augment_spec(cfg, 5)))
    assert read_augment_spec(path) == (cfg, 5)
    with pytest.raises(DataError, match=r"missing\.json: augment spec not found$"):
        read_augment_spec(tmp_path / "missing.json")
    path.write_text("{")
    with pytest.raises(DataError, match=r"augment\.json: not valid JSON"):
        read_augment_spec(path)
    path.write_text(json.dumps({"seed": 1}))
    with pytest.raises(DataError, match="expected keys 'augment' and 'seed'"):
        read_augment_spec(path)
    path.write_text(json.dumps({"seed": 1, "augment": {"rotation_deg": 500}}))
    with pytest.raises(
        DataError,
        match=r"invalid augment config: augment\.rotation_deg: Input should be less than or "
        r"equal to 180$",
    ):
        read_augment_spec(path)
    path.write_text(json.dumps({"seed": "x", "augment": {}}))
    with pytest.raises(DataError, match="seed must be an integer, got 'x'"):
        read_augment_spec(path)


def test_select_preview_prefers_foreground():
    masks = np.zeros((10, 8, 8), np.uint8)
    masks[[2, 5, 7], 3, 3] = 1
    idx = select_preview(masks, 3, seed=0)
    assert idx.tolist() == [2, 5, 7]
    assert len(select_preview(masks, 20, seed=0)) == 10
    with pytest.raises(ValueError, match="select_preview: n must be >= 1, got 0"):
        select_preview(masks, 0, seed=0)
    with pytest.raises(
        ValueError, match=r"^select_preview: expected a non-empty array, got shape \(0, 8, 8\)$"
    ):
        select_preview(masks[:0], 1, seed=0)
    with pytest.raises(
        ValueError, match=r"^select_preview: expected \(N, H, W\), got shape \(8, 8\)$"
    ):
        select_preview(masks[0], 1, seed=0)


def test_write_preview_png(tmp_path):
    pairs = [_pair(seed=s) for s in range(2)]
    images = np.stack([(p[0] * 255).astype(np.uint8) for p in pairs])
    masks = np.stack([p[1] for p in pairs])
    out = tmp_path / "sub" / "preview.png"
    write_preview(images, masks, AugmentConfig(), 0, out)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    out2 = tmp_path / "again.png"
    write_preview(images, masks, AugmentConfig(), 0, out2)
    assert out2.read_bytes() == data  # same seed, same figure
    with pytest.raises(
        ValueError, match=r"^write_preview: expected \(N, H, W\), got shape \(64, 64\)$"
    ):
        write_preview(images[0], masks[0], AugmentConfig(), 0, out)
    with pytest.raises(
        ValueError, match=r"masks shape \(1, 64, 64\) differs from images shape \(2, 64, 64\)"
    ):
        write_preview(images, masks[:1], AugmentConfig(), 0, out)


def test_cost_is_small():
    image, mask = _pair(size=128)
    images = (np.stack([image] * 2) * 255).astype(np.uint8)
    ms = measure_augment_cost(images, np.stack([mask] * 2), AugmentConfig(), 0, n=10)
    # A 128x128 sample costs ~1 ms on one core; a CPU training step of the default
    # model takes hundreds. Generous bound for a shared, loaded test machine.
    assert 0 < ms < 100


def _write_params(tmp_path: Path) -> Path:
    params = tmp_path / "params.yaml"
    params.write_text("base:\n  seed: 3\naugment:\n  rotation_deg: 30\n  preview_samples: 2\n")
    return params


def test_augment_stage_script(tmp_path):
    patches = tmp_path / "patches"
    patches.mkdir()
    pairs = [_pair(seed=s) for s in range(3)]
    np.save(patches / "train_images.npy", np.stack([(p[0] * 255).astype(np.uint8) for p in pairs]))
    np.save(patches / "train_masks.npy", np.stack([p[1] for p in pairs]))
    (patches / "meta.json").write_text(json.dumps({"n_classes": 2}))
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "pipelines" / "augment.py"), "--patches", str(patches)]
    cmd += ["--out", str(out), "--params", str(_write_params(tmp_path))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "ms per 64x64 sample" in proc.stdout
    cfg, seed = read_augment_spec(out / "augment.json")
    assert seed == 3 and cfg.rotation_deg == 30 and cfg.preview_samples == 2
    assert (out / "preview.png").read_bytes()[:4] == b"\x89PNG"


def test_augment_stage_script_missing_patches(tmp_path):
    cmd = [sys.executable, str(REPO / "pipelines" / "augment.py"), "--patches"]
    cmd += [str(tmp_path / "nope"), "--out", str(tmp_path / "out")]
    cmd += ["--params", str(_write_params(tmp_path))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "nope/train_images.npy: file not found (run the patchify stage first)" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("elastic", [False, True])
def test_channels_of_a_25d_patch_get_the_same_geometry(elastic: bool) -> None:
    """Every channel of a 2.5D patch moves exactly as a 2D image with the same draw."""
    image, mask = _pair(size=96)
    stack = np.stack([image, image * 0.5, 1.0 - image], axis=-1)
    cfg = OFF.model_copy(
        update={"rotation_deg": 90, "shear_deg": 10, "elastic_prob": float(elastic)}
    )
    out, out_mask = augment_pair(stack, mask, np.random.default_rng(5), cfg)
    ref, ref_mask = augment_pair(image, mask, np.random.default_rng(5), cfg)
    assert out.shape == (96, 96, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out_mask, ref_mask)
    np.testing.assert_allclose(out[..., 0], ref, atol=1e-6)
    np.testing.assert_allclose(out[..., 2], 1.0 - ref, atol=1e-5)
