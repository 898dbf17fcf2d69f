"""Hard negatives mined from the model's own false positives (mitoseg.model.mining)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from test_train import TINY, make_patches

from mitoseg.config import AugmentConfig, resolve_train_config
from mitoseg.model.mining import HardNegativeMiner, MinedNegatives, false_positive_candidates
from mitoseg.train import train_model
from mitoseg.train_data import CropSampler, mined_lag, sample_stream, stream_lookahead


def test_false_positive_candidates_hand_computed():
    fg = np.array([[[0.9, 0.2], [0.6, 0.7]], [[0.51, 0.5], [0.99, 0.1]]], np.float32)
    masks = np.array([[[0, 0], [1, 255]], [[0, 0], [0, 1]]], np.uint8)
    # background above 0.5: (0,0,0)=0.9 -> 0; (1,0,0)=0.51 -> 4; (1,1,0)=0.99 -> 6;
    # 0.5 itself is not above; class 1 and unlabelled (255) never count
    np.testing.assert_array_equal(false_positive_candidates(fg, masks, 0.5), [0, 4, 6])
    assert false_positive_candidates(fg, masks, 0.95).tolist() == [6]


@pytest.mark.parametrize(
    ("fg_shape", "mask_shape", "threshold", "message"),
    [
        ((2, 4, 4), (2, 4, 5), 0.5, r"foreground \(2, 4, 4\) and masks \(2, 4, 5\) must be"),
        ((4, 4), (4, 4), 0.5, r"foreground \(4, 4\) and masks \(4, 4\) must be the same"),
        ((1, 4, 4), (1, 4, 4), 0.0, r"threshold must be in \(0, 1\), got 0\.0"),
        ((1, 4, 4), (1, 4, 4), 1.0, r"threshold must be in \(0, 1\), got 1\.0"),
    ],
)
def test_false_positive_candidates_errors(fg_shape, mask_shape, threshold, message):
    with pytest.raises(ValueError, match=message):
        false_positive_candidates(
            np.zeros(fg_shape, np.float32), np.zeros(mask_shape, np.uint8), threshold
        )


@pytest.mark.parametrize(
    ("every", "lag", "epoch", "source"),
    [
        (5, 2, 0, None),
        (5, 2, 5, None),  # reads epoch 3 at most: nothing mined yet
        (5, 2, 6, 4),  # the first mining (end of epoch 4) is read from epoch 6
        (5, 2, 10, 4),
        (5, 2, 11, 9),
        (1, 2, 1, None),
        (1, 2, 2, 0),
        (1, 2, 7, 5),
        (3, 1, 3, 2),
    ],
)
def test_source_epoch(every, lag, epoch, source):
    store = MinedNegatives(every, lag)
    assert store.source_epoch(epoch) == source
    if source is not None:
        assert store.scheduled(source) and source <= epoch - lag


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every": 0}, r"every=0, lag=2, timeout_s=900\.0"),
        ({"every": 1, "lag": 0}, r"every=1, lag=0, timeout_s=900\.0"),
        ({"every": 1, "timeout_s": 0}, r"every=1, lag=2, timeout_s=0"),
    ],
)
def test_mined_negatives_errors(kwargs, message):
    with pytest.raises(ValueError, match=r"MinedNegatives: need every >= 1.*" + message):
        MinedNegatives(**kwargs)


def test_for_epoch_waits_for_the_miner_and_times_out_with_the_epochs():
    store = MinedNegatives(1, timeout_s=5)
    threading.Timer(0.2, store.put, (0, np.array([3, 1]))).start()
    t0 = time.perf_counter()
    assert store.for_epoch(2).tolist() == [3, 1]
    assert time.perf_counter() - t0 >= 0.15
    late = MinedNegatives(1, timeout_s=0.1)
    with pytest.raises(TimeoutError, match=r"candidates of epoch 2 \(needed by epoch 4\) did"):
        late.for_epoch(3)
    late.close()  # prefetched past the end: no wait
    assert late.for_epoch(3) is None


@pytest.mark.parametrize(
    ("samples_per_epoch", "batch_size", "lag"),
    [
        (320, 8, 2),  # make run: 40 steps x 8, lookahead 12 + 24 + 1 = 37
        (37, 8, 2),  # an epoch as long as the lookahead
        (36, 8, 3),
        (4, 2, 6),  # 2 steps x 2 (test_train's TINY): lookahead 19 -> 1 + ceil(19 / 4)
        (1, 1, 17),
    ],
)
def test_mining_lag_covers_the_stream_lookahead(samples_per_epoch, batch_size, lag):
    assert stream_lookahead(batch_size) == 12 + 3 * batch_size + 1
    assert mined_lag(samples_per_epoch, batch_size) == lag


@pytest.mark.parametrize(
    ("args", "message"),
    [((0, 8), r"got 0, 8"), ((4, 0), r"got 4, 0")],
)
def test_mining_lag_errors(args, message):
    with pytest.raises(ValueError, match=r"mined_lag: need samples_per_epoch >= 1 .*" + message):
        mined_lag(*args)


def test_bounded_stream_never_runs_further_ahead_than_its_lookahead():
    """What the mining lag rests on: with ``bounded=True`` no element beyond
    ``stream_lookahead`` of the last one consumed is ever computed."""
    seen: list[int] = []
    lock = threading.Lock()

    def sample(k):
        with lock:
            seen.append(int(k))
        time.sleep(0.002)
        return np.full((2,), k, np.float32), np.zeros((1,), np.uint8)

    batch = 3
    stream = sample_stream(sample, 0, batch, ((2,), (1,)), ("float32", "uint8"), bounded=True)
    it = iter(stream)
    for step in range(1, 13):
        x, _ = next(it)
        consumed = step * batch
        assert x.numpy()[:, 0].tolist() == list(range(consumed - batch, consumed))
        time.sleep(0.02)  # give the stream time to run ahead as far as it can
        with lock:
            assert max(seen) < consumed + stream_lookahead(batch), (consumed, max(seen))


def test_save_and_resumed_round_trip(tmp_path):
    store = MinedNegatives(2)
    store.put(1, np.array([5, 9], np.int64))
    store.put(3, np.array([], np.int64))
    store.save(tmp_path / "m.npz")
    again = MinedNegatives.resumed(2, tmp_path / "m.npz")
    assert again.for_epoch(3).tolist() == [5, 9] and again.for_epoch(5).tolist() == []
    assert MinedNegatives.resumed(2, tmp_path / "none.npz").source_epoch(3) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["m.npz"]  # no temporary file left


def test_sampler_centres_hard_negatives_on_mined_pixels():
    """Each patch has its own intensity; the mined pixel is in patch 2 at (40, 20): every
    hard-negative crop of an epoch with candidates comes from patch 2, centred there;
    earlier epochs keep the dark rule (the dark bar of every patch)."""
    images = np.stack([np.full((64, 64), 100 + 20 * i, np.uint8) for i in range(4)])
    masks = np.zeros((4, 64, 64), np.uint8)
    images[:, 5:9, 5:60] = 10  # dark background bar: the dark rule's target
    masks[:, 50:60, 50:60] = 1
    images[:, 50:60, 50:60] = 60
    store = MinedNegatives(1)
    store.put(0, np.array([2 * 64 * 64 + 40 * 64 + 20]))
    s = CropSampler(images, masks, 16, 0.0, None, 1, 8, hard_negative_prob=1.0, mined=store)
    for k in range(8):  # epoch 0: nothing mined for it yet -> dark rule
        img, mask = s.sample(k)
        assert np.rint(img[8, 8, 0] * 255) == 10 and mask[8, 8, 0] == 0
    for k in range(16, 24):  # epoch 2 reads epoch 0's candidates
        img, mask = s.sample(k)
        assert np.rint(img[8, 8, 0] * 255) == 140 and mask[8, 8, 0] == 0
    again = CropSampler(images, masks, 16, 0.0, None, 1, 8, hard_negative_prob=1.0, mined=store)
    for k in (3, 17):
        np.testing.assert_array_equal(s.sample(k)[0], again.sample(k)[0])


def test_miner_foreground_of_sigmoid_and_softmax_models(tmp_path):
    import keras

    images = np.zeros((3, 8, 8), np.uint8)
    images[:, :4] = 255
    masks = np.zeros((3, 8, 8), np.uint8)
    for n_out, act in ((1, "sigmoid"), (3, "softmax")):
        model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(n_out, 1)])
        w = np.zeros((1, 1, 1, n_out), np.float32)
        w[..., -1] = 8.0  # bright pixels -> the last class
        bias = np.array([-4.0] if n_out == 1 else [2.0, 0.0, 0.0], np.float32)  # dark: bg
        model.layers[0].set_weights([w, bias])
        model = keras.Sequential([model, keras.layers.Activation(act)])
        store = MinedNegatives(1)
        miner = HardNegativeMiner(images, masks, store, 0.5, tmp_path / f"{n_out}.npz", 2)
        miner.set_model(model)
        miner.on_epoch_end(0)
        want = np.flatnonzero(np.broadcast_to(np.arange(8)[None, :, None] < 4, (3, 8, 8)))
        np.testing.assert_array_equal(store.for_epoch(2), want)
        assert miner.counts == {0: 3 * 32} and (tmp_path / f"{n_out}.npz").is_file()


@pytest.mark.slow  # 60 s beside the other worker on a 2-core AMD EPYC (AVX2)
def test_train_model_with_mined_hard_negatives_resumes_the_same(tmp_path):
    """A run mining every epoch: the candidates are saved beside the backup, so a run
    stopped after epoch 3 and resumed gives the uninterrupted run's history."""
    patches = make_patches(tmp_path / "p")
    # 13 steps x 2 = 26 crops an epoch, longer than the stream's lookahead: lag 2, as in
    # real runs, so epochs 2-3 read the candidates of epochs 0-1
    over = {**TINY, "epochs": 4, "steps_per_epoch": 13}
    over |= {"hard_negative_prob": 0.5, "foreground_crop_prob": 0.3}
    assert mined_lag(26, 2) == 2
    cfg = resolve_train_config({**over, "hard_negative_source": "mined", "mine_every": 1})
    args = (patches, AugmentConfig(), cfg, 2, 0)
    full = train_model(*args, tmp_path / "full", tmp_path / "ck_full", progress=False)
    assert full.stop_reason == "completed" and full.epochs_run == 4

    import keras

    class Stop(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 2:
                raise KeyboardInterrupt

    ck = tmp_path / "ck"
    with pytest.raises(KeyboardInterrupt):
        train_model(*args, tmp_path / "o", ck, progress=False, callbacks=[Stop()])
    (backup,) = ck.iterdir()
    assert (backup / "mined.npz").is_file()
    resumed = train_model(*args, tmp_path / "o", ck, progress=False)
    assert resumed.resumed
    for got, want in zip(resumed.history, full.history, strict=True):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
    dark = resolve_train_config({**over, "hard_negative_source": "dark"})
    other = train_model(patches, AugmentConfig(), dark, 2, 0, tmp_path / "d", tmp_path / "ck_d")
    assert other.history[-1]["loss"] != pytest.approx(full.history[-1]["loss"], rel=1e-6)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"mine_every": 0}, r"train\.mine_every: Input should be greater than or equal to 1"),
        ({"mine_threshold": 1.0}, r"train\.mine_threshold: Input should be less than 1"),
        ({"mine_threshold": 0.0}, r"train\.mine_threshold: Input should be greater than 0"),
        ({"hard_negative_source": "bright"}, r"train\.hard_negative_source: Input should be"),
    ],
)
def test_train_config_mining_fields_are_validated(override, message):
    from mitoseg.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        resolve_train_config({"hard_negative_source": "mined", **override})
