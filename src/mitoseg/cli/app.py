"""The ``mitoseg`` Typer application and its shared options.

Sub-command modules (``cli/data.py``, ``cli/model.py``, ``cli/serve.py``) register
their commands on the apps defined here. The global options live on Typer's context
(``ctx.obj``, an :class:`Options`), set by the root callback for each invocation, and
commands read them with :func:`options`. Nothing heavy is imported at module level.
"""

from __future__ import annotations

from dataclasses import dataclass

import click
import typer

app = typer.Typer(
    name="mitoseg",
    help="Mitochondria segmentation in EM: data, training, evaluation and serving.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Fetch raw EM data into the canonical layout.", no_args_is_help=True)
bento_app = typer.Typer(
    help="Package the registered model as a BentoML Bento.", no_args_is_help=True
)
export_app = typer.Typer(
    help="Export a trained model for other tools (BioImage Model Zoo).", no_args_is_help=True
)
labels_app = typer.Typer(
    help="The label store: the labelled slices of a volume, with provenance.",
    no_args_is_help=True,
)
app.add_typer(data_app, name="data")
app.add_typer(labels_app, name="labels")
app.add_typer(bento_app, name="bento")
app.add_typer(export_app, name="export")


@dataclass(frozen=True)
class Options:
    """Global CLI options (``mitoseg [OPTIONS] COMMAND``), kept in ``ctx.obj``."""

    progress: bool = True


@app.callback()
def _root(
    ctx: typer.Context,
    no_progress: bool = typer.Option(
        False, "--no-progress", help="Hide progress bars (for logs and CI)."
    ),
) -> None:
    ctx.obj = Options(progress=not no_progress)


def options() -> Options:
    """The global options of the running command: the :class:`Options` on Typer's
    context or one of its parents; the defaults outside a command."""
    # Typer >= 0.24 runs its commands on its own copy of click (typer._click), so the
    # running command's context is on that copy's stack, not on click's
    from typer._click.globals import get_current_context

    ctx = get_current_context(silent=True) or click.get_current_context(silent=True)
    found = ctx.find_object(Options) if ctx is not None else None
    return found if found is not None else Options()


def fail(message: str, code: int = 1) -> None:
    """Print ``message`` to stderr and exit with ``code``."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)
