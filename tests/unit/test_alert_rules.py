"""The Prometheus alert rules in ``dev/monitoring`` pass ``promtool check rules`` and their
unit tests (``promtool test rules``); every alert has a test case; the Grafana dashboard
queries only metrics the rules or the service export."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

MONITORING = Path(__file__).resolve().parents[2] / "dev" / "monitoring"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not installed (Debian package prometheus; .ci/run installs it)",
)


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=MONITORING, capture_output=True, text=True, timeout=120
    )


@needs_promtool
def test_rules_are_valid() -> None:
    res = _promtool("check", "rules", "alerts.yml")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS: 5 rules found" in res.stdout


@needs_promtool
def test_rule_unit_tests_pass() -> None:
    res = _promtool("test", "rules", "alerts_test.yml")
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_alert_has_a_firing_test_case() -> None:
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    tests = yaml.safe_load((MONITORING / "alerts_test.yml").read_text())["tests"]
    fired = {
        case["alertname"] for t in tests for case in t["alert_rule_test"] if case.get("exp_alerts")
    }
    assert alerts == fired


def test_dashboard_panels_query_exported_metrics() -> None:
    dashboard = json.loads((MONITORING / "grafana_dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 8
    names = {n for e in exprs for n in re.findall(r"\b((?:mitoseg|bentoml)_[a-z_]+)", e)}
    source = (MONITORING.parents[1] / "src" / "mitoseg" / "serving" / "monitoring.py").read_text()
    for name in names:
        base = re.sub(r"_(bucket|sum|count|total)$", "", name)
        assert base.startswith("bentoml_service_request") or f'"{base}"' in source, name
