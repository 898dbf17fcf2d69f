"""Drift monitoring end to end: a real Prometheus scrapes a real ``mitoseg serve`` on
loopback and evaluates the repository's alert rules.

The served model is a UNet trained for seconds on the bundled VNC training slices, with
the reference profile of those slices (built from the validate stage's per-slice table)
beside it, as the evaluate stage stores it. VNC test slices keep the drift score low and
the drift alert silent; CDeep3M slices (another microscope and tissue, ``../shared/data``)
raise the score past the alert threshold, and ``MitosegInputDrift`` fires in Prometheus'
own rule evaluation. The rules are ``dev/monitoring/alerts.yml`` with their ``for:``
durations set to 0 s (the expressions and thresholds are the shipped ones), evaluated
every second; the drift window is 8 slices (at least 5 for a score).

``MITOSEG_MONITORING_FIGURE=docs/monitoring.png`` also renders the dashboard's drift
panels from Prometheus' range queries over the run (matplotlib; the docs' figure).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import tifffile
import yaml

from dev.stack import ALERT_RULES, run_prometheus
from servers import REPO, VNC, mitoseg_serve

pytestmark = pytest.mark.integration

CDEEP3M = REPO.parent / "shared" / "data" / "cdeep3m"
DRIFT_THRESHOLD = 0.7  # MitosegInputDrift's


def _prometheus_query(url: str, expr: str) -> list[dict[str, Any]]:
    r = requests.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10)
    r.raise_for_status()
    return r.json()["data"]["result"]


def _wait(what: str, probe: Any, timeout: float = 60.0) -> Any:
    """Poll ``probe()`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not seen within {timeout} s")
        time.sleep(0.5)


def _tiff(stack: np.ndarray) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, stack)
    return buf.getvalue()


def _render_panels(prom: str, start: float, out: Path) -> None:
    """Drift score, KS per feature, window foreground fraction and the alert state over
    the run, from Prometheus ``query_range`` (step 1 s), as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(expr: str) -> list[tuple[dict[str, str], np.ndarray, np.ndarray]]:
        params = {"query": expr, "start": start, "end": time.time(), "step": "1s"}
        r = requests.get(f"{prom}/api/v1/query_range", params=params, timeout=30).json()
        out = []
        for res in r["data"]["result"]:
            v = np.array(res["values"], dtype=float)
            out.append((res["metric"], v[:, 0] - start, v[:, 1]))
        return out

    panels = [
        ("Drift score (largest KS, intensity)", "mitoseg_drift_score", "{model} v{version}"),
        ("KS statistic per feature", "mitoseg_drift_ks", "{feature}"),
        ("Predicted foreground fraction", "mitoseg_window_foreground_fraction or "
         "mitoseg_reference_foreground_fraction", "{bound}"),
        ("MitosegInputDrift firing", 'max(ALERTS{alertname="MitosegInputDrift", '
         'alertstate="firing"}) or vector(0)', "firing"),
    ]  # fmt: skip
    end = time.time() - start
    fig, axes = plt.subplots(2, 2, figsize=(12, 6.5), constrained_layout=True)
    for ax, (title, expr, legend) in zip(axes.ravel(), panels, strict=True):
        for metric, t, v in series(expr):
            label = legend.format_map({"bound": "window mean", **metric})
            ax.plot(t, v, drawstyle="steps-post", label=label)
        if "score" in expr:
            ax.axhline(DRIFT_THRESHOLD, color="red", linestyle="--", label="alert threshold")
        ax.set_title(title)
        ax.set_xlim(0, end)
        ax.set_xlabel("seconds since the first request")
        ax.legend(fontsize=8, loc="best")
        ax.grid(alpha=0.3)
    fig.suptitle("mitoseg serve scraped by Prometheus: 5 VNC slices, then 8 CDeep3M slices")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def _drift_alert(prom: str) -> list[dict[str, Any]]:
    r = requests.get(f"{prom}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
    return [a for a in r if a["labels"]["alertname"] == "MitosegInputDrift"]


@pytest.fixture(scope="module")
def model_with_profile(vnc_unet: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The VNC-trained UNet with its plan and the reference profile of its training
    slices beside it."""
    from mitoseg.config import BaseConfig
    from mitoseg.data.profile import PROFILE_FILE, build_profile
    from mitoseg.data.validate import slice_table

    folder = tmp_path_factory.mktemp("model")
    for name in ("model.keras", "inference_plan.json"):
        shutil.copy(vnc_unet.with_name(name), folder / name)
    train = VNC.parents[1] / "train"
    stacks = {
        "train": (tifffile.imread(train / "images.tif"), tifffile.imread(train / "masks.tif"))
    }
    base = BaseConfig.model_validate({"classes": {"background": 0, "mitochondria": 255}})
    slice_table(VNC.parents[1], stacks, base).to_csv(folder / "slices.csv", index=False)
    build_profile(folder / "slices.csv").write(folder / PROFILE_FILE)
    return folder / "model.keras"


def test_prometheus_fires_the_drift_alert_for_another_microscope(
    model_with_profile: Path, tmp_path: Path
) -> None:
    if not CDEEP3M.is_dir():
        pytest.skip(f"CDeep3M data not found at {CDEEP3M} (../shared/data is not in a fresh clone)")
    rules = yaml.safe_load(ALERT_RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule["for"] = "0s"
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    env = {"MITOSEG_MONITOR_WINDOW": "8", "MITOSEG_MONITOR_MIN_WINDOW": "5"}
    (tmp_path / "serve").mkdir()
    with mitoseg_serve(tmp_path / "serve", model_with_profile, env) as server:
        target = server.url.removeprefix("http://")
        with run_prometheus(
            tmp_path / "prometheus", [target], rules=tmp_path / "alerts.yml", interval="1s"
        ) as prom:
            start = time.time()
            # 1. five VNC test slices, one /segment each: low drift, no alert
            for image in tifffile.imread(VNC):
                r = requests.post(
                    f"{server.url}/segment", files={"image": ("s.tif", _tiff(image))}, timeout=120
                )
                assert r.status_code == 200, r.text
            drift = requests.get(f"{server.url}/drift", timeout=10).json()
            assert drift["reference"] and drift["window_slices"] == 5
            assert drift["score"] < DRIFT_THRESHOLD, drift
            scraped = _wait(
                "the VNC drift score in Prometheus",
                lambda: _prometheus_query(
                    prom, "mitoseg_drift_score and on() mitoseg_drift_window_slices == 5"
                ),
            )
            assert scraped[0]["metric"]["model"] == "mitoseg-unet"
            assert float(scraped[0]["value"][1]) == pytest.approx(drift["score"])
            time.sleep(3)  # three more rule evaluations on the scraped score
            assert _drift_alert(prom) == []
            slices = _prometheus_query(prom, "mitoseg_slices_total")
            assert float(slices[0]["value"][1]) == 5

            # 2. eight CDeep3M slices in one /segment_stack: the window is all CDeep3M
            stack = np.concatenate(  # crops of the VNC slices' size
                [
                    tifffile.imread(CDEEP3M / "cdeep3m_test_raw.tif"),
                    tifffile.imread(CDEEP3M / "cdeep3m_train_raw.tif")[:3],
                ]
            )[:, :512, :768]
            r = requests.post(
                f"{server.url}/segment_stack",
                files={"image": ("s.tif", _tiff(stack))},
                timeout=300,
            )
            assert r.status_code == 200, r.text
            drift = requests.get(f"{server.url}/drift", timeout=10).json()
            assert drift["window_slices"] == 8 and drift["score"] > DRIFT_THRESHOLD, drift
            alerts = _wait(
                "MitosegInputDrift firing", lambda: [
                    a for a in _drift_alert(prom) if a["state"] == "firing"
                ]
            )  # fmt: skip
            assert alerts[0]["labels"]["model"] == "mitoseg-unet"
            assert float(alerts[0]["value"]) == pytest.approx(drift["score"])
            _wait(
                "13 slices counted in Prometheus",
                lambda: float(_prometheus_query(prom, "mitoseg_slices_total")[0]["value"][1]) == 13,
            )
            if os.environ.get("MITOSEG_MONITORING_FIGURE"):
                print(json.dumps(drift, indent=2))  # the docs' /drift example (pytest -s)
                time.sleep(5)
                _render_panels(prom, start, Path(os.environ["MITOSEG_MONITORING_FIGURE"]))


def test_stack_prometheus_loads_the_alert_rules(tmp_path: Path) -> None:
    """``dev/stack.py``'s Prometheus (``make stack``) loads every rule of ``alerts.yml``
    and scrapes its target's ``/metrics`` (down here: nothing listens there)."""
    from dev.stack import free_port

    target = f"127.0.0.1:{free_port()}"
    with run_prometheus(tmp_path, [target], interval="1s") as prom:
        groups = requests.get(f"{prom}/api/v1/rules", timeout=10).json()["data"]["groups"]
        names = {r["name"] for g in groups for r in g["rules"]}
        assert names == {
            "MitosegInputDrift", "MitosegBlankRateHigh", "MitosegForegroundOutOfRange",
            "MitosegErrorRateHigh", "MitosegLatencyHigh",
        }  # fmt: skip
        up = _wait("the scrape of the target", lambda: _prometheus_query(prom, "up"))
        assert up[0]["metric"]["instance"] == target and up[0]["value"][1] == "0"
    assert (tmp_path / "prometheus.yml").is_file() and (tmp_path / "prometheus.log").is_file()
