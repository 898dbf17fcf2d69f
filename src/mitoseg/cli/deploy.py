"""``mitoseg deploy ...``: ECR repository and ECS GPU rollout (also ``python -m mitoseg.deploy``).

Importing this module registers the ``deploy`` group on the main app; nothing heavy
(boto3, requests) is imported until a command runs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer

from mitoseg.cli.app import app, fail

deploy_app = typer.Typer(
    help="Deliver the Bento image: ECR repository, ECS-on-EC2 GPU rollout with rollback.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(deploy_app, name="deploy")


def _opt(value: str | None) -> str | None:
    """Empty strings (unset workflow variables) mean "not given"."""
    return value or None


def _parse_env(pairs: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"--env expects KEY=VALUE, got {pair!r}", code=2)
        env[key] = value
    return env


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True
    )


@deploy_app.command("ecr-repo")
def ecr_repo(
    repository: str = typer.Option(..., "--repository", help="ECR repository name."),
    region: str = typer.Option(..., "--region", envvar="AWS_REGION", help="AWS region."),
) -> None:
    """Create the ECR repository if missing (idempotent) and print its URI."""
    from mitoseg.deploy.aws import ensure_ecr_repository
    from mitoseg.deploy.config import DeployConfigError, check_region

    _setup_logging()
    try:
        check_region(region)
        import boto3

        repo = ensure_ecr_repository(boto3.client("ecr", region_name=region), repository)
    except DeployConfigError as exc:
        fail(str(exc), code=2)
    except Exception as exc:
        fail(f"ECR repository {repository!r}: {type(exc).__name__}: {exc}")
    typer.echo(repo["uri"])


@deploy_app.command("aws")
def aws(
    image: str = typer.Option(..., "--image", help="Pushed image URI with a tag or digest."),
    region: str = typer.Option(..., "--region", envvar="AWS_REGION", help="AWS region."),
    cluster: str = typer.Option(..., "--cluster", help="ECS cluster name."),
    service: str = typer.Option(..., "--service", help="Existing ECS service name."),
    repository: str = typer.Option(..., "--repository", help="ECR repository name."),
    family: str = typer.Option("mitoseg", "--family", help="Task definition family."),
    container_name: str = typer.Option("mitoseg", "--container-name", help="Container name."),
    execution_role_arn: str = typer.Option(
        ..., "--execution-role-arn", help="ECS task execution role ARN."
    ),
    task_role_arn: str = typer.Option("", "--task-role-arn", help="Optional task role ARN."),
    api_token_secret_arn: str = typer.Option(
        "", "--api-token-secret-arn", help="Secrets Manager ARN injected as MITOSEG_API_TOKEN."
    ),
    smoke_url: str = typer.Option(
        "", "--smoke-url", help="Endpoint base URL; default: the service's load balancer."
    ),
    gpus: int = typer.Option(1, "--gpus", help="GPUs per task (0 = CPU only)."),
    cpu: int = typer.Option(4096, "--cpu", help="Task CPU units (1024 = 1 vCPU)."),
    memory: int = typer.Option(14336, "--memory", help="Task memory in MiB."),
    port: int = typer.Option(3000, "--port", help="Container port."),
    network_mode: str = typer.Option("awsvpc", "--network-mode", help="awsvpc, bridge or host."),
    health_path: str = typer.Option("/readyz", "--health-path", help="Readiness path."),
    env: list[str] = typer.Option(
        [], "--env", help="Extra plaintext KEY=VALUE environment (repeatable; no secrets)."
    ),
    stable_timeout: float = typer.Option(1800.0, "--stable-timeout", help="Seconds."),
    rollback_timeout: float = typer.Option(1200.0, "--rollback-timeout", help="Seconds."),
    poll_interval: float = typer.Option(15.0, "--poll-interval", help="Seconds."),
    result: Path | None = typer.Option(None, "--result", help="Write the result JSON here."),
) -> None:
    """Register a GPU task definition for IMAGE, roll it out, smoke-test, roll back on failure."""
    from mitoseg.deploy.aws import deploy
    from mitoseg.deploy.config import DeployConfig, DeployConfigError, DeployError

    _setup_logging()
    try:
        config = DeployConfig(
            region=region,
            cluster=cluster,
            service=service,
            ecr_repository=repository,
            task_family=family,
            container_name=container_name,
            execution_role_arn=execution_role_arn,
            task_role_arn=_opt(task_role_arn),
            api_token_secret_arn=_opt(api_token_secret_arn),
            gpu_count=gpus,
            cpu=cpu,
            memory_mib=memory,
            port=port,
            network_mode=network_mode,
            health_path=health_path,
            environment=_parse_env(env),
            stable_timeout_s=stable_timeout,
            rollback_timeout_s=rollback_timeout,
            poll_interval_s=poll_interval,
        )
        outcome = deploy(config, image, smoke_url=_opt(smoke_url))
    except DeployConfigError as exc:
        fail(str(exc), code=2)
    except DeployError as exc:
        if result is not None:
            from mitoseg.io import write_json

            write_json(
                result,
                {
                    "ok": False,
                    "image": image,
                    "step": exc.step,
                    "error": str(exc),
                    "rolled_back": exc.rolled_back,
                    "previous_task_definition": exc.previous_task_definition,
                    "task_definition": exc.task_definition,
                },
            )
        fail(str(exc))
    payload = {"ok": True, **outcome.to_dict()}
    if result is not None:
        from mitoseg.io import write_json

        write_json(result, payload)
    typer.echo(json.dumps(payload, indent=2))
