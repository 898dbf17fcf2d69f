"""What a deploy accepts, registers and how it fails: :class:`DeployConfig` (validated on
construction), the checks of names, regions, ARNs and image references, the task
definition request built from them (:func:`build_task_definition`), and the errors every
step of :mod:`mitoseg.deploy.aws` raises. No AWS call is made here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "API_TOKEN_ENV",
    "NETWORK_MODES",
    "DeployConfig",
    "DeployConfigError",
    "DeployError",
    "RolloutError",
    "RolloutFailedError",
    "RolloutTimeoutError",
    "SmokeTestError",
    "build_task_definition",
    "check_image_uri",
    "check_region",
    "check_repository",
    "health_check_command",
    "image_uri",
]

API_TOKEN_ENV = "MITOSEG_API_TOKEN"
NETWORK_MODES = ("awsvpc", "bridge", "host")
_REGION_RE = re.compile(r"^[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-\d{1,2}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,255}$")
_ECR_REPO_RE = re.compile(r"^(?:[a-z0-9]+(?:[._-][a-z0-9]+)*/)*[a-z0-9]+(?:[._-][a-z0-9]+)*$")
_ROLE_ARN_RE = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+$")
_SECRET_ARN_RE = re.compile(r"^arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:\d{12}:secret:[\w/+=.@-]+$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


class DeployConfigError(ValueError):
    """A deploy argument is invalid; the message names the field."""


class RolloutError(RuntimeError):
    """The ECS deployment did not become stable."""


class RolloutFailedError(RolloutError):
    """ECS reported the deployment as failed (e.g. the circuit breaker tripped)."""


class RolloutTimeoutError(RolloutError):
    """The deployment was still not stable when the timeout ran out."""


class SmokeTestError(RuntimeError):
    """The live endpoint failed the smoke test."""


class DeployError(RuntimeError):
    """A deploy failed; ``step`` names the failed step.

    Attributes:
        step: Step that failed (``describe_service``, ``verify_image``, ``resolve_endpoint``,
            ``read_api_token``, ``register_task_definition``, ``update_service``,
            ``wait_stable`` or ``smoke_test``).
        previous_task_definition: Task definition ARN the service ran before, if known.
        task_definition: ARN of the task definition registered by this deploy, if any.
        rolled_back: True when the service was rolled back to ``previous_task_definition``.
    """

    def __init__(
        self,
        message: str,
        *,
        step: str,
        previous_task_definition: str | None = None,
        task_definition: str | None = None,
        rolled_back: bool = False,
    ) -> None:
        super().__init__(message)
        self.step = step
        self.previous_task_definition = previous_task_definition
        self.task_definition = task_definition
        self.rolled_back = rolled_back


def _check_name(field_name: str, value: str) -> None:
    if not value:
        raise DeployConfigError(f"{field_name} must not be empty")
    if not _NAME_RE.match(value):
        raise DeployConfigError(
            f"{field_name} {value!r} is invalid: use 1-255 letters, digits, '-' or '_'"
        )


def check_region(region: str) -> None:
    """Raise ``DeployConfigError`` unless ``region`` looks like ``us-east-1``."""
    if not region:
        raise DeployConfigError("region must not be empty")
    if not _REGION_RE.match(region):
        raise DeployConfigError(f"region {region!r} is not an AWS region name like 'us-east-1'")


def check_repository(name: str) -> None:
    if not name:
        raise DeployConfigError("ecr_repository must not be empty")
    if len(name) < 2 or len(name) > 256 or not _ECR_REPO_RE.match(name):
        raise DeployConfigError(
            f"ecr_repository {name!r} is invalid: use 2-256 lowercase letters and digits "
            "separated by '.', '_', '-' or '/'"
        )


def _check_positive(field_name: str, value: float, unit: str = "") -> None:
    if not value > 0:
        raise DeployConfigError(f"{field_name} must be > 0{unit}, got {value}")


@dataclass(frozen=True)
class DeployConfig:
    """Where and how to deploy; validated on construction (``DeployConfigError``).

    Attributes:
        region: AWS region, e.g. ``us-east-1``.
        cluster: ECS cluster name (with a GPU capacity provider, see docs/DEPLOY.md).
        service: ECS service name inside ``cluster``; it must already exist.
        ecr_repository: ECR repository holding the Bento images.
        task_family: Task definition family; each deploy registers a new revision.
        execution_role_arn: Task execution role (pulls from ECR, reads the API token
            secret, writes logs).
        container_name: Container name (the service's load balancer points at it).
        task_role_arn: Optional role the application itself assumes.
        port: Container port of the BentoML server.
        gpu_count: GPUs reserved per task; 0 deploys a CPU-only task.
        cpu: Task CPU units (1024 = 1 vCPU).
        memory_mib: Task memory in MiB (hard limit).
        network_mode: ``awsvpc`` (target type ``ip``), ``bridge`` (dynamic host port) or
            ``host``; must match how the service was created.
        health_path: Readiness path, probed by the container health check and the smoke
            test.
        api_token_secret_arn: Secrets Manager ARN injected as ``MITOSEG_API_TOKEN``.
        environment: Extra plaintext environment variables (no secrets).
        log_group: CloudWatch log group; default ``/ecs/<task_family>``.
        health_check_start_period_s: Container health-check grace period (0-300 s); model
            loading and GPU warm-up happen inside it.
        stable_timeout_s: How long to wait for the new deployment to become stable.
        rollback_timeout_s: How long to wait for the rolled-back deployment.
        poll_interval_s: Seconds between ``describe_services`` polls.
        smoke_timeout_s: Per-request timeout of the smoke test.
    """

    region: str
    cluster: str
    service: str
    ecr_repository: str
    task_family: str
    execution_role_arn: str
    container_name: str = "mitoseg"
    task_role_arn: str | None = None
    port: int = 3000
    gpu_count: int = 1
    cpu: int = 4096
    memory_mib: int = 14336
    network_mode: str = "awsvpc"
    health_path: str = "/readyz"
    api_token_secret_arn: str | None = None
    environment: Mapping[str, str] = field(default_factory=dict)
    log_group: str | None = None
    health_check_start_period_s: int = 180
    stable_timeout_s: float = 1800.0
    rollback_timeout_s: float = 1200.0
    poll_interval_s: float = 15.0
    smoke_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        """Validate every field; raise ``DeployConfigError`` naming the first bad one."""
        check_region(self.region)
        _check_name("cluster", self.cluster)
        _check_name("service", self.service)
        check_repository(self.ecr_repository)
        _check_name("task_family", self.task_family)
        _check_name("container_name", self.container_name)
        if not _ROLE_ARN_RE.match(self.execution_role_arn or ""):
            raise DeployConfigError(
                f"execution_role_arn {self.execution_role_arn!r} is not an IAM role ARN "
                "(arn:aws:iam::<account>:role/<name>)"
            )
        if self.task_role_arn is not None and not _ROLE_ARN_RE.match(self.task_role_arn):
            raise DeployConfigError(
                f"task_role_arn {self.task_role_arn!r} is not an IAM role ARN "
                "(arn:aws:iam::<account>:role/<name>)"
            )
        if not 1 <= self.port <= 65535:
            raise DeployConfigError(f"port must be in 1..65535, got {self.port}")
        if self.gpu_count < 0:
            raise DeployConfigError(f"gpu_count must be >= 0, got {self.gpu_count}")
        _check_positive("cpu", self.cpu, " CPU units")
        _check_positive("memory_mib", self.memory_mib, " MiB")
        if self.network_mode not in NETWORK_MODES:
            raise DeployConfigError(
                f"network_mode must be one of {', '.join(NETWORK_MODES)}, got {self.network_mode!r}"
            )
        if not self.health_path.startswith("/"):
            raise DeployConfigError(f"health_path must start with '/', got {self.health_path!r}")
        if self.api_token_secret_arn is not None and not _SECRET_ARN_RE.match(
            self.api_token_secret_arn
        ):
            raise DeployConfigError(
                f"api_token_secret_arn {self.api_token_secret_arn!r} is not a Secrets Manager "
                "secret ARN (arn:aws:secretsmanager:<region>:<account>:secret:<name>)"
            )
        for name in self.environment:
            if not _ENV_NAME_RE.match(name):
                raise DeployConfigError(f"environment variable name {name!r} is invalid")
            if name == API_TOKEN_ENV:
                raise DeployConfigError(
                    f"{API_TOKEN_ENV} must come from api_token_secret_arn, not plaintext "
                    "environment"
                )
        if not 0 <= self.health_check_start_period_s <= 300:
            raise DeployConfigError(
                "health_check_start_period_s must be in 0..300, "
                f"got {self.health_check_start_period_s}"
            )
        for name in ("stable_timeout_s", "rollback_timeout_s", "poll_interval_s"):
            _check_positive(name, getattr(self, name), " seconds")
        _check_positive("smoke_timeout_s", self.smoke_timeout_s, " seconds")

    @property
    def resolved_log_group(self) -> str:
        """CloudWatch log group of the container (``/ecs/<task_family>`` by default)."""
        return self.log_group or f"/ecs/{self.task_family}"


def image_uri(repository_uri: str, tag: str) -> str:
    """Join an ECR repository URI and an image tag.

    Args:
        repository_uri: ``<account>.dkr.ecr.<region>.amazonaws.com/<name>``.
        tag: Docker tag (letters, digits, ``_ . -``; at most 128 characters).

    Returns:
        ``<repository_uri>:<tag>``.

    Raises:
        DeployConfigError: If the tag is invalid or the URI is empty or already tagged.
    """
    if not repository_uri:
        raise DeployConfigError("repository_uri must not be empty")
    if ":" in repository_uri.rsplit("/", 1)[-1] or "@" in repository_uri:
        raise DeployConfigError(f"repository_uri {repository_uri!r} already has a tag or digest")
    if not _TAG_RE.match(tag):
        raise DeployConfigError(
            f"image tag {tag!r} is invalid: use up to 128 letters, digits, '_', '.' or '-'"
        )
    return f"{repository_uri}:{tag}"


def check_image_uri(uri: str) -> None:
    """Reject image URIs without an explicit tag or digest (``latest`` included).

    Args:
        uri: Image reference, e.g. ``1234.dkr.ecr.us-east-1.amazonaws.com/mitoseg:v1``.

    Raises:
        DeployConfigError: If the reference is empty, has whitespace, or is untagged.
    """
    if not uri:
        raise DeployConfigError("image URI must not be empty")
    if any(ch.isspace() for ch in uri):
        raise DeployConfigError(f"image URI {uri!r} contains whitespace")
    name, _, digest = uri.partition("@")
    if digest:
        if not _DIGEST_RE.match(digest):
            raise DeployConfigError(f"image URI {uri!r} has an invalid digest")
        return
    last = name.rsplit("/", 1)[-1]
    tag = last.partition(":")[2]
    if not tag or tag == "latest":
        raise DeployConfigError(
            f"image URI {uri!r} needs an explicit tag or digest (not 'latest') so a "
            "rollback can return to an exact image"
        )
    if not _TAG_RE.match(tag):
        raise DeployConfigError(f"image URI {uri!r} has an invalid tag {tag!r}")


def health_check_command(port: int, path: str) -> list[str]:
    """Container health check probing ``http://localhost:<port><path>`` with Python.

    The Bento image always has Python but not necessarily curl; ``urlopen`` raises on
    any non-2xx status, which fails the check.
    """
    url = f"http://localhost:{port}{path}"
    probe = f"import urllib.request; urllib.request.urlopen('{url}', timeout=4)"
    return ["CMD-SHELL", f'python -c "{probe}" || exit 1']


def build_task_definition(config: DeployConfig, image: str) -> dict[str, Any]:
    """Keyword arguments of ``ecs.register_task_definition`` for ``image``.

    Args:
        config: Deploy configuration.
        image: Tagged image URI.

    Returns:
        The request: one essential container with GPU ``resourceRequirements`` (when
        ``gpu_count > 0``), port mapping, health check, awslogs logging, plaintext
        ``environment`` and the API token as a Secrets Manager ``secrets`` entry.
    """
    check_image_uri(image)
    host_port = 0 if config.network_mode == "bridge" else config.port
    container: dict[str, Any] = {
        "name": config.container_name,
        "image": image,
        "essential": True,
        "portMappings": [
            {
                "name": "http",
                "containerPort": config.port,
                "hostPort": host_port,
                "protocol": "tcp",
            }
        ],
        "environment": [
            {"name": key, "value": value} for key, value in sorted(config.environment.items())
        ],
        "healthCheck": {
            "command": health_check_command(config.port, config.health_path),
            "interval": 30,
            "timeout": 5,
            "retries": 3,
            "startPeriod": config.health_check_start_period_s,
        },
        "logConfiguration": {
            "logDriver": "awslogs",
            "options": {
                "awslogs-group": config.resolved_log_group,
                "awslogs-region": config.region,
                "awslogs-stream-prefix": config.container_name,
                "awslogs-create-group": "true",
            },
        },
        "stopTimeout": 60,
        "ulimits": [{"name": "nofile", "softLimit": 65536, "hardLimit": 65536}],
    }
    if config.gpu_count > 0:
        container["resourceRequirements"] = [{"type": "GPU", "value": str(config.gpu_count)}]
    if config.api_token_secret_arn:
        container["secrets"] = [{"name": API_TOKEN_ENV, "valueFrom": config.api_token_secret_arn}]
    request: dict[str, Any] = {
        "family": config.task_family,
        "requiresCompatibilities": ["EC2"],
        "networkMode": config.network_mode,
        "cpu": str(config.cpu),
        "memory": str(config.memory_mib),
        "executionRoleArn": config.execution_role_arn,
        "containerDefinitions": [container],
        "tags": [
            {"key": "app", "value": "mitoseg"},
            {"key": "image", "value": image[:256]},
        ],
    }
    if config.task_role_arn:
        request["taskRoleArn"] = config.task_role_arn
    return request
