"""The CLI's global options live on Typer's context, not in a module global (the root
callback sets them for each invocation; ``--no-progress`` runs through every CLI test)."""

from __future__ import annotations

import click

from mitoseg.cli.app import Options, options


def test_options_come_from_the_context_of_the_running_command() -> None:
    assert options() == Options(progress=True)  # outside a command: the defaults
    root = click.Context(click.Command("mitoseg"), obj=Options(progress=False))
    with root, click.Context(click.Command("predict"), parent=root):
        assert options().progress is False  # found on a parent context
    assert options() == Options(progress=True)  # nothing left behind


def test_no_progress_reaches_options_inside_a_typer_command() -> None:
    import typer
    from typer.testing import CliRunner

    from mitoseg.cli.app import _root

    seen: list[Options] = []
    cli = typer.Typer()
    cli.callback()(_root)

    @cli.command()
    def probe() -> None:
        seen.append(options())

    for args, progress in ((["--no-progress", "probe"], False), (["probe"], True)):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        assert seen[-1] == Options(progress=progress)
