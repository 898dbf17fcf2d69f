"""mitoseg.tracking against a real ``mlflow server`` with S3 artifacts (SeaweedFS).

The server (the dev stack's launcher ``dev.stack.run_mlflow_server``, also behind
``make stack``) runs on a free loopback port with a sqlite backend and
``--artifacts-destination s3://<bucket>/mlartifacts`` (proxied artifact serving) on the
session ``s3_server``. A run with a tiny Keras model is logged, registered, loaded back
via ``models:/<name>@champion`` through the server, and the artifact objects are checked
in the bucket with boto3.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dev.stack import MlflowServer, run_mlflow_server
from mitoseg import tracking
from mitoseg.config import RegisterConfig
from servers import S3Server
from tracking_state import reset_tracking

pytestmark = pytest.mark.integration

BUCKET = "mitoseg-mlflow"


@pytest.fixture(scope="module")
def mlflow_server(
    s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MlflowServer]:
    """``mlflow server`` (1 worker, job execution off) with S3 artifacts; stopped afterwards."""
    with run_mlflow_server(tmp_path_factory.mktemp("mlflow_server"), s3_server, BUCKET) as server:
        yield server


@pytest.fixture
def client_env(
    mlflow_server: MlflowServer, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """Point this process at the server (and S3); restore env and tracking state afterwards."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    reset_tracking()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    yield mlflow_server.url
    reset_tracking()


def _tiny_model() -> Any:
    import keras

    keras.utils.set_random_seed(1)
    inp = keras.Input((None, None, 1))
    out = keras.layers.Conv2D(1, 3, padding="same", activation="sigmoid")(inp)
    return keras.Model(inp, out)


def test_log_register_and_load_through_server(
    client_env: str, mlflow_server: MlflowServer, s3_server: S3Server, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    assert tracking.configure_tracking() == client_env
    exp = MlflowClient(client_env).get_experiment_by_name("mitoseg")
    assert exp.artifact_location.startswith("mlflow-artifacts:/")

    model = _tiny_model()
    x = np.random.default_rng(0).random((1, 16, 16, 1), dtype=np.float32)
    expected = model.predict(x, verbose=0)
    with tracking.start_training_run(
        {"model": {"depth": 1}}, {"git_commit": "feedbeef"}, "server-run"
    ) as run:
        uri = tracking.log_keras_model(model, 2, class_names=["background", "mitochondria"])
    run_id = run.info.run_id
    figure = tmp_path / "figure.png"
    figure.write_bytes(b"not really a png")
    tracking.log_evaluation(run_id, {"iou": 0.6, "threshold": 0.45}, [figure])
    from mitoseg.inference.plan import InferencePlan

    plan = InferencePlan.default_for(1, 2, tile_size=64, halo=8, threshold=0.45)
    tracking.log_inference_plan(run_id, plan.write(tmp_path / "plan.json"))

    cfg = RegisterConfig(model_name="server-unet")
    first = tracking.register_model(run_id, "iou", 0.6, cfg, "test:abc")
    assert (first["version"], first["alias"], first["reason"]) == (1, "champion", "first")
    second = tracking.register_model(run_id, "iou", 0.5, cfg, "test:abc")
    assert (second["version"], second["alias"]) == (2, "challenger")

    loaded = tracking.load_model("models:/server-unet@champion")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), expected, rtol=1e-6)
    np.testing.assert_allclose(tracking.load_model(uri).predict(x, verbose=0), expected, rtol=1e-6)

    info = tracking.model_info("models:/server-unet@champion")
    assert (info["name"], info["version"], info["run_id"]) == ("server-unet", 1, run_id)
    assert info["git_commit"] == "feedbeef"
    assert tracking.load_inference_plan("models:/server-unet@champion") == plan  # via S3
    assert info["class_names"] == ["background", "mitochondria"]

    keys = [
        obj["Key"]
        for page in s3_server.client()
        .get_paginator("list_objects_v2")
        .paginate(Bucket=mlflow_server.bucket, Prefix="mlartifacts/")
        for obj in page.get("Contents", [])
    ]
    model_keys = [k for k in keys if "/models/" in k]
    assert any(k.endswith("/artifacts/MLmodel") for k in model_keys), keys
    assert any(k.endswith("/artifacts/data/model.keras") for k in model_keys), keys
    assert any(k.endswith(f"{run_id}/artifacts/evaluation/figure.png") for k in keys), keys
    assert not (tmp_path / "mlartifacts").exists()


def test_unknown_alias_through_server(client_env: str) -> None:
    tracking.configure_tracking()
    with pytest.raises(
        tracking.ModelNotFoundError,
        match=r"unknown registered model 'never-registered' \(models:/never-registered@champion\)"
        r" in tracking store http://127\.0\.0\.1:\d+",
    ):
        tracking.load_model("models:/never-registered@champion")
