"""The tutorial "Segment your own volume" (docs/your-volume.md), run as a lab runs it.

Every step is a shipped command in a child process, in a throw-away git + DVC project
(the repository's ``dvc.yaml``, ``params.yaml``, ``pipelines/`` and ``src/`` copied, as
``tests/dvc_repo.py`` does; the MLflow store is the project's embedded ``mlflow.db``).
The numbers are the tutorial's steps:

1. the volume: an OME-Zarr made from real EM, the bundled VNC sample (train and test
   stacks one after the other, cropped to 256 x 256; it ships with the repository, so
   this test never skips);
2. ``mitoseg labels init`` and ``mitoseg labels add``: 3 labelled training slices and 2
   fixed test slices (``--split test``);
3. ``params.yaml`` points ``source.volume`` at the volume (small training settings),
   ``dvc repro``: a champion registered in the project's MLflow store;
4. ``mitoseg predict`` of the volume with ``models:/mitoseg-unet@champion`` (OME-Zarr out);
6. ``mitoseg suggest`` on the volume (step 5, napari, is looking);
7. the two most unsure unlabelled slices labelled (their masks from the sample's ground
   truth, standing in for a lab's painted corrections), ``train.init_from`` set to the
   champion, ``dvc repro`` again;
8. checked: round 2 was fine-tuned from the champion (``train.json`` and the run's MLflow
   tags), both rounds were scored on the same test labels (``test_data_id``), and the
   champion alias is where the comparison in ``registration.json`` says it must be (it
   moves only on a strictly higher test IoU), plus every step's outputs.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml

from dvc_repo import dvc_env, run
from mitoseg.data.fetch import sample_voxel_size
from volumes import write_ome_zarr

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.tutorial]

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "src" / "mitoseg" / "sample_data" / "vnc"
MITOSEG = str(Path(sys.executable).parent / "mitoseg")
CHAMPION = "models:/mitoseg-unet@champion"
SIDE = 256  # slices cropped to SIDE x SIDE: real EM, small enough to train in seconds
TRAIN_Z = (2, 7, 12)  # labelled training slices (volume z; the sample's train stack)
TEST_Z = (16, 18)  # fixed test slices (the sample's test stack follows its train stack)
ROUND2_SLICES = 2  # suggested slices labelled in round 2

# Small training and evaluation, so a round takes a minute or two on 2 cores: a depth-3
# UNet with 8 filters, 6 x 20 steps of 8 crops of 96 pixels; one engine (keras/fp32).
TINY = {
    "patchify": {"patch_size": 128, "step": 128},
    "augment": {"preview_samples": 1},
    "train": {
        "model": {"depth": 3, "base_filters": 8},
        "epochs": 6,
        "steps_per_epoch": 20,
        "batch_size": 8,
        "crop_size": 96,
        "precise_bn_batches": 4,
    },
    "evaluate": {"tile_size": 256, "engines": ["keras/fp32"], "figure_slices": 1},
}


def _project(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A git + DVC project holding the repository's pipeline, and its environment."""
    repo = tmp_path / "project"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, repo / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pipelines", "src"):
        shutil.copytree(REPO / name, repo / name, ignore=ignore)
    stability = Path("benchmarks") / "results" / "stability.json"  # a dep of `train`
    (repo / stability).parent.mkdir(parents=True)
    shutil.copy(REPO / stability, repo / stability)
    env = {k: v for k, v in dvc_env(tmp_path).items() if not k.startswith("MLFLOW_")}
    env.update(
        PYTHONPATH=str(repo / "src"),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        TF_CPP_MIN_LOG_LEVEL="3",
        MITOSEG_AUTHOR="tutorial",
    )
    run(["git", "init", "-q"], repo, env)
    run(["dvc", "init", "-q"], repo, env)
    return repo, env


def _sample_volume() -> tuple[np.ndarray, np.ndarray]:
    """The bundled VNC sample as one volume: train stack then test stack, cropped.

    Returns:
        ``(images, masks)``: ``(20, SIDE, SIDE)`` uint8 EM and its 0/255 mitochondria masks.
    """
    images, masks = [], []
    for split in ("train", "test"):
        images.append(tifffile.imread(SAMPLE / split / "images.tif")[:, :SIDE, :SIDE])
        masks.append(tifffile.imread(SAMPLE / split / "masks.tif")[:, :SIDE, :SIDE])
    return np.concatenate(images), np.concatenate(masks)


def _add_labels(repo: Path, env: dict[str, str], masks: np.ndarray, z: int, *extra: str) -> None:
    """``mitoseg labels add`` of slice ``z``, its mask saved as a TIFF first (as from napari)."""
    path = repo / "painted" / f"z{z}.tif"
    path.parent.mkdir(exist_ok=True)
    tifffile.imwrite(path, masks[z])
    run([MITOSEG, "labels", "add", "--store", "data/labels", "--z", str(z), "--mask", str(path),
         *extra], repo, env)  # fmt: skip


def _set_params(repo: Path, updates: dict[str, dict]) -> None:
    """Merge ``updates`` (section -> keys) into the project's params.yaml."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in updates.items():
        for key, value in values.items():
            if isinstance(value, dict):
                params[section].setdefault(key, {}).update(value)
            else:
                params[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _round(repo: Path) -> dict[str, dict]:
    """The records one ``dvc repro`` left: train.json, metrics.json, registration.json."""
    art = repo / "artifacts"
    return {
        "train": _json(art / "train" / "train.json"),
        "metrics": _json(art / "evaluate" / "metrics.json"),
        "registration": _json(art / "register" / "registration.json"),
        "dataset": _json(art / "data" / "dataset.json"),
    }


def test_segment_your_own_volume(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    t0 = time.monotonic()
    laps: dict[str, float] = {}

    def lap(step: str) -> None:
        laps[step] = round(time.monotonic() - t0 - sum(laps.values()), 1)

    repo, env = _project(tmp_path)
    images, masks = _sample_volume()
    voxel = tuple(sample_voxel_size(SAMPLE))
    volume = write_ome_zarr(tmp_path / "lab" / "em.ome.zarr", images, voxel, (1, SIDE, SIDE))

    # step 2: the label store, 3 training slices and 2 fixed test slices
    run([MITOSEG, "labels", "init", volume, "--store", "data/labels", "--ignore-value", "254"],
        repo, env)  # fmt: skip
    for z in TRAIN_Z:
        _add_labels(repo, env, masks, z)
    for z in TEST_Z:
        _add_labels(repo, env, masks, z, "--split", "test")
    _set_params(repo, {"source": {"volume": volume}, "base": {"ignore_value": 254}, **TINY})

    # step 3: round 1, a champion from 3 labelled slices
    lap("project, volume, labels")
    out = run(["dvc", "repro"], repo, env, timeout=600, stderr=True)
    lap("dvc repro 1")
    assert "(train: 3 labelled of 9 slices, test: 2 labelled of 5 slices, context 1)" in out
    first = _round(repo)
    assert first["train"]["init_from"] is None
    assert first["registration"]["version"] == 1
    assert first["registration"]["alias"] == "champion"
    assert first["registration"]["reason"] == "first"
    assert first["dataset"]["splits"]["train"]["labelled_slices"] == list(TRAIN_Z)
    assert first["dataset"]["splits"]["test"]["labelled_slices"] == list(TEST_Z)
    with (repo / "artifacts" / "evaluate" / "per_slice.csv").open() as fh:
        scored = list(csv.DictReader(fh))  # the labelled test slices only (stack indexes)
    test_slices = first["dataset"]["splits"]["test"]["volume_slices"]
    assert [test_slices[int(r["slice"])] for r in scored] == list(TEST_Z)
    assert all(int(r["labelled_pixels"]) == SIDE * SIDE for r in scored)
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}", f"sqlite:///{repo / 'mlflow.db'}")
    assert int(client.get_model_version_by_alias("mitoseg-unet", "champion").version) == 1

    # steps 4 and 6: predict the volume with the champion, rank its slices for labelling
    run([MITOSEG, "--no-progress", "predict", "--model", CHAMPION, volume,
         "--out", "pred.ome.zarr", "--workers", "1"], repo, env, timeout=600)  # fmt: skip
    lap("predict")
    from mitoseg.volume.store import open_volume

    pred = open_volume(str(repo / "pred.ome.zarr" / "labels" / "mask"))
    assert pred.shape == images.shape and pred.voxel_size_nm == pytest.approx(voxel)
    mask = pred.read(0, pred.shape[0])
    assert set(np.unique(mask)) <= {0, 1, 255} and 0 < (mask > 0).mean() < 1
    run([MITOSEG, "--no-progress", "suggest", volume, "--model", CHAMPION, "--out", "suggest",
         "--tile", "128"], repo, env, timeout=600)  # fmt: skip
    lap("suggest")
    report = _json(repo / "suggest" / "suggestions.json")
    ranked = [s["slice"] for s in sorted(report["slices"], key=lambda s: s["rank"])]
    assert sorted(ranked) == list(range(len(images)))  # every slice ranked, once
    assert tuple(report["shape"]) == images.shape and report["model"] == CHAMPION
    labelled = set(TRAIN_Z) | set(TEST_Z)
    todo = [z for z in ranked if z not in labelled][:ROUND2_SLICES]

    # step 7: round 2, the suggested slices labelled, fine-tuned from the champion
    for z in todo:
        _add_labels(repo, env, masks, z, "--note", f"suggest rank {ranked.index(z) + 1}",
                    "--model", CHAMPION)  # fmt: skip
    _set_params(repo, {"train": {"init_from": CHAMPION}})
    lap("labels")
    out = run(["dvc", "repro"], repo, env, timeout=600, stderr=True)
    lap("dvc repro 2")
    second = _round(repo)

    # step 8, checked: the store: every slice with its provenance, test slices unchanged
    store = _json(repo / "data" / "labels" / "store.json")
    entries = {e["z"]: e for e in store["entries"]}
    assert sorted(entries) == sorted(labelled | set(todo))
    assert {z for z, e in entries.items() if e["split"] == "test"} == set(TEST_Z)
    for z, e in entries.items():
        assert e["provenance"]["tool"] == "cli" and e["provenance"]["author"] == "tutorial"
        assert e["labelled_pixels"] == SIDE * SIDE and not e["history"]
        np.testing.assert_array_equal(tifffile.imread(repo / "data" / "labels" / e["file"]),
                                      masks[z])  # fmt: skip
    for z in todo:
        assert entries[z]["provenance"]["model"] == CHAMPION
        assert entries[z]["provenance"]["note"].startswith("suggest rank ")
    train_split = second["dataset"]["splits"]["train"]
    assert sorted(train_split["labelled_slices"]) == sorted({*TRAIN_Z, *todo})
    assert second["dataset"]["splits"]["test"] == first["dataset"]["splits"]["test"]

    # fine-tuned from the champion, on the same test labels
    assert second["train"]["init_from"] == CHAMPION
    tags = client.get_run(second["train"]["run_id"]).data.tags
    assert tags["init_from"] == CHAMPION and tags["init_from_version"] == "1"
    assert second["metrics"]["test_data_id"] == first["metrics"]["test_data_id"]
    reg = second["registration"]
    assert reg["version"] == 2 and reg["test_data_id"] == first["registration"]["test_data_id"]
    assert reg["previous_champion"]["version"] == 1
    assert reg["previous_champion"]["value"] == pytest.approx(first["metrics"]["iou"])
    assert reg["champion_rescored"] is None  # same test data: the numbers are compared

    # the champion moved only if the new test IoU is strictly better
    better = second["metrics"]["iou"] > first["metrics"]["iou"]
    assert reg["reason"] == ("better" if better else "not_better")
    assert reg["alias"] == ("champion" if better else "challenger")
    champion = client.get_model_version_by_alias("mitoseg-unet", "champion")
    assert int(champion.version) == (2 if better else 1)
    if not better:
        assert int(client.get_model_version_by_alias("mitoseg-unet", "challenger").version) == 2
    print(
        f"tutorial: round 1 IoU {first['metrics']['iou']:.4f}, round 2 IoU "
        f"{second['metrics']['iou']:.4f} ({reg['reason']}; champion v{champion.version}); "
        f"labelled in round 2: {todo}; {time.monotonic() - t0:.0f} s {laps}"
    )
