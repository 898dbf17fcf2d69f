"""``mitoseg validate DIR``: run the data-validation suite on a canonical raw directory."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from mitoseg.cli.app import app, fail


@app.command("validate")
def validate_command(
    raw_dir: Path = typer.Argument(..., help="Canonical raw data directory (e.g. data/raw)."),
    params: Path | None = typer.Option(
        None,
        "--params",
        help="Params file for base.classes and validate thresholds "
        "[default: ./params.yaml if present, else built-in defaults].",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the full report as JSON."),
    out: Path | None = typer.Option(
        None, "--out", help="Also write report.json, summary.md and slices.csv here (on success)."
    ),
) -> None:
    """Validate DIR with the great-expectations suite; exit 1 naming every bad file/slice."""
    from mitoseg.config import BaseConfig, ConfigError, ValidateConfig, load_section
    from mitoseg.data.validate import validate_dataset
    from mitoseg.data.validate_report import format_failures, report_to_dict, write_report
    from mitoseg.io import DataError

    try:
        if params is None and not Path("params.yaml").is_file():
            base, cfg = BaseConfig(), ValidateConfig()
        else:
            path = params if params is not None else Path("params.yaml")
            base = load_section("base", path)
            cfg = load_section("validate", path)
        report = validate_dataset(raw_dir, base, cfg)
    except (ConfigError, DataError) as exc:
        fail(str(exc))
        return
    if as_json:
        typer.echo(json.dumps(report_to_dict(report), indent=2, default=str))
    if not report.success:
        fail(format_failures(report))
    if out is not None:
        write_report(report, out)
    if not as_json:
        n = report.statistics["evaluated_expectations"]
        typer.echo(f"validation passed: {len(report.table)} slices, {n} expectations")
