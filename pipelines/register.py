"""DVC stage ``register``: add the trained model to the MLflow registry.

Reads ``run_id`` from ``--train-info`` (train.json) and the ``register.metric`` value from
``--metrics`` (metrics.json), identifies the test data (md5 of ``<raw>/test``, else the
run's ``data.dvc`` md5; it must be the ``test_data_id`` evaluate recorded in
metrics.json), registers ``runs:/<run_id>/model`` as ``register.model_name`` and applies
the champion/challenger rule of :func:`mitoseg.tracking.register_model`: champion
only when better on the same test data. A champion scored on other test data is first
re-evaluated on ``<raw>/test`` (:func:`mitoseg.gate.score_on_test`); when that fails the
new version is not promoted. Writes ``registration.json`` (``model_name, version, alias,
metric, value, previous_champion, champion_rescored, test_data_id, run_id, reason,
message``) atomically to ``--out``.

The tracking store is ``$MLFLOW_TRACKING_URI`` or the embedded ``./mlflow.db``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from mitoseg import tracking
from mitoseg.config import ConfigError, load_section
from mitoseg.gate import score_on_test
from mitoseg.io import DataError, read_json_object, write_json
from mitoseg.train_info import TrainInfo


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the stage; returns the registration record written to ``--out``."""
    cfg = load_section("register", args.params)
    run_id = TrainInfo.read(args.train_info).run_id
    metrics = read_json_object(args.metrics, "metrics")
    if cfg.metric not in metrics:
        raise DataError(f"{args.metrics}: missing metric {cfg.metric!r} (register.metric)")
    value = metrics[cfg.metric]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{args.metrics}: metric {cfg.metric!r} is not a finite number: {value!r}")

    tracking.configure_tracking()
    test_data_id = args.test_data_id or tracking.compute_test_data_id(
        args.raw, run_id=run_id, repo_root=Path.cwd()
    )
    recorded = metrics.get("test_data_id")
    if args.test_data_id is None and recorded is not None and recorded != test_data_id:
        raise DataError(
            f"{args.metrics}: measured on test data {recorded}, but {args.raw}/test is "
            f"{test_data_id}; run evaluate on this test data first"
        )
    base = load_section("base", args.params)

    def rescore(uri: str) -> float:
        print(
            f"re-evaluating {uri} on {args.raw}/test (the champion's score is on other test data)"
        )
        return score_on_test(uri, args.raw, base, cfg.metric, progress=not args.no_progress)

    record = tracking.register_model(
        run_id, cfg.metric, float(value), cfg, test_data_id, rescore=rescore
    )
    write_json(args.out, record)
    return record


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments of dvc.yaml's ``register`` command and run the stage."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--train-info", type=Path, required=True, help="train.json (run_id)")
    p.add_argument("--metrics", type=Path, required=True, help="metrics.json of evaluate")
    p.add_argument("--out", type=Path, required=True, help="registration.json to write")
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument(
        "--raw",
        type=Path,
        default=Path("data/raw"),
        help="raw data directory whose test split identifies the test data",
    )
    p.add_argument("--test-data-id", default=None, help="override the test data identifier")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = p.parse_args(argv)
    try:
        record = run(args)
    except (ConfigError, DataError, ValueError, tracking.ModelNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    prev = record["previous_champion"]
    prev_text = (
        f"previous champion v{prev['version']} {prev['metric']}={prev['value']}"
        if prev
        else "no previous champion"
    )
    print(
        f"registered {record['model_name']} v{record['version']} as {record['alias']} "
        f"({record['metric']}={record['value']:.4f}, {record['reason']}; {prev_text}) "
        f"-> {args.out}\n{record['message']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
