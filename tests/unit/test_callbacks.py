"""mitoseg.model.callbacks: each callback on a tiny Keras model; MLflow against a real store."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

from mitoseg import tracking
from mitoseg.model import callbacks as mcb
from tracking_state import reset_tracking, seed_store

X = np.random.default_rng(0).random((4, 8, 8, 1), dtype=np.float32)
Y = (X > 0.5).astype(np.float32)


def _model(lr: Any = 0.01, dropout: float = 0.0) -> Any:
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(2, 3, padding="same", activation="relu")(inp)
    if dropout:
        x = keras.layers.Dropout(dropout)(x)
    out = keras.layers.Conv2D(1, 1, activation="sigmoid")(x)
    model = keras.Model(inp, out)
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="binary_crossentropy")
    return model


def _fit(model: Any, callbacks: list, epochs: int = 3, **kw: Any) -> Any:
    return model.fit(
        X, Y, validation_data=(X, Y), epochs=epochs, batch_size=2, verbose=0,
        callbacks=callbacks, **kw,
    )  # fmt: skip


# ------------------------------------------------------------------ learning rate


def test_learning_rate_logger_reports_the_epoch_start_rate() -> None:
    seen: list[dict] = []
    spy = keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: seen.append(dict(logs)))
    schedule = keras.optimizers.schedules.CosineDecay(0.01, 6, alpha=0.0)
    _fit(_model(schedule), [mcb.LearningRateLogger(), spy])
    # 2 steps per epoch: epoch e starts at step 2e
    expected = [0.01 * 0.5 * (1 + math.cos(math.pi * 2 * e / 6)) for e in range(3)]
    assert [r["lr"] for r in seen] == pytest.approx(expected, rel=1e-5)


def test_budget_cosine_follows_steps_or_clock() -> None:
    timer = mcb.TimeBudget(max_seconds=100.0)
    sched = mcb.BudgetCosineDecay(1.0, 0.0, total_steps=10, max_seconds=100.0, timer=timer)
    assert sched.learning_rate(0, 0.0) == pytest.approx(1.0)
    assert sched.learning_rate(5, 0.0) == pytest.approx(0.5)  # step fraction
    assert sched.learning_rate(0, 50.0) == pytest.approx(0.5)  # time fraction
    assert sched.learning_rate(2, 100.0) == pytest.approx(0.0)
    assert sched.learning_rate(20, 0.0) == pytest.approx(0.0)  # clipped
    model = _model(0.1)
    _fit(model, [sched, timer], epochs=2)
    # 4 steps of 10, the clock far from the budget: the rate before step 3
    lr = float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
    assert lr == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.3)), rel=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"total_steps": 0}, "BudgetCosineDecay: total_steps must be >= 1, got 0"),
        ({"max_seconds": 0.0}, "BudgetCosineDecay: max_seconds must be > 0, got 0.0"),
        ({"lr_min": 2.0}, r"BudgetCosineDecay: lr_min \(2.0\) exceeds lr0 \(1.0\)"),
        ({"warmup_fraction": 1.0}, r"BudgetCosineDecay: warmup_fraction must be in \[0, 1\)"),
    ],
)
def test_budget_cosine_errors(kwargs: dict, message: str) -> None:
    args = {"lr0": 1.0, "lr_min": 0.0, "total_steps": 10, "max_seconds": 1.0}
    with pytest.raises(ValueError, match=message):
        mcb.BudgetCosineDecay(**{**args, **kwargs}, timer=mcb.TimeBudget())


def test_budget_cosine_warms_up_linearly_then_decays() -> None:
    timer = mcb.TimeBudget(max_seconds=100.0)
    sched = mcb.BudgetCosineDecay(
        1.0, 0.0, total_steps=10, max_seconds=100.0, timer=timer, warmup_fraction=0.2
    )
    assert sched.learning_rate(0, 0.0) == pytest.approx(0.0)
    assert sched.learning_rate(1, 0.0) == pytest.approx(0.5)  # half of the warm-up
    assert sched.learning_rate(2, 0.0) == pytest.approx(1.0)  # peak, cosine starts
    assert sched.learning_rate(6, 0.0) == pytest.approx(0.5)  # half of the cosine
    assert sched.learning_rate(0, 10.0) == pytest.approx(0.5)  # the clock counts too


# -------------------------------------------------------------------- precise BN


def _bn_model(dropout: float = 0.0) -> Any:
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(3, 3, padding="same", use_bias=False, name="c1")(inp)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.Activation("relu")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name="drop")(x)
    x = keras.layers.Conv2D(2, 3, padding="same", use_bias=False, name="c2")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    out = keras.layers.Conv2D(1, 1, activation="sigmoid")(x)
    return keras.Model(inp, out)


PATCHES = np.random.default_rng(1).random((6, 8, 8, 1)).astype(np.float32)


def _draw(epoch: int, b: int) -> np.ndarray:
    """Batch ``b`` of every epoch: patches 3b .. 3b+2."""
    return PATCHES[3 * b : 3 * b + 3]


def _precise(model: Any, n: int = 2, final: int = 2) -> Any:
    cb = mcb.PreciseBatchNorm(_draw, n, final)
    cb.set_model(model)
    return cb


def test_precise_bn_sets_the_average_batch_moments_of_each_layer_input() -> None:
    model = _bn_model()
    _precise(model).estimate(_draw(0, b) for b in range(2))
    # bn1's input does not depend on any BatchNorm: compute its moments by hand
    conv = keras.Model(model.inputs, model.get_layer("c1").output)
    feats = np.asarray(conv(PATCHES, training=False))
    means = [feats[i : i + 3].mean(axis=(0, 1, 2)) for i in (0, 3)]
    variances = [feats[i : i + 3].var(axis=(0, 1, 2)) for i in (0, 3)]
    bn1 = model.get_layer("bn1")
    np.testing.assert_allclose(bn1.moving_mean.numpy(), np.mean(means, axis=0), rtol=1e-5)
    np.testing.assert_allclose(bn1.moving_variance.numpy(), np.mean(variances, axis=0), rtol=1e-4)
    # bn2 gets its own statistics, not Keras' initial (0, 1)
    bn2 = model.get_layer("bn2")
    assert not np.allclose(bn2.moving_mean.numpy(), 0.0)
    assert not np.allclose(bn2.moving_variance.numpy(), 1.0)


def test_precise_bn_turns_dropout_off_and_restores_it() -> None:
    with_drop, without = _bn_model(dropout=0.5), _bn_model()
    without.set_weights(with_drop.get_weights())
    for model in (with_drop, without):
        _precise(model).estimate([PATCHES])
    for name in ("bn1", "bn2"):
        a, b = with_drop.get_layer(name), without.get_layer(name)
        np.testing.assert_allclose(a.moving_variance.numpy(), b.moving_variance.numpy(), rtol=1e-5)
    assert with_drop.get_layer("drop").rate == 0.5


def test_precise_bn_before_each_validation_and_from_the_final_batches_at_the_end() -> None:
    model = _bn_model()
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy")
    cb = _precise(model, n=1, final=2)
    y = (PATCHES > 0.5).astype(np.float32)
    model.fit(
        PATCHES, y, validation_data=(PATCHES, y), epochs=2, batch_size=2, verbose=0,
        callbacks=[cb],
    )  # fmt: skip
    assert cb.calls == 2  # once per validation
    want = _bn_model()
    want.set_weights(model.get_weights())
    _precise(want).estimate(_draw(1, b) for b in range(2))
    for name in ("bn1", "bn2"):
        np.testing.assert_allclose(
            model.get_layer(name).moving_mean.numpy(),
            want.get_layer(name).moving_mean.numpy(),
            rtol=1e-5,
            atol=1e-7,
        )


@pytest.mark.parametrize(
    ("n", "final", "message"),
    [
        (0, 1, "n_batches and final_batches must be >= 1, got 0, 1"),
        (1, 0, "n_batches and final_batches must be >= 1, got 1, 0"),
    ],
)
def test_precise_bn_errors(n: int, final: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        mcb.PreciseBatchNorm(_draw, n, final)


# -------------------------------------------------------------------- seeds, time


def test_epoch_seeds_make_dropout_a_function_of_the_epoch() -> None:
    def draws(start_epoch: int) -> list[np.ndarray]:
        model = _model(dropout=0.5)
        out: list[np.ndarray] = []

        class Probe(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
                layer = next(la for la in self.model.layers if "dropout" in la.name)
                out.append(keras.ops.convert_to_numpy(layer(np.ones((1, 4)), training=True)))

        _fit(model, [mcb.EpochSeeds(), Probe()], epochs=3, initial_epoch=start_epoch)
        return out

    full, resumed = draws(0), draws(2)
    np.testing.assert_array_equal(full[2], resumed[0])
    assert not np.array_equal(full[0], full[1])


def test_time_budget_stops_measures_and_persists(tmp_path: Path) -> None:
    state = tmp_path / "elapsed.json"
    timer = mcb.TimeBudget(max_seconds=5.0, prior_seconds=4.99, state_path=state)
    history = _fit(_model(), [timer], epochs=4)
    assert len(history.epoch) == 1 and timer.stopped and timer.exhausted
    assert len(timer.epoch_train_seconds) == 1 and timer.epoch_train_seconds[0] > 0
    saved = json.loads(state.read_text())
    assert saved["epoch"] == 1 and saved["elapsed"] > 4.99
    assert mcb.read_elapsed(state) == pytest.approx(timer.prior_seconds, abs=0.05)
    assert mcb.read_elapsed(tmp_path / "missing.json") == 0.0
    unlimited = mcb.TimeBudget()
    assert len(_fit(_model(), [unlimited], epochs=2).epoch) == 2 and not unlimited.stopped


# ------------------------------------------------------------------------ history


def test_history_csv_logger_fixed_columns_one_based_and_appending(tmp_path: Path) -> None:
    path = tmp_path / "history.csv"
    columns = ("epoch", "loss", "val_loss", "missing")
    _fit(_model(), [mcb.HistoryCSVLogger(path, columns)], epochs=2)
    _fit(_model(), [mcb.HistoryCSVLogger(path, columns)], epochs=3, initial_epoch=2)
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert set(rows[0]) == set(columns) and all(r["missing"] == "" for r in rows)
    assert all(float(r["val_loss"]) > 0 for r in rows)


def test_history_csv_logger_needs_epoch_first(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"HistoryCSVLogger: columns must start with 'epoch'"):
        mcb.HistoryCSVLogger(tmp_path / "h.csv", ("loss", "epoch"))


# ------------------------------------------------------------- resumable stoppers


def _rows(values: list[float | None]) -> list[dict[str, Any]]:
    return [{"epoch": i + 1, "val_loss": v, "loss": 1.0} for i, v in enumerate(values)]


@pytest.mark.parametrize(
    ("values", "stopped", "wait", "best", "best_epoch"),
    [
        ([], False, 0, None, 0),
        ([1.0, 0.5, 0.7], False, 1, 0.5, 1),
        ([1.0, 0.5, 0.7, 0.6], True, 2, 0.5, 1),
        ([1.0, None, 0.9], False, 0, 0.9, 2),
    ],
)
def test_early_stopping_restore_continues_keras_state(
    values: list, stopped: bool, wait: int, best: float | None, best_epoch: int
) -> None:
    es = mcb.ResumableEarlyStopping(monitor="val_loss", mode="min", patience=2)
    assert es.restore(_rows(values)) is stopped
    es.set_model(_model())
    es.on_train_begin()
    assert (es.wait, es.best, es.best_epoch) == (wait, best, best_epoch)


def test_early_stopping_resumed_stops_like_uninterrupted() -> None:
    # the lr is ~0: val_loss never improves after epoch 1 -> patience 2 stops at epoch 3
    es = mcb.ResumableEarlyStopping(monitor="val_loss", mode="min", patience=2)
    assert len(_fit(_model(1e-12), [es], epochs=6).epoch) == 3
    first = _fit(_model(1e-12), [], epochs=2).history["val_loss"]
    resumed = mcb.ResumableEarlyStopping(monitor="val_loss", mode="min", patience=2)
    assert resumed.restore(_rows(first)) is False
    history = _fit(_model(1e-12), [resumed], epochs=6, initial_epoch=2)
    assert history.epoch == [2] and resumed.stopped_epoch == 2


def test_reduce_lr_on_plateau_restore() -> None:
    plateau = mcb.ResumableReduceLROnPlateau(monitor="val_loss", mode="min", patience=1)
    plateau.restore(_rows([1.0, 2.0, 2.0, 2.0]), learning_rate=0.1)
    plateau.set_model(_model())
    plateau.on_train_begin()
    # epoch 2 waits, epoch 3 reduces (cooldown 0, wait reset), epoch 4 waits
    assert (plateau.best, plateau.wait, plateau.cooldown_counter) == (1.0, 0, 0)


# -------------------------------------------------------------------------- MLflow


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_mlflow_db: Path) -> Iterator[Any]:
    """A fresh embedded sqlite store; yields an MlflowClient on it."""
    from mlflow import MlflowClient

    seed_store(empty_mlflow_db, tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    reset_tracking()
    uri = tracking.configure_tracking(root=tmp_path)
    yield MlflowClient(tracking_uri=uri)
    reset_tracking()


def test_epoch_logger_logs_each_epoch_with_lr(store: Any) -> None:
    with tracking.start_training_run({}, {}) as run:
        logger = mcb.MlflowEpochLogger()
        _fit(_model(0.01), [logger])
    for key in ("loss", "val_loss", "lr"):
        history = store.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == [0, 1, 2], key
    lrs = store.get_metric_history(run.info.run_id, "lr")
    assert all(m.value == pytest.approx(0.01) for m in lrs)


def test_epoch_logger_metrics_and_errors(store: Any) -> None:
    logger = mcb.MlflowEpochLogger(run_id="r")
    values = logger.epoch_metrics(
        {"loss": np.float32(0.5), "learning_rate": 0.1, "note": "x", "flag": True, "a b@": 1}
    )
    assert values == {"loss": 0.5, "lr": pytest.approx(0.1), "a b_": 1.0}
    assert logger.epoch_metrics({"lr": 0.2, "learning_rate": 0.3}) == {"lr": 0.2}
    with pytest.raises(RuntimeError, match=r"MlflowEpochLogger: no active MLflow run"):
        mcb.MlflowEpochLogger().on_train_begin()


def test_epoch_logger_closes_killed_run_and_logs_restored_history(store: Any) -> None:
    import mlflow

    experiment_id = tracking.open_store().experiment_id
    killed = store.create_run(experiment_id).info.run_id
    other = store.create_run(experiment_id).info.run_id
    mcb.MlflowEpochLogger(run_id=killed).set_backup("host:/ck/abc", [])
    mcb.MlflowEpochLogger(run_id=other).set_backup("host:/ck/other", [])
    restored = [
        {"epoch": 1, "loss": 0.9, "val_loss": 1.0, "lr": 0.01, "val_iou": None},
        {"epoch": 2, "loss": 0.8, "val_loss": 0.7, "lr": 0.005, "val_iou": 0.5},
    ]
    with tracking.start_training_run({}, {}) as run:
        logger = mcb.MlflowEpochLogger()
        logger.set_backup("host:/ck/abc", restored)
        _fit(_model(0.01), [logger], epochs=3, initial_epoch=2)
    new = run.info.run_id
    assert logger.superseded == [killed]
    assert store.get_run(killed).info.status == "KILLED"
    assert store.get_run(killed).data.tags["superseded_by"] == new
    assert store.get_run(other).info.status == "RUNNING"  # another backup: untouched
    tags = store.get_run(new).data.tags
    assert tags["supersedes"] == killed and tags["backup"] == "host:/ck/abc"
    assert store.get_run(new).info.status == "FINISHED"
    val_loss = store.get_metric_history(new, "val_loss")
    assert sorted(m.step for m in val_loss) == [0, 1, 2]
    assert {m.step: m.value for m in val_loss}[0] == pytest.approx(1.0)
    assert [m.step for m in store.get_metric_history(new, "val_iou")] == [1]
    assert mlflow.active_run() is None


def test_precise_bn_never_draws_past_the_epochs_own_batches() -> None:
    """``n_batches`` above the epoch's steps (``final_batches``): only the epoch's batches
    are drawn (a later epoch's mined crops may not exist yet)."""
    asked: list[tuple[int, int]] = []

    def draw(epoch: int, b: int) -> np.ndarray:
        asked.append((epoch, b))
        return _draw(epoch, b)

    cb = mcb.PreciseBatchNorm(draw, 10, 2)
    cb.set_model(_bn_model())
    cb.on_epoch_begin(3)
    cb.on_test_begin()
    assert asked == [(3, 0), (3, 1)] and cb.calls == 1
