"""DVC stage ``validate``: check the raw data with the great-expectations suite.

Writes ``report.json``, ``summary.md`` and ``slices.csv`` into ``--out`` only when the
data passes; on failure it exits 1 naming every offending file and slice and leaves the
previous outputs untouched.
"""

from __future__ import annotations

import argparse
import sys

from mitoseg.config import ConfigError, load_section
from mitoseg.data.validate import validate_dataset
from mitoseg.data.validate_report import format_failures, write_report
from mitoseg.io import DataError


def main(argv: list[str] | None = None) -> int:
    """Run the stage; returns the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", required=True, help="canonical raw data directory")
    parser.add_argument("--out", required=True, help="output directory (artifacts/validate)")
    parser.add_argument("--params", default="params.yaml", help="params file")
    args = parser.parse_args(argv)
    try:
        base = load_section("base", args.params)
        cfg = load_section("validate", args.params)
        report = validate_dataset(args.raw, base, cfg)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not report.success:
        print(f"error: {format_failures(report)}", file=sys.stderr)
        print(f"error: outputs in {args.out} were not updated", file=sys.stderr)
        return 1
    paths = write_report(report, args.out)
    n = report.statistics["evaluated_expectations"]
    print(f"validation passed: {len(report.table)} slices, {n} expectations -> {paths['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
