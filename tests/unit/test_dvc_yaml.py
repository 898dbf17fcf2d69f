"""dvc.yaml is complete: every stage depends on its script, on every ``src/mitoseg`` module
the script imports (transitively), and only on params sections that exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def _module_file(name: str) -> Path | None:
    parts = name.split(".")
    base = SRC.joinpath(*parts)
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _imports(path: Path) -> set[str]:
    """``mitoseg`` modules imported anywhere in ``path`` (function bodies included)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("mitoseg")}
        elif (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and (node.module or "").startswith("mitoseg")
        ):
            out.add(node.module)
            # `from mitoseg import tracking` imports a submodule
            out |= {
                f"{node.module}.{a.name}"
                for a in node.names
                if _module_file(f"{node.module}.{a.name}") is not None
            }
    return out


def _closure(script: Path) -> set[Path]:
    seen: set[Path] = set()
    todo = [script]
    while todo:
        for name in _imports(todo.pop()):
            f = _module_file(name)
            if f is not None and f not in seen:
                seen.add(f)
                todo.append(f)
    return seen


def _covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(ROOT).as_posix()
    return any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps)


STAGES = sorted(DVC["stages"])


@pytest.mark.parametrize("name", STAGES)
def test_stage_lists_its_script_and_modules(name: str) -> None:
    stage = DVC["stages"][name]
    script = re.search(r"python (pipelines/\S+\.py)", stage["cmd"]).group(1)
    deps = stage["deps"]
    assert script in deps
    needed = {
        f for f in _closure(ROOT / script) if f.name != "__init__.py" or f.parent.name != "mitoseg"
    }
    missing = sorted(f.relative_to(ROOT).as_posix() for f in needed if not _covered(f, deps))
    assert not missing, f"stage {name}: add to deps: {missing}"


@pytest.mark.parametrize("name", STAGES)
def test_stage_params_exist(name: str) -> None:
    for key in DVC["stages"][name].get("params", []):
        node = PARAMS
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"stage {name}: params key {key}"
            node = node[part]


def test_top_level_metrics_and_plots() -> None:
    assert DVC["metrics"] == ["artifacts/evaluate/metrics.json"]
    assert any("artifacts/train/history.csv" in p for p in DVC["plots"])
