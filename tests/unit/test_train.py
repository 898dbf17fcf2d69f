"""Training: patch loading, crop sampler, run key, tiny end-to-end runs, in-process resume."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mitoseg.config import AugmentConfig, resolve_train_config
from mitoseg.io import DataError
from mitoseg.train import (
    HISTORY_COLUMNS,
    backup_id,
    run_key,
    setup_determinism,
    train_model,
    weights_digest,
)
from mitoseg.train_data import CropSampler, load_patches


def make_patches(
    d: Path, n_train: int = 6, n_val: int = 2, size: int = 64, n_classes: int = 2, seed: int = 0
) -> Path:
    """Bright ellipses (classes 1..C-1) on noise: ``{train,val}_{images,masks}.npy``."""
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:size, :size]
    for split, n in (("train", n_train), ("val", n_val)):
        images, masks = [], []
        for _ in range(n):
            m = np.zeros((size, size), np.uint8)
            for c in range(1, n_classes):
                cy, cx = rng.uniform(10, size - 10, 2)
                ry, rx = rng.uniform(4, 10, 2)
                m[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1] = c
            img = np.clip(rng.normal(0.3, 0.08, (size, size)) + 0.2 * m, 0, 1)
            images.append((img * 255).round().astype(np.uint8))
            masks.append(m)
        np.save(d / f"{split}_images.npy", np.array(images, np.uint8).reshape(n, size, size))
        np.save(d / f"{split}_masks.npy", np.array(masks, np.uint8).reshape(n, size, size))
    names = ["background"] + [f"class{c}" for c in range(1, n_classes)]
    (d / "meta.json").write_text(
        json.dumps({"n_classes": n_classes, "class_names": names, "patch_size": size})
    )
    return d


TINY = {
    "model": {"depth": 2, "base_filters": 4, "dropout": 0.0},
    "crop_size": 32,
    "batch_size": 2,
    "steps_per_epoch": 2,
    "epochs": 2,
}

#: ~zero learning rate, no batch norm: val_loss stops improving after epoch 1, so early
#: stopping (patience 1) ends the run after epoch 2.
STALLED = {
    **TINY,
    "epochs": 6,
    "model": {**TINY["model"], "batch_norm": False},
    "learning_rate": 1e-12,
    "early_stopping_patience": 1,
    "keep": "best",
    "lr_schedule": "plateau",
    "min_lr": 0.0,
}


@pytest.fixture(scope="module")
def patches(tmp_path_factory) -> Path:
    return make_patches(tmp_path_factory.mktemp("patches"))


def test_load_patches_ok(patches):
    data = load_patches(patches, 2)
    assert data.train_images.shape == (6, 64, 64) and data.val_masks.shape == (2, 64, 64)
    assert data.patch_size == 64


def test_load_patches_errors(tmp_path):
    with pytest.raises(DataError, match=r"nope: patches directory not found"):
        load_patches(tmp_path / "nope", 2)
    d = make_patches(tmp_path / "p")
    (d / "val_masks.npy").unlink()
    with pytest.raises(DataError, match=r"val_masks\.npy: file not found \(run the patchify"):
        load_patches(d, 2)
    np.save(d / "val_masks.npy", np.zeros((2, 64, 64), np.int32))
    with pytest.raises(
        DataError,
        match=r"val_masks\.npy: expected \(N, P, P\) uint8 patches, got shape "
        r"\(2, 64, 64\) dtype int32",
    ):
        load_patches(d, 2)
    np.save(d / "val_masks.npy", np.zeros((3, 64, 64), np.uint8))
    with pytest.raises(
        DataError, match=r"val_masks\.npy: shape \(3, 64, 64\) differs from val_images\.npy"
    ):
        load_patches(d, 2)
    np.save(d / "val_masks.npy", np.full((2, 64, 64), 2, np.uint8))
    with pytest.raises(DataError, match=r"val_masks\.npy: mask class index 2 >= n_classes \(2\)"):
        load_patches(d, 2)
    np.save(d / "val_images.npy", np.zeros((2, 32, 32), np.uint8))
    np.save(d / "val_masks.npy", np.zeros((2, 32, 32), np.uint8))
    with pytest.raises(
        DataError, match=r"val_images\.npy: patch size 32 differs from train patch size 64"
    ):
        load_patches(d, 2)
    np.save(d / "train_images.npy", np.zeros((0, 64, 64), np.uint8))
    np.save(d / "train_masks.npy", np.zeros((0, 64, 64), np.uint8))
    with pytest.raises(DataError, match=r"train_images\.npy: no training patches"):
        load_patches(d, 2)
    (d / "train_images.npy").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"train_images\.npy: cannot read \.npy array"):
        load_patches(d, 2)


def _sampler(patches: Path, **kw) -> CropSampler:
    data = load_patches(patches, 2)
    args = {
        "crop_size": 32,
        "foreground_crop_prob": 0.0,
        "augment": AugmentConfig(),
        "seed": 1,
        "samples_per_epoch": 6,
    }
    args.update(kw)
    return CropSampler(data.train_images, data.train_masks, **args)


def test_sampler_deterministic_and_shapes(patches):
    a, b = _sampler(patches), _sampler(patches)
    img, mask = a.sample(3)
    assert img.shape == (32, 32, 1) and img.dtype == np.float32
    assert mask.shape == (32, 32, 1) and mask.dtype == np.uint8
    for k in (0, 5, 6, 17):
        np.testing.assert_array_equal(a.sample(k)[0], b.sample(k)[0])
    # Same position in another epoch: a different sample.
    assert not np.array_equal(a.sample(0)[0], a.sample(6)[0])
    full = _sampler(patches, crop_size=None, augment=None)
    assert full.sample(0)[0].shape == (64, 64, 1)


def test_sampler_visits_every_patch_once_per_epoch(patches):
    data = load_patches(patches, 2)
    s = _sampler(patches, augment=None, crop_size=None, samples_per_epoch=6)
    for epoch in range(2):
        seen = sorted(
            int(
                np.flatnonzero(
                    (data.train_images == s.sample(epoch * 6 + i)[0][..., 0] * 255)
                    .reshape(6, -1)
                    .all(axis=1)
                )[0]
            )
            for i in range(6)
        )
        assert seen == list(range(6))


def test_sampler_foreground_crops(patches):
    centred = _sampler(patches, foreground_crop_prob=1.0, augment=None, crop_size=16)
    assert all(centred.sample(k)[1].any() for k in range(24))
    uniform = _sampler(patches, foreground_crop_prob=0.0, augment=None, crop_size=16)
    assert sum(uniform.sample(k)[1].any() for k in range(24)) < 24


def test_sampler_errors(patches):
    with pytest.raises(ValueError, match=r"train\.crop_size \(128\) exceeds the patch size \(64\)"):
        _sampler(patches, crop_size=128)
    with pytest.raises(ValueError, match="samples_per_epoch must be >= 1, got 0"):
        _sampler(patches, samples_per_epoch=0)


def test_run_key_depends_on_config_and_data(tmp_path, patches):
    cfg = resolve_train_config(TINY)
    key = run_key(patches, AugmentConfig(), cfg, 2, 0)
    assert len(key) == 16 and key == run_key(patches, AugmentConfig(), cfg, 2, 0)
    assert key != run_key(patches, AugmentConfig(), cfg, 2, 1)
    assert key != run_key(patches, AugmentConfig(rotation_deg=5), cfg, 2, 0)
    other_cfg = resolve_train_config({**TINY, "learning_rate": 0.01})
    assert key != run_key(patches, AugmentConfig(), other_cfg, 2, 0)
    other_data = make_patches(tmp_path / "other", seed=9)
    assert key != run_key(other_data, AugmentConfig(), cfg, 2, 0)
    assert key != run_key(patches, AugmentConfig(), cfg, 2, 0, init_digest="0" * 16)
    (other_data / "val_masks.npy").unlink()
    with pytest.raises(DataError, match=r"val_masks\.npy: file not found \(run the patchify"):
        run_key(other_data, AugmentConfig(), cfg, 2, 0)


def test_weights_digest_and_backup_id(tmp_path):
    a = [np.zeros((2, 3), np.float32), np.ones(3, np.float32)]
    assert len(weights_digest(a)) == 16 and weights_digest(a) == weights_digest(list(a))
    assert weights_digest(a) != weights_digest([a[0], a[1] * 2])
    assert weights_digest(a) != weights_digest([a[0].reshape(3, 2), a[1]])
    assert backup_id(tmp_path / "ck" / "k").endswith(f":{(tmp_path / 'ck' / 'k').resolve()}")


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == HISTORY_COLUMNS
        return list(reader)


@pytest.mark.parametrize("keep", ["last", "best"])
def test_train_model_end_to_end(tmp_path, patches, keep):
    import keras

    cfg = resolve_train_config({**TINY, "keep": keep})
    out, ck = tmp_path / "out", tmp_path / "ck"
    result = train_model(patches, AugmentConfig(), cfg, 2, 0, out, ck, progress=False)
    assert result.model_path == out / "model.keras" and result.model_path.is_file()
    assert result.epochs_run == 2 and not result.resumed
    assert result.stop_reason == "completed"
    assert result.best_epoch == 2 if keep == "last" else 1 <= result.best_epoch <= 2
    assert result.patches_per_second > 0 and result.train_seconds > 0
    assert [r["epoch"] for r in result.history] == [1, 2]
    assert all(set(r) == set(HISTORY_COLUMNS) for r in result.history)
    rows = _read_csv(out / "history.csv")
    assert len(rows) == 2 and all(rows[0][c] != "" for c in HISTORY_COLUMNS)
    assert all(0.0 <= r[c] <= 1.0 for r in result.history for c in ("accuracy", "val_accuracy"))
    if keep == "best":
        val_losses = [r["val_loss"] for r in result.history]
        assert result.history[result.best_epoch - 1]["val_loss"] == min(val_losses)
    # cosine schedule: the learning rate decreases from the configured value
    assert result.history[0]["lr"] == pytest.approx(cfg.learning_rate)
    assert result.history[1]["lr"] < result.history[0]["lr"]
    assert list(ck.iterdir()) == []  # backup removed after success
    model = keras.saving.load_model(result.model_path)  # no custom objects needed
    assert model.predict(np.zeros((1, 64, 64, 1), np.float32), verbose=0).shape == (1, 64, 64, 1)


def test_train_model_multiclass_plateau_budget_no_val(tmp_path):
    d = make_patches(tmp_path / "p", n_val=0, n_classes=3)
    cfg = resolve_train_config(
        {**TINY, "epochs": 5, "lr_schedule": "plateau", "max_train_seconds": 1e-3, "augment": False}
    )
    out = tmp_path / "out"
    result = train_model(d, AugmentConfig(), cfg, 3, 0, out, tmp_path / "ck", progress=False)
    assert result.epochs_run == 1 and result.stop_reason == "time_budget"
    assert result.best_epoch == 1
    assert result.history[0]["val_loss"] is None and result.history[0]["lr"] == pytest.approx(1e-3)
    assert _read_csv(out / "history.csv")[0]["val_loss"] == ""
    assert 0.0 <= result.history[0]["accuracy"] <= 1.0  # sparse categorical accuracy
    import keras

    model = keras.saving.load_model(out / "model.keras")
    assert model.output_shape == (None, None, None, 3)


def test_train_model_early_stopping_and_extra_callbacks(tmp_path, patches):
    import keras

    seen: list[dict] = []

    class Spy(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append(dict(logs or {}))

    # ~zero learning rate, no batch norm -> val_loss never improves after epoch 1 -> stop
    # after 1 + patience epochs
    cfg = resolve_train_config(STALLED)
    result = train_model(
        patches,
        AugmentConfig(),
        cfg,
        2,
        0,
        tmp_path / "o",
        tmp_path / "ck",
        progress=False,
        callbacks=[Spy()],
    )
    assert result.stop_reason == "early_stopping"
    assert result.epochs_run == 2 and result.best_epoch == 1
    assert len(seen) == result.epochs_run and "lr" in seen[0] and "val_iou" in seen[0]


def test_train_model_errors(tmp_path, patches):
    cfg = resolve_train_config(TINY)
    args = (AugmentConfig(),)
    with pytest.raises(ValueError, match="train_model: n_classes must be >= 2, got 1"):
        train_model(patches, *args, cfg, 1, 0, tmp_path / "o", tmp_path / "c")
    bad = resolve_train_config({**TINY, "crop_size": 34})
    with pytest.raises(
        ValueError, match=r"train\.crop_size \(34\) must be a multiple of 2\*\*model\.depth \(4\)"
    ):
        train_model(patches, *args, bad, 2, 0, tmp_path / "o", tmp_path / "c")
    big = resolve_train_config({**TINY, "crop_size": 128})
    with pytest.raises(ValueError, match=r"train\.crop_size \(128\) exceeds the patch size \(64\)"):
        train_model(patches, *args, big, 2, 0, tmp_path / "o", tmp_path / "c")
    deeper = resolve_train_config({**TINY, "crop_size": None, "model": {"depth": 6}})
    d = make_patches(tmp_path / "p48", size=48)
    with pytest.raises(
        ValueError, match=r"patch size \(48\) must be a multiple of 2\*\*model\.depth \(64\)"
    ):
        train_model(d, *args, deeper, 2, 0, tmp_path / "o", tmp_path / "c")
    with pytest.raises(DataError, match=r"missing: patches directory not found"):
        train_model(tmp_path / "missing", *args, cfg, 2, 0, tmp_path / "o", tmp_path / "c")


class _Interrupt(Exception):
    pass


def _interrupt_after(epoch: int):
    """A callback that raises after the 1-based ``epoch`` (its backup is written)."""
    import keras

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, e, logs=None):
            if e + 1 == epoch:
                raise _Interrupt

    return Interrupt()


# A resumed run equals an uninterrupted one (history, weights, the backup's run key):
# tests/integration/test_train_resume.py, bit for bit, after a SIGKILL, in a fresh process.


def test_train_model_resume_after_stop_runs_no_epoch(tmp_path, patches):
    # ~zero learning rate: epoch 2 does not improve -> patience 1 stops there; the process
    # dies after that epoch's backup: the rerun trains no further epoch
    cfg = resolve_train_config(STALLED)
    args = (patches, AugmentConfig(), cfg, 2, 0, tmp_path / "o", tmp_path / "ck")
    with pytest.raises(_Interrupt):
        train_model(*args, progress=False, callbacks=[_interrupt_after(2)])
    result = train_model(*args, progress=False)
    assert result.resumed and result.epochs_run == 2
    assert result.stop_reason == "early_stopping" and result.best_epoch == 1


def test_train_model_discards_unusable_backup(tmp_path, patches, caplog):
    cfg = resolve_train_config({**TINY, "epochs": 1})
    key = run_key(patches, AugmentConfig(), cfg, 2, 0)
    backup = tmp_path / "ck" / key
    backup.mkdir(parents=True)
    (backup / "training_metadata.json").write_text('{"epoch": 1, "batch": 0}')
    (backup / "latest.weights.h5").write_bytes(b"not weights")
    (backup / "history.csv").write_text("epoch,loss\n1,0.5\n")  # old columns
    result = train_model(
        patches, AugmentConfig(), cfg, 2, 0, tmp_path / "o", tmp_path / "ck", progress=False
    )
    assert not result.resumed and result.epochs_run == 1
    assert "unreadable backup, starting from scratch" in caplog.text


def test_setup_determinism_before_and_after_tensorflow_starts(caplog):
    code = (
        "import tensorflow as tf; from mitoseg.train import setup_determinism as s; "
        "print(s(True), tf.config.threading.get_inter_op_parallelism_threads())"
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.stdout.split() == ["True", "1"], proc.stderr[-2000:]
    assert setup_determinism(False) is False
    import tensorflow as tf
    from tensorflow.python.framework import config as tf_config

    tf.constant(0.0)  # TensorFlow has started in this process
    if tf.config.threading.get_inter_op_parallelism_threads() != 1:
        was = tf_config.is_op_determinism_enabled()
        try:
            assert setup_determinism(True) is False
        finally:
            if not was:
                tf_config.disable_op_determinism()
        assert "training may not be reproducible" in caplog.text


def test_sampler_hard_negative_crops_centre_on_dark_background():
    """Bright background, grey mitochondria (class 1) and one dark bar that is background:
    hard-negative crops are centred on the bar."""
    images = np.full((4, 64, 64), 200, np.uint8)
    masks = np.zeros((4, 64, 64), np.uint8)
    images[:, 5:15, 5:15], masks[:, 5:15, 5:15] = 120, 1
    images[:, 40:44, 20:60] = 30
    s = CropSampler(images, masks, 16, 0.0, None, 1, 8, hard_negative_prob=1.0)
    assert s.dark_level == 120
    for k in range(16):
        img, mask = s.sample(k)
        assert np.rint(img[8, 8, 0] * 255) == 30 and mask[8, 8, 0] == 0
    uniform = CropSampler(images, masks, 16, 0.0, None, 1, 8)
    assert sum(np.rint(uniform.sample(k)[0][8, 8, 0] * 255) == 30 for k in range(16)) < 8


def test_sampler_25d_patches_keep_their_channels(tmp_path):
    d = make_patches(tmp_path / "p", n_train=3, n_val=1)
    for split in ("train", "val"):
        images = np.load(d / f"{split}_images.npy")
        np.save(d / f"{split}_images.npy", np.stack([images, 255 - images, images], -1))
    data = load_patches(d, 2)
    assert data.in_channels == 3
    s = CropSampler(data.train_images, data.train_masks, 32, 0.5, None, 1, 6)
    img, mask = s.sample(2)
    assert img.shape == (32, 32, 3) and mask.shape == (32, 32, 1)
    np.testing.assert_allclose(img[..., 1], 1.0 - img[..., 0], atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"foreground_crop_prob": 0.7, "hard_negative_prob": 0.5}, r"must be in \[0, 1\]"),
    ],
)
def test_sampler_crop_probability_errors(patches, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _sampler(patches, **kwargs)


def test_train_config_crop_probabilities_must_not_exceed_one():
    with pytest.raises(ValueError, match=r"train\.hard_negative_prob \(0\.6\) must not exceed 1"):
        resolve_train_config({"foreground_crop_prob": 0.5, "hard_negative_prob": 0.6})


def test_train_model_25d_builds_a_model_with_context_channels(tmp_path):
    d = make_patches(tmp_path / "p", n_train=3, n_val=1)
    for split in ("train", "val"):
        images = np.load(d / f"{split}_images.npy")
        np.save(d / f"{split}_images.npy", np.stack([images, images, images], -1))
    cfg = resolve_train_config({**TINY, "epochs": 1, "hard_negative_prob": 0.2})
    res = train_model(d, AugmentConfig(), cfg, 2, 0, tmp_path / "out", tmp_path / "ck", False)
    import keras

    model = keras.saving.load_model(res.model_path, compile=False)
    assert model.input_shape[-1] == 3 and model.output_shape[-1] == 1


def test_train_model_warms_up_and_saves_re_estimated_batch_norm(tmp_path, patches):
    """Warm-up over the first steps; the last epoch's (EMA) weights are saved, with
    BatchNorm statistics re-estimated from training batches."""
    import keras

    from mitoseg.model.callbacks import batch_norm_layers

    cfg = resolve_train_config(
        {
            **TINY,
            "epochs": 4,
            "steps_per_epoch": 5,
            "warmup_fraction": 0.25,  # 5 of 20 steps
            "ema_momentum": 0.5,
            "precise_bn_batches": 2,
        }
    )
    assert cfg.keep == "last" and cfg.early_stopping_patience is None
    assert cfg.model.batch_norm
    result = train_model(
        patches, AugmentConfig(), cfg, 2, 0, tmp_path / "o", tmp_path / "ck", progress=False
    )
    lrs = [r["lr"] for r in result.history]
    assert lrs[0] == pytest.approx(cfg.min_lr)  # warm-up starts at min_lr
    assert lrs[1] == pytest.approx(cfg.learning_rate, rel=1e-3)  # the peak after 5 steps
    assert lrs[2] < lrs[1] and lrs[3] < lrs[2]
    assert result.epochs_run == 4 and result.best_epoch == 4
    model = keras.saving.load_model(result.model_path)
    bns = batch_norm_layers(model)
    assert bns
    # BatchNorm statistics left by training would have a momentum-0.99 average close to
    # the initial (0, 1) after 20 steps; the re-estimated ones are the batches' own
    assert not np.allclose(bns[0].moving_variance.numpy(), 1.0, atol=0.05)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"warmup_fraction": 0.5}, "warmup_fraction"),
        ({"ema_momentum": 1.0}, "ema_momentum"),
        ({"clipnorm": 0}, "clipnorm"),
        ({"keep": "first"}, "keep"),
        ({"precise_bn_batches": -1}, "precise_bn_batches"),
        ({"early_stopping_patience": 0}, "early_stopping_patience"),
    ],
)
def test_train_config_stability_fields_are_validated(override, message):
    from mitoseg.config import ConfigError

    with pytest.raises(ConfigError, match=f"train.{message}"):
        resolve_train_config({**TINY, **override})
