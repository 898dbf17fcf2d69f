"""Command-line entry point: ``mitoseg ...``."""

from __future__ import annotations

from mitoseg.cli import data as _data  # noqa: F401  (registers commands)
from mitoseg.cli import deploy as _deploy  # noqa: F401
from mitoseg.cli import export as _export  # noqa: F401
from mitoseg.cli import labels as _labels  # noqa: F401
from mitoseg.cli import model as _model  # noqa: F401
from mitoseg.cli import serve as _serve  # noqa: F401
from mitoseg.cli import suggest as _suggest  # noqa: F401
from mitoseg.cli import validate as _validate  # noqa: F401
from mitoseg.cli.app import app

__all__ = ["app", "main"]


def main() -> None:
    """Run the CLI."""
    app()
