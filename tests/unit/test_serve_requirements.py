"""The Bento installs only what serving needs, pinned exactly as in requirements.lock."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from dev.serve_requirements import (
    HEADER,
    LOCK,
    ROOT,
    SERVE_LOCK,
    SUBSTITUTES,
    read_lock,
    serve_requirements,
)


def _pins(path: Path) -> dict[str, Requirement]:
    lines = [ln for ln in path.read_text().splitlines() if ln and not ln.startswith("#")]
    return {canonicalize_name(r.name): r for r in map(Requirement, lines)}


def test_bentofile_uses_the_generated_file() -> None:
    python = yaml.safe_load((ROOT / "bentofile.yaml").read_text())["python"]
    assert "packages" not in python
    assert (ROOT / "src" / python["requirements_txt"]).resolve() == SERVE_LOCK


def test_generated_file_is_current() -> None:
    expected = HEADER + "\n".join(serve_requirements()) + "\n"
    assert SERVE_LOCK.read_text() == expected, "stale: run make src/requirements-serve.lock"


def test_serve_pins_are_a_subset_of_the_lock_with_equal_pins() -> None:
    lock = read_lock(LOCK)
    substitutes = {canonicalize_name(v.split("[")[0]): k for k, v in SUBSTITUTES.items()}
    for name, req in _pins(SERVE_LOCK).items():
        locked_as = substitutes.get(name, name)
        assert locked_as in lock, f"{name} is not in requirements.lock"
        assert str(req.specifier) == f"=={lock[locked_as]}", name


def test_serving_needs_no_pipeline_tooling() -> None:
    names = set(_pins(SERVE_LOCK))
    assert {"bentoml", "keras", "tensorflow", "openvino", "tifffile"} <= names
    assert not names & {"dvc", "great-expectations", "mlflow", "pytest"}
    assert {"dask", "distributed", "zarr", "s3fs"} <= names  # the volume job endpoint
    assert "tensorflow-cpu" not in names


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("numpy>=1\n", r"lock:1: expected name==version, got 'numpy>=1'"),
        ("# c\n\nnumpy==1.26.4\n==2\n", r"lock:4: expected name==version, got '==2'"),
    ],
)
def test_read_lock_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "x.lock"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_lock(path)
