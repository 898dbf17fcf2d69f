"""DVC round trip through the real loopback S3: ``dvc add`` -> ``push`` -> wipe -> ``pull``.

Uses the project's own ``.dvc/config`` (default remote ``storage`` at
``s3://mitoseg-dvc/store``) in a throw-away git + DVC repository; the endpoint and
credentials go to ``.dvc/config.local`` via ``dvc remote modify --local``, exactly as a
developer would configure them.
"""

from __future__ import annotations

import configparser
import shutil
from pathlib import Path

import numpy as np
import pytest

from dvc_repo import dvc_env, run
from mitoseg.data.fetch import fetch
from servers import S3Server

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _dvc_env(tmp_path: Path) -> dict[str, str]:
    return dvc_env(tmp_path)


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    return run(args, cwd, env, timeout=120)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_project_remote_config() -> None:
    config = configparser.ConfigParser()
    config.read(REPO / ".dvc" / "config")
    assert config["core"]["remote"] == "storage"
    section = config["'remote \"storage\"'"]  # DVC writes the quotes literally
    assert section["url"] == "s3://mitoseg-dvc/store"
    assert set(section) == {"url"}  # no endpoint or credentials in the committed config


def test_data_dvc_matches_a_fresh_sample_fetch(tmp_path: Path) -> None:
    import yaml

    out = yaml.safe_load((REPO / "data.dvc").read_text())["outs"][0]
    assert out["path"] == "data/raw"
    env = _dvc_env(tmp_path)
    repo = tmp_path / "repo"
    repo.mkdir()
    _run(["git", "init", "-q"], repo, env)
    _run(["dvc", "init", "-q"], repo, env)
    shutil.copy(REPO / "data.dvc", repo / "data.dvc")
    fetch("sample", repo / "data" / "raw", progress=False)
    status = _run(["dvc", "status", "data.dvc"], repo, env)
    assert "modified" not in status, status  # only "not in cache" in a fresh repository
    _run(["dvc", "commit", "-f", "data.dvc"], repo, env)
    assert yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"] == out["md5"]


def test_push_wipe_pull_round_trip(s3_server: S3Server, tmp_path: Path) -> None:
    s3_server.make_bucket("mitoseg-dvc")
    env = _dvc_env(tmp_path)
    repo = tmp_path / "repo"
    repo.mkdir()
    _run(["git", "init", "-q"], repo, env)
    _run(["dvc", "init", "-q"], repo, env)
    shutil.copy(REPO / ".dvc" / "config", repo / ".dvc" / "config")
    for key, value in (
        ("endpointurl", s3_server.endpoint_url),
        ("access_key_id", s3_server.access_key),
        ("secret_access_key", s3_server.secret_key),
        ("region", s3_server.region),
    ):
        _run(["dvc", "remote", "modify", "--local", "storage", key, value], repo, env)
    assert "secret_access_key" not in (repo / ".dvc" / "config").read_text()

    fetch("sample", repo / "data" / "raw", progress=False)
    patches = repo / "artifacts" / "patches"
    patches.mkdir(parents=True)
    rng = np.random.default_rng(5)
    np.save(patches / "train_images.npy", rng.integers(0, 256, (8, 64, 64), dtype=np.uint8))
    np.save(patches / "train_masks.npy", (rng.random((8, 64, 64)) > 0.8).astype(np.uint8))
    (patches / "meta.json").write_text('{"patch_size": 64}\n')
    expected = {"data/raw": _tree(repo / "data" / "raw"), "artifacts/patches": _tree(patches)}

    _run(["dvc", "add", "data/raw", "artifacts/patches"], repo, env)
    pushed = _run(["dvc", "push"], repo, env)
    assert "pushed" in pushed
    keys = [
        o["Key"]
        for o in s3_server.client().list_objects_v2(Bucket="mitoseg-dvc", Prefix="store/")[
            "Contents"
        ]
    ]
    assert any(k.endswith(".dir") for k in keys)
    assert len(keys) >= 6 + 3 + 2  # files of both folders + their .dir manifests

    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "data" / "raw")
    shutil.rmtree(patches)
    _run(["dvc", "pull"], repo, env)
    for folder, files in expected.items():
        assert _tree(repo / folder) == files
    assert "up to date" in _run(["dvc", "status"], repo, env).lower()
