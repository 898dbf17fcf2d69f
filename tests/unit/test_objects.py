"""Instance labels, per-object table and instance metrics on tiny hand-computed masks."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from mitoseg.inference import objects
from mitoseg.inference.objects import (
    OBJECT_COLUMNS,
    first_voxels,
    instance_labels,
    instance_scores,
    measure_objects,
    object_moments,
    relabel_sequential,
    write_object_table,
)


def _two_objects() -> np.ndarray:
    m = np.zeros((3, 6, 6), dtype=np.uint8)
    m[0:2, 0:2, 0:2] = 1  # 8 voxels, spans z 0..1
    m[2, 4:6, 3:6] = 1  # 6 voxels, one slice
    return m


def test_instance_labels_are_3d_components_in_scan_order() -> None:
    labels, n = instance_labels(_two_objects())
    assert n == 2 and labels.dtype == np.uint32
    assert (labels[0:2, 0:2, 0:2] == 1).all() and (labels[2, 4:6, 3:6] == 2).all()
    assert int((labels > 0).sum()) == 14


def test_connectivity_decides_diagonal_neighbours() -> None:
    m = np.zeros((2, 3, 3), dtype=bool)
    m[0, 0, 0] = m[1, 1, 1] = True  # touch only at a corner
    assert instance_labels(m, connectivity=3)[1] == 1
    assert instance_labels(m, connectivity=2)[1] == 2
    assert instance_labels(m, connectivity=1)[1] == 2


def test_min_size_drops_small_objects_and_renumbers() -> None:
    m = _two_objects()
    m[2, 0, 5] = 1  # a 1-voxel object, third in scan order would be id 2
    labels, n = instance_labels(m, min_size=2)
    assert n == 2
    assert labels[2, 0, 5] == 0 and (labels[2, 4:6, 3:6] == 2).all()


def test_2d_mask_is_one_slice() -> None:
    labels, n = instance_labels(np.eye(4, dtype=np.uint8))
    assert labels.shape == (4, 4) and n == 1  # diagonal is 8-connected in a slice


def test_relabel_sequential() -> None:
    out, n = relabel_sequential(np.array([[0, 7, 7], [3, 0, 9]]))
    assert n == 3
    np.testing.assert_array_equal(out, [[0, 1, 1], [2, 0, 3]])


def test_measure_objects_hand_computed() -> None:
    labels, _ = instance_labels(_two_objects())
    image = np.arange(labels.size, dtype=np.uint16).reshape(labels.shape)
    rows = measure_objects(labels, image, voxel_size=(50.0, 4.0, 4.0))
    assert [r["id"] for r in rows] == [1, 2]
    a, b = rows
    assert a["voxels"] == 8 and a["volume_nm3"] == 8 * 50 * 4 * 4 and a["area_nm2"] is None
    assert (a["centroid_z"], a["centroid_y"], a["centroid_x"]) == (0.5, 0.5, 0.5)
    assert (a["bbox_z0"], a["bbox_z1"], a["bbox_y1"], a["bbox_x1"]) == (0, 2, 2, 2)
    assert a["slices"] == 2
    assert a["mean_intensity"] == pytest.approx(float(image[0:2, 0:2, 0:2].mean()))
    # 50 nm sections vs 4 nm pixels: the cube is long in z, sqrt of the variance ratio
    assert a["elongation"] == pytest.approx(50.0 / 4.0)
    assert b["voxels"] == 6 and b["slices"] == 1
    assert (b["centroid_y"], b["centroid_x"]) == (4.5, 4.0)
    # 2 x 3 rectangle (6 px, ddof 1): var y = 6 * 0.25 / 5 = 0.3, var x = 4 * 1 / 5 = 0.8
    assert b["elongation"] == pytest.approx(np.sqrt(0.8 / 0.3))


def test_measure_single_slice_gives_area_and_none_without_voxel_size() -> None:
    labels = np.zeros((4, 4), dtype=np.uint32)
    labels[1:3, 1:3] = 5
    (row,) = measure_objects(labels, voxel_size=(1.0, 2.0, 3.0))
    assert row["id"] == 5 and row["area_nm2"] == 4 * 6.0 and row["volume_nm3"] is None
    (row,) = measure_objects(labels)
    assert row["area_nm2"] is None and row["mean_intensity"] is None
    assert measure_objects(np.zeros((2, 2), dtype=np.uint8)) == []


@pytest.mark.parametrize(
    ("labels", "kwargs", "message"),
    [
        (
            np.zeros((2, 2, 2, 2), np.uint8),
            {},
            r"^measure_objects: expected \(Z, H, W\) or \(H, W\), got shape \(2, 2, 2, 2\)$",
        ),
        (
            np.zeros((2, 2), np.uint8),
            {"image": np.zeros(4)},
            r"^measure_objects: expected \(Z, H, W\) or \(H, W\), got shape \(4,\)$",
        ),
        (np.zeros((2, 2), np.float32), {}, "labels must be integers"),
        (-np.ones((2, 2), np.int32), {}, "labels must be >= 0"),
        (np.zeros((2, 2), np.uint8), {"image": np.zeros((3, 3))}, "image shape"),
        (np.zeros((2, 2), np.uint8), {"voxel_size": (1, 2)}, "voxel_size must be 3 positive"),
        (np.zeros((2, 2), np.uint8), {"voxel_size": (1, 0, 1)}, "voxel_size must be 3 positive"),
    ],
)
def test_measure_objects_errors(labels: np.ndarray, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        measure_objects(labels, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"mask": np.zeros(3)},
            r"^instance_labels: expected \(Z, H, W\) or \(H, W\), got shape \(3,\)$",
        ),
        ({"mask": np.zeros((2, 2)), "min_size": -1}, "min_size must be >= 0"),
        ({"mask": np.zeros((2, 2)), "connectivity": 4}, "connectivity must be 1, 2 or 3"),
    ],
)
def test_instance_labels_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        instance_labels(**kwargs)


def test_write_object_table(tmp_path) -> None:
    labels, _ = instance_labels(_two_objects())
    path = write_object_table(tmp_path / "objects.csv", measure_objects(labels))
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == list(OBJECT_COLUMNS)
    assert [r["voxels"] for r in rows] == ["8", "6"] and rows[0]["volume_nm3"] == ""
    assert not list(tmp_path.glob(".*"))  # no temporary left behind


def test_instance_scores_hand_computed() -> None:
    truth = np.zeros((1, 4, 12), dtype=np.int32)
    pred = np.zeros_like(truth)
    truth[0, :, 0:2] = 1  # 8 px
    pred[0, :, 0:2] = 4  # exact: IoU 1
    truth[0, :, 4:6] = 2  # 8 px
    pred[0, 1:4, 4:6] = 5  # 6 px inside: IoU 0.75
    truth[0, :, 8:10] = 3  # 8 px
    pred[0, 0:2, 8:11] = 6  # 6 px, 4 shared: IoU 4 / 10 = 0.4, no match
    pred[0, 3, 11] = 7  # lone false positive
    s = instance_scores(truth, pred)
    assert (s["n_true"], s["n_pred"]) == (3, 4)
    assert s["iou_50"] == {
        "tp": 2, "fp": 2, "fn": 1,
        "precision": 0.5, "recall": pytest.approx(2 / 3), "f1": pytest.approx(4 / 7),
        "ap": pytest.approx(2 / 5),
    }  # fmt: skip
    assert (s["iou_75"]["tp"], s["iou_75"]["ap"]) == (2, pytest.approx(2 / 5))
    assert s["mean_matched_iou"] == pytest.approx((1.0 + 0.75) / 2)
    strict = instance_scores(truth, pred, ious=(0.8,))
    assert strict["iou_80"]["tp"] == 1 and strict["iou_80"]["ap"] == pytest.approx(1 / 6)


def test_instance_scores_empty_rule() -> None:
    empty = np.zeros((2, 3, 3), dtype=np.uint8)
    s = instance_scores(empty, empty)
    assert s["iou_50"]["f1"] == 1.0 and s["iou_75"]["ap"] == 1.0 and s["mean_matched_iou"] == 1.0
    one = empty.copy()
    one[0, 0, 0] = 1
    s = instance_scores(one, empty)
    assert s["iou_50"]["recall"] == 0.0 and s["iou_50"]["precision"] == 1.0
    assert s["mean_matched_iou"] == 0.0


@pytest.mark.parametrize(
    ("truth", "pred", "kwargs", "message"),
    [
        (np.zeros((2, 2), np.uint8), np.zeros((3, 3), np.uint8), {}, "truth shape"),
        (
            np.zeros(4, np.uint8),
            np.zeros(4, np.uint8),
            {},
            r"^instance_scores: expected \(Z, H, W\) or \(H, W\), got shape \(4,\)$",
        ),
        (np.zeros((2, 2)), np.zeros((2, 2), np.uint8), {}, "truth labels must be integers"),
        (np.zeros((2, 2), np.uint8), -np.ones((2, 2), np.int8), {}, "prediction labels must"),
        (np.zeros((2, 2), np.uint8), np.zeros((2, 2), np.uint8), {"ious": (0,)}, "in \\(0, 1\\]"),
    ],
)
def test_instance_scores_errors(truth, pred, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        instance_scores(truth, pred, **kwargs)


def test_evaluate_instance_metrics_binary_and_multiclass() -> None:
    from mitoseg.evaluate import instance_metrics

    truth = np.zeros((2, 8, 8), dtype=np.uint8)
    truth[:, 1:4, 1:4] = 1  # one 18-voxel object through both slices
    truth[0, 6:8, 6:8] = 1  # 4 voxels: dropped by min_object_size=5
    pred = truth.copy()
    pred[1, 1:4, 1:4] = 0  # half of it found: IoU 0.5
    m = instance_metrics(truth, pred, ["background", "mitochondria"], min_object_size=5)
    assert m is not None and m["class"] == "mitochondria" and m["connectivity"] == 26
    assert (m["n_true"], m["n_pred"], m["min_object_size"]) == (1, 1, 5)
    assert m["iou_50"]["tp"] == 1 and m["iou_75"]["tp"] == 0
    assert m["iou_75"]["ap"] == 0.0 and m["mean_matched_iou"] == pytest.approx(0.5)
    three = instance_metrics(truth * 2, pred * 2, ["bg", "membrane", "mitochondria"])
    assert three is not None and three["class"] == "mitochondria" and three["n_true"] == 2
    assert instance_metrics(truth, pred, ["bg", "a", "b"]) is None


def test_moments_of_blocks_combine_to_the_whole_volume() -> None:
    from mitoseg.inference.objects import combine_moments, object_moments, rows_from_moments

    rng = np.random.default_rng(3)
    labels, _ = instance_labels(rng.random((7, 12, 11)) > 0.6)
    image = rng.integers(0, 255, labels.shape).astype(np.uint8)
    whole = measure_objects(labels, image, (40.0, 5.0, 5.0))
    parts = [object_moments(labels[z : z + 3], image[z : z + 3], z) for z in range(0, 7, 3)]
    ids, moments = combine_moments(parts)
    rows = rows_from_moments(ids, moments, (40.0, 5.0, 5.0))
    assert [r["id"] for r in rows] == [r["id"] for r in whole]
    for a, b in zip(rows, whole, strict=True):
        assert a == pytest.approx(b)


def test_instance_metrics_reach_mlflow(tmp_path, monkeypatch, empty_mlflow_db) -> None:
    """evaluate_stack's ``instances`` block is logged as test_instances.* metrics."""
    from mlflow import MlflowClient

    from mitoseg import tracking
    from mitoseg.evaluate import evaluate_stack
    from mitoseg.inference.plan import InferencePlan
    from tracking_state import reset_tracking, seed_store

    seed_store(empty_mlflow_db, tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    reset_tracking()
    try:
        tracking.configure_tracking(root=tmp_path)
        images = np.full((2, 16, 16), 10, dtype=np.uint8)
        images[:, 4:9, 4:9] = 200
        plan = InferencePlan.default_for(1, 1, tile_size=16, halo=4, min_object_size=0)
        result = evaluate_stack(lambda b: b, images, (images > 10).astype(np.uint8), plan)
        assert result.metrics["instances"]["iou_75"]["ap"] == 1.0
        with tracking.start_training_run({}, {}) as run:
            run_id = run.info.run_id
        logged = tracking.log_evaluation(run_id, result.metrics, [])
        metrics = MlflowClient().get_run(run_id).data.metrics
        for key in ("iou_50.f1", "iou_50.ap", "iou_75.ap", "iou_75.precision", "n_true"):
            assert metrics[f"test_instances.{key}"] == logged[f"test_instances.{key}"]
        assert metrics["test_instances.n_true"] == 1.0
        assert metrics["test_iou"] == 1.0  # the existing keys are still there
    finally:
        reset_tracking()


def _random_labels(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels, _ = instance_labels(rng.random((4, 12, 13)) > 0.6)
    return labels


def _unique_firsts(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids, first = np.unique(labels.ravel(), return_index=True)
    return ids[ids > 0], first[ids > 0]


@pytest.mark.parametrize(
    "case",
    ["scan_order", "shuffled_ids", "missing_id", "empty", "one_voxel"],
)
def test_first_voxels_equals_unique_return_index(case: str) -> None:
    labels = _random_labels().astype(np.int64)
    if case == "shuffled_ids":  # not numbered in scan order: the sorting path
        perm = np.random.default_rng(1).permutation(int(labels.max())) + 1
        labels = np.where(labels > 0, perm[labels - 1], 0)
    elif case == "missing_id":
        labels[labels == 2] = 0
    elif case == "empty":
        labels[:] = 0
    elif case == "one_voxel":
        labels[:] = 0
        labels[1, 2, 3] = 7
    ids, flat = first_voxels(labels)
    ref_ids, ref_flat = _unique_firsts(labels)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(flat, ref_flat)
    assert ids.dtype == np.int64 and flat.dtype == np.int64


def test_object_moments_dense_and_sorted_paths_agree(monkeypatch) -> None:
    labels = _random_labels(3)
    image = np.random.default_rng(4).integers(0, 255, labels.shape).astype(np.uint8)
    ids, dense = object_moments(labels, image, 5)
    monkeypatch.setattr(objects, "_DENSE_LIMIT", 0)  # force np.unique everywhere
    ids_sorted, sorted_ = object_moments(labels, image, 5)
    np.testing.assert_array_equal(ids, ids_sorted)
    np.testing.assert_array_equal(dense, sorted_)
    # large sparse ids take the sorting path by themselves
    monkeypatch.undo()
    big = np.where(labels > 0, labels.astype(np.int64) * 10**8, 0)
    ids_big, m_big = object_moments(big, image, 5)
    np.testing.assert_array_equal(ids_big, ids * 10**8)
    np.testing.assert_array_equal(m_big, dense)
