"""Monitoring of the served model: the reference profile (``mitoseg.data.profile``) and
the service-side statistics, drift window, metrics and review samples
(``mitoseg.serving.monitoring``), on the bundled real VNC slices."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from mitoseg.config import BaseConfig
from mitoseg.data.profile import FEATURES, PROFILE_FILE, ReferenceProfile, build_profile
from mitoseg.data.validate import slice_table
from mitoseg.inference.plan import InferencePlan
from mitoseg.io import DataError
from mitoseg.metrics import label_objects
from mitoseg.serving import monitoring as mon

SAMPLE = Path(__file__).resolve().parents[2] / "src" / "mitoseg" / "sample_data" / "vnc"
CDEEP3M = Path(__file__).resolve().parents[3] / "shared" / "data" / "cdeep3m"
LABELS = {"model": "mitoseg-unet", "version": "3"}


def _stacks(split: str) -> tuple[np.ndarray, np.ndarray]:
    return (
        tifffile.imread(SAMPLE / split / "images.tif"),
        tifffile.imread(SAMPLE / split / "masks.tif"),
    )


@pytest.fixture(scope="module")
def slices_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The validate stage's per-slice table of the bundled sample, as ``slices.csv``."""
    stacks = {s: _stacks(s) for s in ("train", "test")}
    base = BaseConfig.model_validate({"classes": {"background": 0, "mitochondria": 255}})
    path = tmp_path_factory.mktemp("validate") / "slices.csv"
    slice_table(SAMPLE, stacks, base).drop(columns=["row_id"]).to_csv(path, index=False)
    return path


@pytest.fixture()
def plan() -> InferencePlan:
    return InferencePlan.default_for(1, 4, min_object_size=20, threshold=0.4)


# ------------------------------------------------------------------ reference profile


def test_profile_holds_the_training_slices_scaled_by_the_dtype(slices_csv: Path) -> None:
    images, masks = _stacks("train")
    profile = build_profile(slices_csv)
    assert profile.n_slices == images.shape[0] and profile.dtypes == ["uint8"]
    means = np.sort(images.reshape(len(images), -1).mean(axis=1) / 255.0)
    np.testing.assert_allclose(profile.values("intensity_mean"), means, rtol=1e-9)
    fg = (masks > 0).reshape(len(masks), -1).mean(axis=1)
    assert profile.foreground_range == pytest.approx((fg.min(), fg.max()))
    path = profile.write(slices_csv.parent / PROFILE_FILE)
    assert ReferenceProfile.read(path) == profile


def _table_without(slices_csv: Path, tmp: Path, column: str) -> Path:
    import pandas as pd

    out = tmp / "slices.csv"
    pd.read_csv(slices_csv).drop(columns=[column]).to_csv(out, index=False)
    return out


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "slice statistics not found (run the validate stage)"),
        ("no_column", "missing columns ['std']"),
        ("no_split", "no slice of split 'holdout' with finite values"),
        ("bad_dtype", "unknown image dtype 'uint77'"),
    ],
)
def test_profile_errors_name_the_file(
    case: str, message: str, slices_csv: Path, tmp_path: Path
) -> None:
    import pandas as pd

    path, split = slices_csv, "train"
    if case == "missing":
        path = tmp_path / "absent.csv"
    elif case == "no_column":
        path = _table_without(slices_csv, tmp_path, "std")
    elif case == "no_split":
        split = "holdout"
    else:
        path = tmp_path / "slices.csv"
        pd.read_csv(slices_csv).assign(dtype="uint77").to_csv(path, index=False)
    with pytest.raises(DataError) as err:
        build_profile(path, split=split)
    assert str(err.value) == f"{path}: {message}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "reference profile not found"),
        ("{not json", "not valid JSON: Expecting property name enclosed in double quotes"),
        ("[1, 2]", "expected a JSON object"),
        (
            '{"source": "s", "split": "train", "n_slices": 1, "dtypes": ["uint8"], '
            '"features": {"intensity_mean": [0.5]}, "foreground_range": [0.4, 0.2]}',
            "reference profile foreground_range: expected 0 <= low <= high <= 1, got",
        ),
        (
            '{"source": "s", "split": "train", "n_slices": 1, "dtypes": [], "features": {}}',
            "reference profile features: at least one feature with values is needed",
        ),
    ],
)
def test_profile_read_errors_name_the_file(text: str | None, message: str, tmp_path: Path) -> None:
    path = tmp_path / PROFILE_FILE
    if text is not None:
        path.write_text(text)
    with pytest.raises(DataError, match=r"^" + __import__("re").escape(f"{path}: {message}")):
        ReferenceProfile.read(path)


# ------------------------------------------------------------------ settings


def test_settings_from_arguments_over_environment() -> None:
    env = {"MITOSEG_MONITOR_WINDOW": "50", "MITOSEG_MONITOR_ENABLED": "false"}
    s = mon.resolve_monitor_settings({"monitor_window": "80", "monitor_min_window": ""}, env)
    assert (s.window, s.enabled, s.min_window) == (80, False, 20)
    assert mon.resolve_monitor_settings({}, {}) == mon.MonitorSettings()


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ({"monitor_window": "1"}, {}, "monitor_window: Input should be greater than or equal to 2"),
        ({}, {"MITOSEG_MONITOR_REVIEW_FRACTION": "2"}, "MITOSEG_MONITOR_REVIEW_FRACTION: Input "
         "should be less than or equal to 1"),
        ({}, {"MITOSEG_MONITOR_ENABLED": "maybe"}, "MITOSEG_MONITOR_ENABLED: Input should be a "
         "valid boolean, unable to interpret input"),
        ({"monitor_window": "10", "monitor_min_window": "11"}, {},
         "monitor_min_window: 11 is above the drift window of 10 slices"),
    ],
)  # fmt: skip
def test_bad_settings_name_their_source(args: dict, env: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        mon.resolve_monitor_settings(args, env)
    assert str(err.value) == message


def test_model_labels_prefer_the_registry_version() -> None:
    assert mon.model_labels("mitoseg-unet:abc", {"name": "m", "version": "4"}) == {
        "model": "m",
        "version": "4",
    }
    assert mon.model_labels("mitoseg-unet:abc", {}) == {"model": "mitoseg-unet", "version": "abc"}


# ------------------------------------------------------------------ statistics


def test_slice_stats_match_the_full_resolution_values(plan: InferencePlan) -> None:
    images, masks = _stacks("test")
    stack = np.concatenate([images[:3], np.full((1, *images.shape[1:]), 90, np.uint8)])
    classes = np.concatenate([(masks[:3] > 0), np.zeros((1, *images.shape[1:]), bool)])
    classes = classes.astype(np.uint8)
    stats = mon.slice_stats(stack, classes, plan, max_side=256)
    flat = stack.reshape(len(stack), -1).astype(np.float64) / 255
    np.testing.assert_allclose(stats.mean, flat.mean(axis=1), atol=0.01)
    np.testing.assert_allclose(stats.std, flat.std(axis=1), atol=0.01)
    np.testing.assert_allclose(stats.quantiles[:, 1], np.median(flat, axis=1), atol=0.02)
    assert stats.blank.tolist() == [False, False, False, True]  # the constant slice
    full_fg = classes.reshape(len(classes), -1).mean(axis=1)
    np.testing.assert_allclose(stats.foreground, full_fg, atol=0.01)
    full_n = [label_objects(c, plan.min_object_size)[1] for c in classes]
    assert stats.objects[3] == 0 and all(
        abs(a - b) <= max(2, 0.25 * b) for a, b in zip(stats.objects[:3], full_n[:3], strict=True)
    )
    assert stats.features().shape == (4, len(FEATURES))


def test_slice_stats_scale_uint16_like_uint8(plan: InferencePlan) -> None:
    image = _stacks("test")[0][:1]
    classes = np.zeros_like(image)
    a = mon.slice_stats(image, classes, plan)
    b = mon.slice_stats(image.astype(np.uint16) * 257, classes, plan)
    np.testing.assert_allclose(a.features(), b.features(), atol=1e-9)


def test_slice_stats_reject_mismatched_shapes(plan: InferencePlan) -> None:
    with pytest.raises(ValueError) as err:
        mon.slice_stats(np.zeros((1, 8, 8)), np.zeros((1, 8, 9), np.uint8), plan)
    assert str(err.value) == (
        "slice_stats: expected (Z, H, W) stack and classes of one shape, got (1, 8, 8) and "
        "(1, 8, 9)"
    )


def test_uncertain_fraction_counts_foreground_near_the_threshold(plan: InferencePlan) -> None:
    probs = np.array([0.1, 0.35, 0.45, 0.55, 0.9, 0.95], np.float32).reshape(1, 6, 1)
    mask = (probs[..., 0] >= plan.threshold).astype(np.uint8)  # 0.45 0.55 0.9 0.95
    assert mon.uncertain_fraction(probs, mask, plan, margin=0.1) == pytest.approx(1 / 4)
    assert mon.uncertain_fraction(probs, np.zeros_like(mask), plan, margin=0.1) is None
    soft = np.array([[[0.2, 0.8], [0.45, 0.55]]], np.float32)  # top-two margins 0.6, 0.1
    assert mon.uncertain_fraction(soft, np.ones((1, 2), np.uint8), plan, 0.1) == 0.5


# ------------------------------------------------------------------ drift


def _features(stack: np.ndarray, masks: np.ndarray, plan: InferencePlan) -> np.ndarray:
    return mon.slice_stats(stack, (masks > 0).astype(np.uint8), plan).features()


def test_drift_is_low_for_the_same_microscope(slices_csv: Path, plan: InferencePlan) -> None:
    window = mon.DriftWindow(build_profile(slices_csv), size=100, min_size=5)
    images, masks = _stacks("test")
    window.add(_features(images[:4], masks[:4], plan))
    assert window.scores() == {}  # below min_size
    window.add(_features(images[4:], masks[4:], plan))
    scores = window.scores()
    assert set(scores) == set(FEATURES) and window.score() < 0.6
    assert window.score() == max(scores["intensity_mean"], scores["intensity_std"])


def test_drift_is_high_for_another_microscope(slices_csv: Path, plan: InferencePlan) -> None:
    if not CDEEP3M.is_dir():
        pytest.skip(f"CDeep3M data not found at {CDEEP3M} (../shared/data)")
    images = tifffile.imread(CDEEP3M / "cdeep3m_train_raw.tif")[:10]
    masks = tifffile.imread(CDEEP3M / "cdeep3m_train_mito.tif")[:10]
    window = mon.DriftWindow(build_profile(slices_csv), size=100, min_size=5)
    window.add(_features(images, masks, plan))
    assert window.score() > 0.8


def test_window_keeps_the_most_recent_slices() -> None:
    window = mon.DriftWindow(None, size=3, min_size=2)
    window.add(np.arange(15, dtype=float).reshape(5, 3))
    assert len(window) == 3 and window.scores() == {}  # no profile, no score
    assert window.window_mean()["intensity_mean"] == pytest.approx(9.0)


# ------------------------------------------------------------------ metrics and /drift


def _value(registry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, {**LABELS, **labels})


def test_monitor_exports_labelled_metrics_and_drift(slices_csv: Path, plan: InferencePlan) -> None:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    settings = mon.MonitorSettings(window=50, min_window=3)
    profile = build_profile(slices_csv)
    monitor = mon.Monitor(settings, plan, LABELS, profile, registry=registry)
    images, masks = _stacks("test")
    stack = np.concatenate([images[:3], np.zeros((1, *images.shape[1:]), np.uint8)])
    classes = np.concatenate([(masks[:3] > 0), np.zeros((1, *images.shape[1:]), bool)])
    monitor.observe(stack, classes.astype(np.uint8))
    assert monitor.flush()  # the statistics are computed in the background
    assert _value(registry, "mitoseg_slices_total") == 4
    assert _value(registry, "mitoseg_blank_slices_total") == 1
    assert _value(registry, "mitoseg_foreground_fraction_count") == 3  # non-blank only
    assert _value(registry, "mitoseg_input_intensity_count", quantile="0.5") == 4
    assert _value(registry, "mitoseg_drift_window_slices") == 3
    assert _value(registry, "mitoseg_reference_loaded") == 1
    assert _value(registry, "mitoseg_reference_foreground_fraction", bound="high") == (
        pytest.approx(profile.foreground_range[1])
    )
    engine = f"{plan.runtime}/{plan.precision}"
    assert _value(registry, "mitoseg_model_info", engine=engine, threshold="0.4") == 1
    summary = monitor.drift_summary()
    score = _value(registry, "mitoseg_drift_score")
    assert summary["reference"] and summary["score"] == pytest.approx(score)
    assert summary["window_slices"] == 3 and summary["reference_slices"] == profile.n_slices
    assert json.loads(json.dumps(summary)) == summary  # JSON-able


def test_monitor_without_a_profile_says_so(plan: InferencePlan) -> None:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    monitor = mon.Monitor(mon.MonitorSettings(), plan, LABELS, None, registry=registry)
    images, masks = _stacks("test")
    monitor.observe(images[:2], (masks[:2] > 0).astype(np.uint8))
    summary = monitor.drift_summary()  # waits for the background statistics
    assert summary["reference"] is False and summary["score"] is None
    assert summary["message"] == "the model has no reference profile: no drift score"
    assert _value(registry, "mitoseg_reference_loaded") == 0
    assert _value(registry, "mitoseg_slices_total") == 2


def test_disabled_monitor_exports_nothing(plan: InferencePlan) -> None:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    monitor = mon.Monitor(mon.MonitorSettings(enabled=False), plan, LABELS, None, registry)
    images, masks = _stacks("test")
    monitor.observe(images[:1], (masks[:1] > 0).astype(np.uint8))
    assert list(registry.collect()) == []
    assert monitor.drift_summary()["monitoring"] is False


def test_confidence_monitor_segments_like_segment_stack(plan: InferencePlan) -> None:
    from prometheus_client import CollectorRegistry

    from mitoseg.inference.predict import segment_stack

    def predict(batch: np.ndarray) -> np.ndarray:  # a smooth real-valued "model"
        return np.clip(batch * 1.2 - 0.1, 0, 1).astype(np.float32)

    registry = CollectorRegistry()
    plan = plan.with_overrides(tile_size=128, halo=8)
    runner = mon.ConfidenceMonitor(mon.MonitorSettings(), plan, LABELS, registry)
    stack = _stacks("test")[0][:2, :200, :300]
    np.testing.assert_array_equal(
        runner.segment(predict, stack), segment_stack(predict, stack, plan)
    )
    assert _value(registry, "mitoseg_uncertain_fraction_count") == 2


# ------------------------------------------------------------------ review samples


def test_review_samples_are_written_with_the_model_version(
    tmp_path: Path, plan: InferencePlan
) -> None:
    from prometheus_client import CollectorRegistry

    settings = mon.MonitorSettings(review_uri=str(tmp_path / "review"), review_fraction=1.0)
    monitor = mon.Monitor(settings, plan, LABELS, None, registry=CollectorRegistry())
    image = _stacks("test")[0][:1]
    classes = np.zeros_like(image)
    classes[0, 10:20, 10:30] = 1
    monitor.observe(image, classes, upload=b"raw-upload-bytes", route="/segment")
    monitor.close()
    records = list((tmp_path / "review" / "mitoseg-unet" / "3").glob("*/*/record.json"))
    assert len(records) == 1
    folder = records[0].parent
    record = json.loads(records[0].read_text())
    assert record["version"] == "3" and record["route"] == "/segment"
    assert record["shape"] == list(image.shape)
    assert (folder / "upload.bin").read_bytes() == b"raw-upload-bytes"
    import imageio.v3 as iio

    mask = iio.imread(folder / "mask.png")
    assert mask.max() == 255 and (mask > 0).sum() == 200
    assert not list(folder.glob(".*"))  # no temporary file left


def test_review_is_off_by_default_and_samples_a_fraction(
    plan: InferencePlan, tmp_path: Path
) -> None:
    from prometheus_client import CollectorRegistry

    assert (
        mon.Monitor(mon.MonitorSettings(), plan, LABELS, None, CollectorRegistry()).review is None
    )
    writer = mon.ReviewWriter(str(tmp_path), 0.25, LABELS, seed=0)
    kept = sum(writer.sampled() for _ in range(2000))
    writer.close()
    assert 400 < kept < 600


def test_review_samples_go_to_s3(s3_env, plan: InferencePlan) -> None:
    bucket = s3_env.make_bucket("review")
    writer = mon.ReviewWriter(f"s3://{bucket}/lab-a", 1.0, LABELS)
    assert writer.submit(b"bytes", np.zeros((8, 8), np.uint8), {"route": "/segment"})
    writer.close()
    keys = sorted(o["Key"] for o in s3_env.client().list_objects_v2(Bucket=bucket)["Contents"])
    assert len(keys) == 3 and all(k.startswith("lab-a/mitoseg-unet/3/") for k in keys)
    assert {k.rsplit("/", 1)[1] for k in keys} == {"upload.bin", "mask.png", "record.json"}
    assert writer.written == 1 and writer.dropped == 0
