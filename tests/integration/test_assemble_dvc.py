"""The ``assemble`` stage under real ``dvc repro`` in a throw-away git + DVC repository.

The project's ``dvc.yaml``, ``params.yaml``, ``data.dvc``, ``pipelines/`` and ``src/``
are copied; the stages run with ``PYTHONPATH`` on the copy. Checked: with
``source.volume: null`` the assembled data is ``data/raw`` byte for byte (the same DVC
hash as ``data.dvc``); with a volume and its label store, validate accepts the assembled
data; an unchanged rerun of ``assemble`` (``always_changed``) reruns nothing after it,
and one more label does.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from dvc_repo import dvc_env, run
from mitoseg import labelstore
from mitoseg.data.fetch import fetch
from mitoseg.data.layout import read_split
from volumes import write_ome_zarr

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CLASSES = {"background": 0, "mitochondria": 255}


def _repo(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml", "data.dvc"):
        shutil.copy(REPO / name, repo / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pipelines", "src"):
        shutil.copytree(REPO / name, repo / name, ignore=ignore)
    env = {k: v for k, v in dvc_env(tmp_path).items() if not k.startswith("MLFLOW_")}
    env.update(
        PYTHONPATH=str(repo / "src"),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    _run(["git", "init", "-q"], repo, env)
    _run(["dvc", "init", "-q"], repo, env)
    fetch("sample", repo / "data" / "raw", progress=False)
    return repo, env


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    return run(args, cwd, env, stderr=True)


def _lock_md5(repo: Path, stage: str, path: str) -> str:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"][stage]
    return next(o["md5"] for o in lock["outs"] if o["path"] == path)


def test_canonical_source_is_data_raw_as_it_is(tmp_path: Path) -> None:
    repo, env = _repo(tmp_path)
    _run(["dvc", "repro", "validate"], repo, env)
    data_dvc = yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"]
    assert _lock_md5(repo, "assemble", "artifacts/data") == data_dvc
    status = yaml.safe_load(_run(["dvc", "status", "--with-deps", "validate", "--json"], repo, env))
    assert status == {"assemble": ["always changed"]}
    again = _run(["dvc", "repro", "validate"], repo, env)
    assert "Running stage 'assemble'" in again
    assert "Stage 'validate' didn't change, skipping" in again


def test_volume_and_label_store_feed_the_pipeline(tmp_path: Path) -> None:
    repo, env = _repo(tmp_path)
    images, masks = read_split(repo / "data" / "raw", "train")
    volume = write_ome_zarr(
        tmp_path / "vol.ome.zarr", images[:, :128, :192], (50.0, 4.6, 4.6), (1, 64, 64)
    )
    store = repo / "data" / "labels"
    labelstore.init_store(store, volume, CLASSES, 254)
    prov = labelstore.make_provenance("python", author="t")
    for z, split in ((2, "train"), (6, "train"), (12, "test")):
        labelstore.add_slice(store, z, masks[z, :128, :192], prov, split=split)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["source"]["volume"] = "store"
    params["base"]["ignore_value"] = 254
    (repo / "params.yaml").write_text(yaml.safe_dump(params))

    out = _run(["dvc", "repro", "validate"], repo, env)
    assert "(train: 2 labelled of 6 slices, test: 1 labelled of 3 slices, context 1)" in out
    assert "validation passed: 9 slices" in out
    train, _ = read_split(repo / "artifacts" / "data", "train")
    np.testing.assert_array_equal(train, images[[1, 2, 3, 5, 6, 7], :128, :192])
    before = _lock_md5(repo, "assemble", "artifacts/data")
    assert "Stage 'validate' didn't change, skipping" in _run(
        ["dvc", "repro", "validate"], repo, env
    )

    # one more labelled slice: assemble's output changes, so validate reruns
    labelstore.add_slice(store, 9, masks[9, :128, :192], prov, split="train")
    _run(["dvc", "repro", "assemble"], repo, env)
    assert _lock_md5(repo, "assemble", "artifacts/data") != before
    status = yaml.safe_load(_run(["dvc", "status", "--with-deps", "validate", "--json"], repo, env))
    assert status == {
        "assemble": ["always changed"],
        "validate": [{"changed deps": {"artifacts/data": "modified"}}],
    }
    assert "validation passed: 12 slices" in _run(["dvc", "repro", "validate"], repo, env)
