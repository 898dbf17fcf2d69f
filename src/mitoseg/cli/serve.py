"""``mitoseg serve`` and ``mitoseg bento build``: serve or package the registered model.

Both import the model into the BentoML model store first
(:func:`mitoseg.serving.bento.import_model`; an identical earlier import is reused).
``mitoseg serve`` then replaces itself (``exec``, same process id) by
``python -m mitoseg.serving.supervise``, which runs ``bentoml serve``, forwards stop signals
and makes sure no worker outlives it (:func:`mitoseg.serving.supervise.supervise`); the
supervisor does not hold the TensorFlow the model import needed.
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
from mitoseg.serving.supervise import STOP_DEADLINE_S, STOP_SIGNALS, supervise

__all__ = ["STOP_DEADLINE_S", "STOP_SIGNALS", "bento_arguments", "serve_command", "supervise"]

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


#: glibc malloc arenas per server process unless ``MALLOC_ARENA_MAX`` is set: the default
#: (8 per core) keeps freed slice and tile buffers of the request threads in many arenas;
#: 2 measured 1313 MB instead of 1534 MB peak RSS at 16 clients, throughput not lower
#: (``benchmarks/results/serve_load_arena.json``).
MALLOC_ARENA_MAX = "2"
#: Seconds BentoML's HTTP workers get to finish in-flight requests after a stop signal.
GRACEFUL_SHUTDOWN_S = 5


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
    env.setdefault("MALLOC_ARENA_MAX", MALLOC_ARENA_MAX)
    # This process imported TensorFlow to read the model (about 750 MB); it lives as long
    # as the server, so it becomes the small supervisor instead, same process id (what
    # systemd, Docker or ECS signal), through exec.
    cmd = serve_command(tag, serve_cfg, host, port)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "mitoseg.serving.supervise", *cmd], env)


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
    from mitoseg.serving.bento import build_bento, check_build_inputs

    try:
        check_build_inputs(bentofile, build_ctx)  # before seconds of loading the model
    except FileNotFoundError as exc:
        fail(str(exc))
    tag, _ = _import(model, params, threshold)
    typer.echo(f"model {tag}", err=True)
    try:
        bento = build_bento(tag, bentofile, build_ctx, version=version, serve=_settings(params))
    except FileNotFoundError as exc:
        fail(str(exc))
    typer.echo(bento)
