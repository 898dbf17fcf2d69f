"""One inference plan from the evaluate stage to the endpoint (real sqlite MLflow store).

A small UNet is logged into a real embedded MLflow store, the DVC stage scripts
``evaluate`` and ``register`` run on a real EM crop (the bundled VNC sample), and then

* the plan the evaluate stage wrote beside ``model.keras`` is the one the registry
  returns for ``models:/mitoseg-unet@champion``, with the threshold chosen on validation;
* ``mitoseg predict`` on the champion writes the mask the evaluate stage scored;
* ``mitoseg serve`` of the champion answers ``/segment`` with the identical mask, and
  ``/metadata`` reports the validated threshold and engine (an int8 engine's calibration
  images travel with the plan through MLflow and the BentoML store), and ``/drift``
  compares the requests with the reference profile the evaluate stage built from the
  validate stage's ``slices.csv`` (it travels the same way).

Nothing is mocked: every step is the shipped command in a child process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import tifffile
import yaml

from tracking_state import seed_store

# slow: the module fixture runs the stages in child processes, 63 s before the first
# test and over 2 minutes in all on a 2-core AMD EPYC (AVX2)
pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "src" / "mitoseg" / "sample_data" / "vnc"
MITOSEG = (str(Path(sys.executable).parent / "mitoseg"),)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 300) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, empty_mlflow_db: Path) -> dict:
    root = tmp_path_factory.mktemp("e2e")
    seed_store(empty_mlflow_db, root)  # the stages use it as they would a migrated one
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "BENTOML_HOME": str(root / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "True",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    raw = root / "data" / "raw"
    for split in ("train", "test"):
        for name in ("images", "masks"):
            stack = tifffile.imread(SAMPLE / split / f"{name}.tif")[:4, :256, :320]
            (raw / split).mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(raw / split / f"{name}.tif", stack)
    from mitoseg.data.fetch import sample_voxel_size

    voxel = sample_voxel_size(SAMPLE)  # as `mitoseg data fetch --source sample` records it
    (raw / "dataset.json").write_text(
        json.dumps({"source": "test", "mask_kind": "binary", "voxel_size_nm": voxel})
    )
    patches = root / "artifacts" / "patches"
    patches.mkdir(parents=True)
    (patches / "meta.json").write_text(json.dumps({"val_slices": [1, 3]}))
    params = root / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "base": {"classes": {"background": 0, "mitochondria": 255}},
                "evaluate": {"tile_size": 256, "figure_slices": 1},  # every engine is tried
                "register": {"model_name": "mitoseg-unet"},
            }
        )
    )
    train = root / "artifacts" / "train"
    train.mkdir(parents=True)
    code = (
        "import json, sys, keras\n"
        "from mitoseg import tracking\n"
        "from mitoseg.config import ModelConfig\n"
        "from mitoseg.model.unet import build_unet\n"
        "keras.utils.set_random_seed(3)\n"
        "m = build_unet(ModelConfig(depth=2, base_filters=4, batch_norm=False, dropout=0.0), 2)\n"
        "m.save(sys.argv[1])\n"
        "tracking.configure_tracking()\n"
        "with tracking.start_training_run({'preset': 'test'}, {}, 'e2e') as run:\n"
        "    tracking.log_keras_model(m, 2, class_names=['background', 'mitochondria'])\n"
        "from mitoseg.train_info import TrainInfo\n"
        "TrainInfo(run_id=run.info.run_id, experiment_id=run.info.experiment_id,\n"
        "    model_path=sys.argv[1], best_epoch=1, epochs_run=1, train_seconds=0.0,\n"
        "    patches_per_second=0.0, params={}, n_classes=2,\n"
        "    class_names=['background', 'mitochondria'], resumed=False,\n"
        "    stop_reason='completed', run_key='e2e', init_from=None).write(sys.argv[2])\n"
    )
    _run([sys.executable, "-c", code, str(train / "model.keras"), str(train / "train.json")],
         root, env)  # fmt: skip
    _run([sys.executable, str(REPO / "pipelines" / "validate.py"), "--raw", "data/raw",
          "--out", "artifacts/validate"], root, env)  # fmt: skip
    _run([sys.executable, str(REPO / "pipelines" / "evaluate.py"),
          "--model", "artifacts/train/model.keras", "--train-info", "artifacts/train/train.json",
          "--raw", "data/raw", "--patches", "artifacts/patches", "--out", "artifacts/evaluate",
          "--plan", "artifacts/train/inference_plan.json", "--no-progress",
          "--slices", "artifacts/validate/slices.csv",
          "--profile", "artifacts/train/reference_profile.json"], root, env)  # fmt: skip
    _run([sys.executable, str(REPO / "pipelines" / "register.py"),
          "--train-info", "artifacts/train/train.json",
          "--metrics", "artifacts/evaluate/metrics.json",
          "--out", "artifacts/register/registration.json"], root, env)  # fmt: skip
    return {"root": root, "env": env, "raw": raw, "voxel": voxel}


def test_the_registry_returns_the_plan_the_stage_wrote(project: dict) -> None:
    root = project["root"]
    written = json.loads((root / "artifacts" / "train" / "inference_plan.json").read_text())
    assert written["source"] == "evaluate" and written["threshold_source"] == "validation"
    assert written["receptive_field"] > 1 and written["halo"] > 0
    # the data's voxel size travels into the plan (what the bioimage.io export reads)
    assert written["voxel_size_nm"] == project["voxel"] == [50.0, 4.6, 4.6]
    code = (
        "import json; from mitoseg import tracking; "
        "print(json.dumps(tracking.load_inference_plan('models:/mitoseg-unet@champion')"
        ".model_dump(mode='json')))"
    )
    out = _run([sys.executable, "-c", code], root, project["env"])
    assert json.loads(out.strip().splitlines()[-1]) == written
    metrics = json.loads((root / "artifacts" / "evaluate" / "metrics.json").read_text())
    assert metrics["threshold"] == written["threshold"]
    assert 0 <= metrics["validation_calibration"]["ece"] <= 1
    # the test data's fingerprint travels from evaluate into the registered version
    from mitoseg.tracking import compute_test_data_id

    registration = json.loads((root / "artifacts/register/registration.json").read_text())
    assert metrics["test_data_id"] == registration["test_data_id"]
    assert metrics["test_data_id"] == compute_test_data_id(project["raw"])
    report = json.loads((root / "artifacts" / "evaluate" / "plan_report.json").read_text())
    assert report["receptive_field"]["full"] == written["receptive_field"]
    # the choices saw the whole training stack (plan_on: labelled), the engines only the
    # validation block [1, 3]
    assert report["plan_on"] == "labelled"
    assert report["engines_timed_on_slices"] == [1, 3]
    assert report["chosen_on_slices"] == [0, 1, 2, 3]  # the 4 training slices
    chosen = [t for t in report["engines"] if t["engine"] == "keras/fp32"]
    assert chosen and chosen[0]["eligible"]  # the reference engine is always tried


def test_serve_returns_the_mask_predict_writes(project: dict) -> None:
    root, env = project["root"], project["env"]
    image = tifffile.imread(project["raw"] / "test" / "images.tif")[0]
    tifffile.imwrite(root / "slice.tif", image)
    champion = "models:/mitoseg-unet@champion"
    _run([*MITOSEG, "--no-progress", "predict", "--model", champion, str(root / "slice.tif"),
          "--out", str(root / "masks")], root, env)  # fmt: skip
    expected = tifffile.imread(root / "masks" / "slice_mask.tif")
    assert expected.shape == image.shape and 0 < (expected > 0).mean() < 1  # not trivial
    port = _free_port()
    log = (root / "serve.log").open("wb")
    proc = subprocess.Popen(
        [*MITOSEG, "serve", "--model", champion, "--port", str(port), "--params",
         str(root / "params.yaml")],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (root / "serve.log").read_text()[-4000:]
            try:
                if requests.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, (root / "serve.log").read_text()[-4000:]
            time.sleep(0.5)
        with (root / "slice.tif").open("rb") as fh:
            r = requests.post(f"{url}/segment", files={"image": fh}, data={"format": "tiff"})
        assert r.status_code == 200, r.text
        served = tifffile.imread(__import__("io").BytesIO(r.content))
        np.testing.assert_array_equal(served, expected)
        meta = requests.post(f"{url}/metadata", json={}, timeout=30).json()
        plan = json.loads((root / "artifacts" / "train" / "inference_plan.json").read_text())
        assert meta["threshold"] == plan["threshold"] and meta["version"] == "1"
        assert meta["engine"] == f"{plan['runtime']}/{plan['precision']}"
        assert meta["plan"] == plan
        drift = requests.get(f"{url}/drift", timeout=30).json()
        profile = json.loads((root / "artifacts" / "train" / "reference_profile.json").read_text())
        assert drift["reference"] and drift["version"] == "1" and drift["window_slices"] == 1
        assert drift["reference_slices"] == profile["n_slices"] == 4  # the 4 training slices
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


def test_export_bioimageio_takes_the_data_voxel_size(project: dict) -> None:
    """``mitoseg export bioimageio --model models:/mitoseg-unet@champion`` with no
    ``--voxel-size``: the registered model and the plan logged with it end up in the
    package (the validated threshold; the pixel size from the data, through the plan)."""
    from bioimageio.spec import load_description

    root, out = project["root"], project["root"] / "pkg"
    _run([*MITOSEG, "--no-progress", "export", "bioimageio", "--model",
          "models:/mitoseg-unet@champion", "--out", str(out), "--weights", "keras_v3",
          "--max-side", "128", "--no-test"], root, project["env"])  # fmt: skip
    descr = load_description(out / "rdf.yaml")
    _, y_nm, x_nm = project["voxel"]
    assert [a.scale for a in descr.inputs[0].axes[1:3]] == pytest.approx([y_nm, x_nm])
    plan = json.loads((root / "artifacts" / "train" / "inference_plan.json").read_text())
    assert descr.config.model_extra["mitoseg"]["threshold"] == plan["threshold"]
    assert "models:/mitoseg-unet@champion" in (out / "README.md").read_text()
