"""``mitoseg serve`` and ``mitoseg bento build``: serve or package the registered model.

Both import the model into the BentoML model store first
(:func:`mitoseg.serving.bento.import_model`; an identical earlier import is reused).
``mitoseg serve`` then runs ``bentoml serve`` under :func:`supervise`, which forwards
stop signals and makes sure no worker outlives it.
BentoML and TensorFlow are imported inside the commands only.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import typer

from mitoseg.cli.app import app, bento_app, fail
from mitoseg.config import ConfigError, ServeConfig, load_section

DEFAULT_MODEL_URI = "models:/mitoseg-unet@champion"
SERVICE = "mitoseg.serving.service:MitoSeg"

_MODEL_OPT = typer.Option(
    DEFAULT_MODEL_URI,
    "--model",
    help="Model URI: models:/name@alias, models:/name/<version>, runs:/<id>/model, or .keras.",
)
_PARAMS_OPT = typer.Option(
    Path("params.yaml"), "--params", help="params.yaml whose serve: section sets the limits."
)
_THRESHOLD_OPT = typer.Option(
    None,
    "--threshold",
    min=0.0,
    max=1.0,
    help="Override the plan's foreground threshold (default: the one chosen on validation).",
)


def _settings(params: Path) -> ServeConfig:
    """The ``serve:`` section of a params file (defaults when the file does not exist).

    How the model runs (tiles, threshold, classes, engine) is not read here: it comes
    from the model's inference plan.
    """
    if not params.exists():
        return ServeConfig()
    return load_section("serve", params)


def _import(model: str, params: Path, threshold: float | None) -> tuple[str, dict[str, Any]]:
    from mitoseg.serving.bento import import_model

    try:
        return import_model(model, serve=_settings(params), overrides={"threshold": threshold})
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
        raise  # unreachable: fail() exits


def bento_arguments(tag: str, serve: ServeConfig) -> list[str]:
    """``bentoml serve`` options passing the model tag and the ``serve:`` settings as
    Bento arguments (``--arg model_tag=... --arg max_batch_size=16 ...``), which the
    service reads with ``bentoml.use_arguments()`` (strings, converted there)."""
    values = {"model_tag": tag, **serve.model_dump()}
    out: list[str] = []
    for key, value in values.items():
        out += ["--arg", f"{key}={value}"]
    return out


#: Seconds BentoML's HTTP workers get to finish in-flight requests after a stop signal.
GRACEFUL_SHUTDOWN_S = 5
#: Seconds after a stop signal when whatever ``mitoseg serve`` started is killed.
STOP_DEADLINE_S = 8.0
#: Signals forwarded to ``bentoml serve`` (each starts the stop deadline).
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP")


def serve_command(tag: str, serve: ServeConfig, host: str, port: int) -> list[str]:
    """The ``bentoml serve`` command line ``mitoseg serve`` runs."""
    return [
        sys.executable,
        "-m",
        "bentoml",
        "serve",
        SERVICE,
        "--host",
        host,
        "--port",
        str(port),
        "--timeout-graceful-shutdown",
        str(GRACEFUL_SHUTDOWN_S),
        *bento_arguments(tag, serve),
    ]


def supervise(cmd: list[str], env: dict[str, str], *, deadline_s: float = STOP_DEADLINE_S) -> int:
    """Run ``cmd`` until it exits; forward stop signals; leave no process behind.

    BentoML's arbiter starts its workers in sessions of their own, so a signal to this
    process group does not reach them, and a worker busy with a request can hold the
    arbiter up. Here every descendant of the child is tracked while it runs (on Linux
    this process is also made a child subreaper, so orphaned workers stay its
    descendants); SIGTERM, SIGINT or SIGHUP is forwarded to the child, and
    ``deadline_s`` seconds later whatever is still running is killed. Descendants left
    after the child exits are stopped too.

    Returns:
        The child's exit status (``128 + signal`` when a signal ended it).
    """
    import signal
    import subprocess
    import time

    import psutil

    received: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        received.append(signum)

    stop_signals = [getattr(signal, name) for name in STOP_SIGNALS if hasattr(signal, name)]
    previous = {sig: signal.signal(sig, on_signal) for sig in stop_signals}
    tracked: dict[int, psutil.Process] = {}
    me = psutil.Process()
    _become_subreaper()

    def track(root: psutil.Process) -> None:
        for parent in (root, me):
            try:
                for proc in parent.children(recursive=True):
                    tracked.setdefault(proc.pid, proc)
            except psutil.Error:
                pass

    try:
        child = subprocess.Popen(cmd, env=env)
        root = psutil.Process(child.pid)
        tracked[child.pid] = root
        forwarded = 0
        kill_at: float | None = None
        next_scan = 0.0
        while True:
            now = time.monotonic()
            if forwarded < len(received) or now >= next_scan:
                track(root)
                next_scan = now + 0.5
            while forwarded < len(received):
                signum = received[forwarded]
                forwarded += 1
                if child.poll() is None:
                    child.send_signal(signum)
                kill_at = kill_at or time.monotonic() + deadline_s
            try:
                rc = child.wait(timeout=0.1)
                break
            except subprocess.TimeoutExpired:
                pass
            if kill_at is not None and time.monotonic() >= kill_at:
                _kill(tracked.values(), signal.SIGKILL)
        track(root)  # orphans adopted by this (subreaper) process
        left = [p for pid, p in tracked.items() if pid != child.pid and _running(p)]
        if left:
            grace = 2.0 if kill_at is None else max(0.0, kill_at - time.monotonic())
            _kill(left, signal.SIGTERM)
            _, alive = psutil.wait_procs(left, timeout=grace)
            _kill(alive, signal.SIGKILL)
            psutil.wait_procs(alive, timeout=2.0)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - rc if rc < 0 else rc


def _become_subreaper() -> None:
    """Linux: adopt orphaned descendants (``PR_SET_CHILD_SUBREAPER``); a no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def _running(proc: Any) -> bool:
    try:
        return bool(proc.is_running()) and proc.status() != "zombie"
    except Exception:
        return False


def _kill(procs: Any, sig: int) -> None:
    for proc in procs:
        try:
            if _running(proc):
                proc.send_signal(sig)
        except Exception:
            pass


@app.command("serve")
def serve(
    model: str = _MODEL_OPT,
    port: int = typer.Option(3000, "--port", min=1, max=65535, help="TCP port."),
    host: str = typer.Option("127.0.0.1", "--host", help="Bind address (0.0.0.0: all)."),
    params: Path = _PARAMS_OPT,
    threshold: float | None = _THRESHOLD_OPT,
) -> None:
    """Serve a registered model (default: the champion) with `bentoml serve`.

    SIGTERM, SIGINT or SIGHUP stops the server and all its workers within 10 s.

    OpenAPI page at /docs, readiness at /readyz; MITOSEG_API_TOKEN requires a bearer token.
    """
    from mitoseg.serving.bento import MODEL_TAG_ENV

    tag, meta = _import(model, params, threshold)
    try:
        serve_cfg = _settings(params)
    except ConfigError as exc:
        fail(str(exc))
        raise  # unreachable: fail() exits
    typer.echo(
        f"serving {tag} ({meta.get('name')} version {meta.get('version', '-')}, "
        f"threshold {meta.get('threshold')}) on http://{host}:{port}",
        err=True,
    )
    env = {**os.environ, MODEL_TAG_ENV: tag}
    raise typer.Exit(supervise(serve_command(tag, serve_cfg, host, port), env))


@bento_app.command("build")
def build(
    model: str = _MODEL_OPT,
    bentofile: Path = typer.Option(Path("bentofile.yaml"), "--bentofile", help="Bento build file."),
    build_ctx: Path = typer.Option(
        Path("src"), "--build-ctx", help="Directory holding the mitoseg package."
    ),
    params: Path = _PARAMS_OPT,
    threshold: float | None = _THRESHOLD_OPT,
    version: str | None = typer.Option(None, "--version", help="Bento version."),
) -> None:
    """Import the model into the BentoML store and build the GPU Bento."""
    from mitoseg.serving.bento import build_bento

    tag, _ = _import(model, params, threshold)
    typer.echo(f"model {tag}", err=True)
    try:
        bento = build_bento(tag, bentofile, build_ctx, version=version, serve=_settings(params))
    except FileNotFoundError as exc:
        fail(str(exc))
    typer.echo(bento)
