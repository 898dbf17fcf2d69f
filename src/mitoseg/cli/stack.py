"""``mitoseg stack up|down|status|env``: the local S3 (SeaweedFS) + MLflow server stack.

Importing this module registers the ``stack`` group on the main app. :mod:`mitoseg.stack`
imports only the standard library at module level; boto3 is imported when a command runs.
"""

from __future__ import annotations

from pathlib import Path

import typer

from mitoseg.cli.app import app, fail
from mitoseg.stack import (
    DEFAULT_BUCKET,
    DEFAULT_DVC_BUCKET,
    DEFAULT_MLFLOW_PORT,
    DEFAULT_S3_PORT,
)

stack_app = typer.Typer(
    help="Local stack: S3 (SeaweedFS weed mini) + MLflow tracking server with S3 artifacts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(stack_app, name="stack")

_DIR_OPTION = typer.Option(
    Path(".stack"), "--dir", help="Stack folder: data, logs, pids and credentials."
)


def _mask(value: str, keep: int = 4) -> str:
    """``abcd…`` (the first ``keep`` characters only)."""
    return value[:keep] + "…"


def _relative(path: str | Path) -> str:
    """``path`` relative to the working directory when below it (shorter output)."""
    p = Path(path)
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


@stack_app.command("up")
def up_command(
    root: Path = _DIR_OPTION,
    s3_port: int = typer.Option(
        DEFAULT_S3_PORT, "--s3-port", help="S3 port (gRPC uses port + 10000)."
    ),
    mlflow_port: int = typer.Option(
        DEFAULT_MLFLOW_PORT, "--mlflow-port", help="MLflow tracking server port."
    ),
    bucket: str = typer.Option(
        DEFAULT_BUCKET, "--bucket", help="MLflow artifact bucket (s3://BUCKET/mlartifacts)."
    ),
    dvc_bucket: str = typer.Option(
        DEFAULT_DVC_BUCKET, "--dvc-bucket", help="Bucket of the DVC remote 'storage'."
    ),
    timeout: float = typer.Option(90.0, "--timeout", help="Seconds to wait for each server."),
) -> None:
    """Start weed mini and mlflow server detached; print the client environment.

    Idempotent: if the stack in --dir already runs, it only says so (and re-prints the
    environment). Fails, starting nothing, if a port is taken.
    """
    from mitoseg.stack import StackError, client_exports, dvc_hint, stack_up

    try:
        result = stack_up(
            root,
            s3_port=s3_port,
            mlflow_port=mlflow_port,
            bucket=bucket,
            dvc_bucket=dvc_bucket,
            timeout=timeout,
        )
    except (StackError, ValueError, FileNotFoundError) as exc:
        fail(str(exc))
        return
    state, creds = result.state, result.credentials
    if result.already_running:
        typer.echo(f"stack already running in {_relative(state.root)}")
        if (state.s3.port, state.mlflow.port) != (s3_port, mlflow_port):
            typer.echo(
                f"  (on ports {state.s3.port} and {state.mlflow.port}: requested ports ignored;"
                " run 'mitoseg stack down' first to change them)"
            )
    else:
        if result.restarted:
            typer.echo(f"stale stack state ({', '.join(result.restarted)} not running): restarted")
        typer.echo(f"stack started in {_relative(state.root)}")
    typer.echo(
        f"  S3 (weed mini)  {state.s3.url}  pid {state.s3.pid}"
        f"  data {_relative(state.root / 's3')}  log {_relative(state.s3.log)}"
    )
    typer.echo(
        f"  MLflow server   {state.mlflow.url}  pid {state.mlflow.pid}"
        f"  artifacts s3://{state.bucket}/mlartifacts  log {_relative(state.mlflow.log)}"
    )
    typer.echo(f"  buckets         {state.bucket}, {state.dvc_bucket}")
    verb = "created" if result.created_credentials else "kept"
    typer.echo(
        f"  credentials     {verb} {_relative(state.root / 'credentials.json')} (mode 0600):"
        f" access key {creds.access_key}, secret {_mask(creds.secret_key)} (hidden)"
    )
    typer.echo("")
    typer.echo('# Point MLflow, boto3 and DVC at the stack (or: eval "$(mitoseg stack env)"):')
    for line in client_exports(state, creds):
        typer.echo(line)
    typer.echo(f"# DVC remote 'storage' on this S3 (bucket {state.dvc_bucket}), kept out of git:")
    typer.echo(dvc_hint(state))


@stack_app.command("down")
def down_command(
    root: Path = _DIR_OPTION,
    timeout: float = typer.Option(
        15.0, "--timeout", help="Seconds after SIGTERM before SIGKILL, per server."
    ),
) -> None:
    """Stop both servers (SIGTERM their process groups, SIGKILL after --timeout)."""
    from mitoseg.stack import StackError, stack_down

    try:
        report = stack_down(root, timeout=timeout)
    except StackError as exc:
        fail(str(exc))
        return
    if report is None:
        typer.echo(f"stack not running (no {_relative(root.resolve() / 'stack.json')})")
        return
    for service, was_running in report:
        if was_running:
            typer.echo(f"stopped {service.name} (pid {service.pid})")
        else:
            typer.echo(f"{service.name} (pid {service.pid}) was not running")


@stack_app.command("status")
def status_command(root: Path = _DIR_OPTION) -> None:
    """Show what runs; exit 0 if both servers run, 1 otherwise."""
    from mitoseg.stack import StackError, read_state

    try:
        state = read_state(root)
    except StackError as exc:
        fail(str(exc))
        return
    if state is None:
        typer.echo(f"stack not running (no {_relative(root.resolve() / 'stack.json')})")
        raise typer.Exit(1)
    states = [service.running() for service in state.services]
    all_running, any_running = all(states), any(states)
    for service, running in zip(state.services, states, strict=True):
        word = "running" if running else "stopped"
        typer.echo(f"{service.name:<7} {word:<8} pid {service.pid:<8} {service.url}")
    if not all_running:
        extent = "partly down" if any_running else "down"
        typer.echo(f"stack {extent}: run 'mitoseg stack up' to restart it")
        raise typer.Exit(1)


@stack_app.command("env")
def env_command(root: Path = _DIR_OPTION) -> None:
    """Print the export lines for the running stack: eval "$(mitoseg stack env)".

    The secret key is read from the credentials file by command substitution, never
    printed.
    """
    from mitoseg.stack import StackError, client_exports, load_or_create_credentials, read_state

    try:
        state = read_state(root)
        if state is None:
            fail("stack not running: start it with 'mitoseg stack up'")
            return
        creds_path = state.root / "credentials.json"
        if not creds_path.exists():
            fail(f"{creds_path} is missing: run 'mitoseg stack down' and 'mitoseg stack up'")
            return
        creds, _ = load_or_create_credentials(creds_path)
    except StackError as exc:
        fail(str(exc))
        return
    for line in client_exports(state, creds):
        typer.echo(line)
