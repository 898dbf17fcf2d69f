"""``mitoseg serve`` and ``mitoseg bento build``: serve or package the registered model.

Both import the model into the BentoML model store first
(:func:`mitoseg.serving.bento.import_model`; an identical earlier import is reused).
BentoML and TensorFlow are imported inside the commands only.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import typer

from mitoseg.cli.app import app, bento_app, fail
from mitoseg.config import BaseConfig, ConfigError, EvaluateConfig, ServeConfig, load_section

DEFAULT_MODEL_URI = "models:/mitoseg-unet@champion"
SERVICE = "mitoseg.serving.service:MitoSeg"

_MODEL_OPT = typer.Option(
    DEFAULT_MODEL_URI,
    "--model",
    help="Model URI: models:/name@alias, models:/name/<version>, runs:/<id>/model, or .keras.",
)
_PARAMS_OPT = typer.Option(
    Path("params.yaml"), "--params", help="params.yaml for base.classes and serve: limits."
)
_THRESHOLD_OPT = typer.Option(
    None, "--threshold", min=0.0, max=1.0, help="Foreground threshold (default: the model's)."
)


def _settings(params: Path) -> tuple[BaseConfig, ServeConfig, int]:
    """``base``, ``serve`` and ``evaluate.min_object_size`` from a params file (defaults
    when the file does not exist)."""
    if not params.exists():
        return BaseConfig(), ServeConfig(), EvaluateConfig().min_object_size
    base = load_section("base", params)
    serve = load_section("serve", params)
    evaluate = load_section("evaluate", params)
    return base, serve, evaluate.min_object_size


def _import(model: str, params: Path, threshold: float | None) -> tuple[str, dict[str, Any]]:
    from mitoseg.serving.bento import import_model

    try:
        base, serve, min_object_size = _settings(params)
        return import_model(
            model,
            base=base,
            serve=serve,
            threshold=threshold,
            min_object_size=min_object_size,
        )
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
        raise  # unreachable: fail() exits


@app.command("serve")
def serve(
    model: str = _MODEL_OPT,
    port: int = typer.Option(3000, "--port", min=1, max=65535, help="TCP port."),
    host: str = typer.Option("127.0.0.1", "--host", help="Bind address (0.0.0.0: all)."),
    params: Path = _PARAMS_OPT,
    threshold: float | None = _THRESHOLD_OPT,
) -> None:
    """Serve a registered model (default: the champion) with `bentoml serve`.

    OpenAPI docs at /, /docs.json; readiness at /readyz. Set MITOSEG_API_TOKEN to
    require `Authorization: Bearer <token>`.
    """
    from mitoseg.serving.bento import MODEL_TAG_ENV

    tag, meta = _import(model, params, threshold)
    typer.echo(
        f"serving {tag} ({meta.get('name')} version {meta.get('version', '-')}, "
        f"threshold {meta['threshold']}) on http://{host}:{port}",
        err=True,
    )
    env = {**os.environ, MODEL_TAG_ENV: tag}
    cmd = [sys.executable, "-m", "bentoml", "serve", SERVICE, "--host", host, "--port", str(port)]
    try:
        rc = subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        rc = 130
    raise typer.Exit(rc)


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
        bento = build_bento(tag, bentofile, build_ctx, version=version)
    except FileNotFoundError as exc:
        fail(str(exc))
    typer.echo(bento)
