"""What monitoring costs a request: ``serve_load.py`` with monitoring off and on, interleaved.

Runs ``benchmarks/serve_load.py`` ``--pairs`` times with ``MITOSEG_MONITOR_ENABLED=false``
then ``true`` (off, on, off, on, ...: a machine that slows down during the run hits both
alike), each a fresh server, and compares the median over runs of the 1-client p50 and of
the peak RSS. The goal (issue 22): p50 at 1 client within 5 % of the same run without the
metrics. Writes ``serve_load_monitor_{off,on}_<i>.json`` and the summary
``benchmarks/results/serve_load_monitoring.json``. Keep the machine otherwise idle.

Usage:
    python benchmarks/monitoring_overhead.py --pairs 2 --levels 1,16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from common import RESULTS, machine, save

HERE = Path(__file__).resolve().parent


def _run(enabled: bool, i: int, args: argparse.Namespace) -> dict[str, Any]:
    name = f"serve_load_monitor_{'on' if enabled else 'off'}_{i}"
    env = {**os.environ, "MITOSEG_MONITOR_ENABLED": "true" if enabled else "false"}
    cmd = [
        sys.executable, str(HERE / "serve_load.py"), "--model", args.model,
        "--levels", args.levels, "--requests", str(args.requests), "--name", name,
    ]  # fmt: skip
    subprocess.run(cmd, env=env, check=True, cwd=HERE.parent, stdout=subprocess.DEVNULL)
    return json.loads((RESULTS / f"{name}.json").read_text())


def _p50(run: dict[str, Any], clients: int) -> float | None:
    return next((lv["p50_s"] for lv in run["levels"] if lv["clients"] == clients), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models:/mitoseg-unet@champion")
    ap.add_argument("--pairs", type=int, default=2, help="off/on pairs of runs")
    ap.add_argument("--levels", default="1,16", help="concurrent clients per level")
    ap.add_argument("--requests", type=int, default=50, help="requests per level")
    args = ap.parse_args()
    if args.pairs < 1:
        ap.error("--pairs must be >= 1")
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    for i in range(args.pairs):
        for enabled in (False, True):
            runs["on" if enabled else "off"].append(_run(enabled, i, args))
    levels = [int(c) for c in args.levels.split(",") if c]
    summary: dict[str, Any] = {}
    for key, group in runs.items():
        summary[key] = {f"p50_s_{c}_clients": [_p50(r, c) for r in group] for c in levels} | {
            "server_peak_rss_mb": [r["server_peak_rss_mb"] for r in group]
        }
    off = statistics.median(p for p in summary["off"]["p50_s_1_clients"] if p is not None)
    on = statistics.median(p for p in summary["on"]["p50_s_1_clients"] if p is not None)
    save(
        "serve_load_monitoring",
        {
            "benchmark": "monitoring_overhead",
            "what": "serve_load.py with MITOSEG_MONITOR_ENABLED false/true, interleaved runs, "
            "each a fresh server; medians over runs",
            "machine": machine(),
            "model": args.model,
            "runs": summary,
            "p50_1_client_median_off_s": round(off, 4),
            "p50_1_client_median_on_s": round(on, 4),
            "p50_1_client_on_vs_off": round(on / off, 4),
            "goal": "on/off <= 1.05",
        },
    )


if __name__ == "__main__":
    main()
