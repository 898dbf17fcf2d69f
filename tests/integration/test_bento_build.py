"""``mitoseg bento build``: model hand-over into the BentoML store and the GPU Bento."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
MITOSEG = Path(sys.executable).with_name("mitoseg")
BENTOML = Path(sys.executable).with_name("bentoml")


def run(cmd: list[str], home: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BENTOML_HOME": str(home), "TF_CPP_MIN_LOG_LEVEL": "3"}
    env["BENTOML_DO_NOT_TRACK"] = "True"
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import keras

    from mitoseg.config import ModelConfig
    from mitoseg.model.unet import build_unet

    keras.utils.set_random_seed(1)
    model = build_unet(ModelConfig(depth=2, base_filters=4, batch_norm=False, dropout=0.0), 2)
    path = tmp_path_factory.mktemp("model") / "tiny.keras"
    model.save(path)
    return path


def test_bento_build_packs_model_and_targets_gpu(tiny_model: Path, tmp_path: Path) -> None:
    home = tmp_path / "bentoml"
    res = run([str(MITOSEG), "bento", "build", "--model", str(tiny_model), "--version", "t1"], home)
    assert res.stdout.strip().splitlines()[-1] == "mitoseg:t1"
    model_tag = res.stderr.split("model ", 1)[1].split()[0]
    assert model_tag.startswith("mitoseg-unet:")

    out = run([str(BENTOML), "get", "mitoseg:t1", "-o", "path"], home).stdout
    bento_dir = Path("".join(out.split()))  # rich may wrap a long path
    dockerfile = (bento_dir / "env" / "docker" / "Dockerfile").read_text()
    requirements = (bento_dir / "env" / "python" / "requirements.txt").read_text().split()
    assert "tensorflow[and-cuda]==2.21.0" in requirements
    assert not any(r.startswith("tensorflow-cpu") for r in requirements)
    assert "uv --directory $INSTALL_ROOT pip install -r" in dockerfile
    assert (bento_dir / "src" / "mitoseg" / "serving" / "service.py").is_file()
    assert not (bento_dir / "src" / "mitoseg" / "sample_data").exists()

    info = yaml.safe_load((bento_dir / "bento.yaml").read_text())
    assert info["service"] == "mitoseg.serving.service:MitoSeg"
    from mitoseg.config import load_section

    serve = load_section("serve", REPO / "params.yaml").model_dump()
    assert info["args"] == {"model_tag": model_tag, **serve}  # limits readable at import
    services = {s["name"]: s for s in info["services"]}
    runner = services["mitoseg-unet-runner"]
    assert runner["config"]["resources"] == {"gpu": 1}
    assert [m["tag"] for m in runner["models"]] == [model_tag]
    assert services["mitoseg"]["dependencies"] == [{"service": "mitoseg-unet-runner"}]
    routes = {r["route"] for r in info["schema"]["routes"]}
    assert {"/segment", "/segment_stack", "/stats", "/metadata"} <= routes

    # the exported Bento (what containerize builds from) carries the model file
    archive = tmp_path / "mitoseg.bento"
    run([str(BENTOML), "export", "mitoseg:t1", str(archive)], home)
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    version = model_tag.split(":")[1]
    assert f"./models/mitoseg-unet/{version}/model.keras" in names
    assert f"./models/mitoseg-unet/{version}/inference_plan.json" in names

    # importing the same weights with the same settings again reuses the stored model
    res = run([str(MITOSEG), "bento", "build", "--model", str(tiny_model), "--version", "t2"], home)
    assert res.stderr.split("model ", 1)[1].split()[0] == model_tag


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "{tmp}/nope.keras"], "{tmp}/nope.keras: model file not found"),
        (["--bentofile", "no.yaml"], "no.yaml: bentofile not found"),
        (["--build-ctx", "{tmp}/nosrc"], "{tmp}/nosrc: build context directory not found"),
    ],
)
def test_bento_build_errors(tmp_path: Path, tiny_model: Path, args: list, message: str) -> None:
    """Refused before anything is built; a missing bentofile or build context before the
    model is loaded or imported (the BentoML store stays empty)."""
    home = tmp_path / "bentoml"
    args = ["--model", str(tiny_model), *(a.format(tmp=tmp_path) for a in args)]
    res = run([str(MITOSEG), "bento", "build", *args], home, check=False)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1] == f"error: {message.format(tmp=tmp_path)}"
    assert not (home / "models").exists() and not (home / "bentos").exists()


def test_cli_start_imports_neither_bentoml_nor_tensorflow() -> None:
    code = (
        "import sys, mitoseg.cli; "
        "print(sorted(m for m in ('bentoml', 'tensorflow', 'keras') if m in sys.modules))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


#: Run in a fresh interpreter with BENTOML_HOME set: the runner's model loading
#: (``load_deployment`` + ``load_predictor``) on a stored model; argv: tag, input, output.
RUNNER_LOAD = r"""
import sys
import bentoml
import numpy as np
from mitoseg.serving import service

deployment = service.load_deployment(bentoml.models.BentoModel(sys.argv[1]))
predict = service.load_predictor(deployment)
np.save(sys.argv[3], predict(np.load(sys.argv[2])))
heavy = sorted(m for m in ("tensorflow", "keras") if m in sys.modules)
assert not heavy, f"the runner imported {heavy}"
"""


def test_an_openvino_plan_is_served_from_its_saved_model_without_tensorflow(
    tiny_model: Path, tmp_path: Path
) -> None:
    import keras
    import numpy as np

    from mitoseg.inference.plan import PLAN_FILE, InferencePlan
    from mitoseg.inference.runtime import OPENVINO_FILE, compile_predictor

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "tiny.keras").write_bytes(tiny_model.read_bytes())
    plan = InferencePlan.default_for(1, 4, runtime="openvino", precision="fp32")
    plan.write(folder / PLAN_FILE)
    home = tmp_path / "bentoml"
    code = (
        "from mitoseg.serving.bento import import_model; "
        f"print(import_model({str(folder / 'tiny.keras')!r})[0])"
    )
    tag = run([sys.executable, "-c", code], home).stdout.strip().splitlines()[-1]
    stored = home / "models" / "mitoseg-unet" / tag.split(":")[1]
    assert (stored / OPENVINO_FILE).is_file() and (stored / "model_openvino.bin").is_file()
    assert yaml.safe_load((stored / "model.yaml").read_text())["labels"]["openvino_file"] == (
        OPENVINO_FILE
    )

    x = np.random.default_rng(0).random((2, 32, 48, 1), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    cmd = [sys.executable, "-c", RUNNER_LOAD, tag, str(tmp_path / "x.npy"), str(tmp_path / "y.npy")]
    run(cmd, home)
    model = keras.saving.load_model(tiny_model, compile=False)
    expected = compile_predictor(model, "openvino", "fp32")(x)
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), expected)
