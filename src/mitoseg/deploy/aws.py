"""Roll a Bento image out to an ECS service running on EC2 GPU capacity.

Why one module of about 1,070 lines: every AWS call of a deploy lives here, so the
permissions a deploy needs can be reviewed in one file.

Every AWS call of a deploy lives here (the workflow only builds and pushes the image):

1. ``ensure_ecr_repository`` / ``ecr_login_info`` / ``image_uri`` / ``verify_image``:
   the ECR side (the push itself is ``docker push`` in the workflow).
2. ``build_task_definition`` / ``register_task_definition``: an EC2 task definition that
   reserves ``gpu_count`` GPUs (``resourceRequirements``), health-checks ``/readyz``
   inside the container, logs to CloudWatch and takes ``MITOSEG_API_TOKEN`` from Secrets
   Manager by ARN (never as plaintext).
3. ``update_service`` with the ECS deployment circuit breaker (``rollback: true``), then
   ``wait_stable`` polls ``describe_services`` until the new PRIMARY deployment is
   ``COMPLETED`` with ``runningCount == desiredCount`` and older deployments drained.
4. ``http_smoke_test``: ``GET /readyz`` then ``POST /segment`` with a tiny TIFF on the
   live endpoint (injectable).
5. ``deploy`` chains the steps; any failure after the service was touched rolls the
   service back to the task definition it ran before and raises ``DeployError`` naming
   the failed step.

boto3 is imported only inside ``make_clients`` so that importing this module (the CLI
does on start) stays cheap; every other function takes its clients as arguments, which
is also how the tests pass moto-backed or fake clients.
"""

from __future__ import annotations

import base64
import io
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

log = logging.getLogger(__name__)

Client = Any
"""A boto3 client (or a test double exposing the same methods)."""

SmokeTest = Callable[[str], Mapping[str, Any]]
"""``smoke_test(base_url) -> details``; raises ``SmokeTestError`` on failure."""

API_TOKEN_ENV = "MITOSEG_API_TOKEN"
NETWORK_MODES = ("awsvpc", "bridge", "host")
CIRCUIT_BREAKER_CONFIG: dict[str, Any] = {
    "deploymentCircuitBreaker": {"enable": True, "rollback": True},
    "maximumPercent": 200,
    "minimumHealthyPercent": 100,
}

_REGION_RE = re.compile(r"^[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-\d{1,2}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,255}$")
_ECR_REPO_RE = re.compile(r"^(?:[a-z0-9]+(?:[._-][a-z0-9]+)*/)*[a-z0-9]+(?:[._-][a-z0-9]+)*$")
_ROLE_ARN_RE = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+$")
_SECRET_ARN_RE = re.compile(r"^arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:\d{12}:secret:[\w/+=.@-]+$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_ECR_IMAGE_RE = re.compile(
    r"^(?P<registry>\d{12})\.dkr\.ecr\.(?P<region>[a-z0-9-]+)\.amazonaws\.com(?:\.cn)?/"
    r"(?P<repository>[^:@]+)(?::(?P<tag>[^@]+))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?$"
)


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


def _check_repository(name: str) -> None:
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
        _check_repository(self.ecr_repository)
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


@dataclass(frozen=True)
class AwsClients:
    """The boto3 clients a deploy uses (real, moto-backed or fakes in tests)."""

    ecs: Client
    ecr: Client | None = None
    elbv2: Client | None = None
    secretsmanager: Client | None = None


def make_clients(region: str, session: Any | None = None) -> AwsClients:
    """Create the boto3 clients for ``region`` (boto3 is imported here, lazily).

    Args:
        region: AWS region name.
        session: Optional ``boto3.session.Session``; default credentials chain otherwise
            (in GitHub Actions: the OIDC role from ``configure-aws-credentials``).

    Returns:
        ECS, ECR, ELBv2 and Secrets Manager clients.
    """
    if session is None:
        import boto3

        session = boto3.session.Session(region_name=region)
    return AwsClients(
        ecs=session.client("ecs", region_name=region),
        ecr=session.client("ecr", region_name=region),
        elbv2=session.client("elbv2", region_name=region),
        secretsmanager=session.client("secretsmanager", region_name=region),
    )


def _error_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, Mapping):
        return response.get("Error", {}).get("Code")
    return None


# --------------------------------------------------------------------------- ECR


def ensure_ecr_repository(
    ecr: Client, name: str, *, scan_on_push: bool = True, immutable_tags: bool = True
) -> dict[str, Any]:
    """Return the ECR repository ``name``, creating it when missing (idempotent).

    New repositories get scan-on-push, immutable tags (a tag always means the same
    image, which makes rollbacks exact) and AES256 encryption. An existing repository is
    returned unchanged.

    Args:
        ecr: boto3 ECR client.
        name: Repository name.
        scan_on_push: Enable image scanning on push for a new repository.
        immutable_tags: Create the repository with ``IMMUTABLE`` tags.

    Returns:
        ``{"name", "uri", "arn", "created"}``; ``created`` is False when it existed.

    Raises:
        DeployConfigError: If ``name`` is not a valid repository name.
    """
    _check_repository(name)
    created = False
    try:
        repo = ecr.describe_repositories(repositoryNames=[name])["repositories"][0]
    except Exception as exc:
        if _error_code(exc) != "RepositoryNotFoundException":
            raise
        try:
            repo = ecr.create_repository(
                repositoryName=name,
                imageTagMutability="IMMUTABLE" if immutable_tags else "MUTABLE",
                imageScanningConfiguration={"scanOnPush": scan_on_push},
                encryptionConfiguration={"encryptionType": "AES256"},
            )["repository"]
            created = True
            log.info("created ECR repository %s", repo["repositoryUri"])
        except Exception as create_exc:  # another deploy created it in between
            if _error_code(create_exc) != "RepositoryAlreadyExistsException":
                raise
            repo = ecr.describe_repositories(repositoryNames=[name])["repositories"][0]
    return {
        "name": repo["repositoryName"],
        "uri": repo["repositoryUri"],
        "arn": repo["repositoryArn"],
        "created": created,
    }


@dataclass(frozen=True)
class EcrLogin:
    """Credentials for ``docker login`` to an ECR registry (valid for 12 hours)."""

    username: str
    password: str
    registry: str

    def __repr__(self) -> str:
        """Hide the password."""
        return f"EcrLogin(username={self.username!r}, password='***', registry={self.registry!r})"


def ecr_login_info(ecr: Client) -> EcrLogin:
    """Decode ``get_authorization_token`` into docker login credentials.

    Args:
        ecr: boto3 ECR client.

    Returns:
        ``EcrLogin(username, password, registry)``; ``registry`` is the host name without
        ``https://`` (``<account>.dkr.ecr.<region>.amazonaws.com``).

    Raises:
        RuntimeError: If the token is not ``user:password`` base64.
    """
    data = ecr.get_authorization_token()["authorizationData"][0]
    decoded = base64.b64decode(data["authorizationToken"]).decode("utf-8")
    username, sep, password = decoded.partition(":")
    if not sep or not username or not password:
        raise RuntimeError("ECR authorization token is not of the form 'user:password'")
    registry = re.sub(r"^https?://", "", data["proxyEndpoint"]).rstrip("/")
    return EcrLogin(username=username, password=password, registry=registry)


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


def verify_image(ecr: Client, uri: str) -> dict[str, Any] | None:
    """Check that an ECR image reference exists before the service is touched.

    Args:
        ecr: boto3 ECR client.
        uri: Image reference; references outside ECR are not checked.

    Returns:
        ``{"repository", "digest", "pushed_at"}`` for ECR images, else None.

    Raises:
        LookupError: If the repository or the tag/digest does not exist.
    """
    match = _ECR_IMAGE_RE.match(uri)
    if match is None:
        return None
    repository = match["repository"]
    image_id = {"imageDigest": match["digest"]} if match["digest"] else {"imageTag": match["tag"]}
    try:
        detail = ecr.describe_images(
            registryId=match["registry"], repositoryName=repository, imageIds=[image_id]
        )["imageDetails"][0]
    except Exception as exc:
        code = _error_code(exc)
        if code == "ImageNotFoundException":
            raise LookupError(
                f"image {uri} not found in ECR repository {repository!r}: push it first"
            ) from exc
        if code == "RepositoryNotFoundException":
            raise LookupError(f"ECR repository {repository!r} does not exist") from exc
        raise
    return {
        "repository": repository,
        "digest": detail.get("imageDigest"),
        "pushed_at": str(detail.get("imagePushedAt", "")),
    }


# ------------------------------------------------------------------ task definition


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


def register_task_definition(ecs: Client, config: DeployConfig, image: str) -> str:
    """Register a new revision of ``config.task_family`` running ``image``.

    Args:
        ecs: boto3 ECS client.
        config: Deploy configuration.
        image: Tagged image URI.

    Returns:
        The new task definition ARN (``...:task-definition/<family>:<revision>``).
    """
    response = ecs.register_task_definition(**build_task_definition(config, image))
    arn = response["taskDefinition"]["taskDefinitionArn"]
    log.info("registered task definition %s for %s", arn, image)
    return arn


# --------------------------------------------------------------------- ECS service


def describe_service(ecs: Client, cluster: str, service: str) -> dict[str, Any]:
    """Describe one ECS service.

    Raises:
        LookupError: If the service does not exist in ``cluster``.
    """
    response = ecs.describe_services(cluster=cluster, services=[service])
    services = response.get("services") or []
    if not services:
        reasons = ", ".join(f["reason"] for f in response.get("failures") or []) or "MISSING"
        raise LookupError(f"service {service!r} not found in cluster {cluster!r} ({reasons})")
    return services[0]


def update_service(ecs: Client, cluster: str, service: str, task_definition: str) -> None:
    """Point the service at ``task_definition`` with the circuit breaker on.

    The deployment configuration keeps full capacity during the rollout
    (``minimumHealthyPercent=100``, ``maximumPercent=200``) and lets ECS roll back by
    itself when tasks keep failing to start (``deploymentCircuitBreaker``).
    """
    ecs.update_service(
        cluster=cluster,
        service=service,
        taskDefinition=task_definition,
        deploymentConfiguration=CIRCUIT_BREAKER_CONFIG,
    )
    log.info("service %s/%s -> %s", cluster, service, task_definition)


@dataclass(frozen=True)
class RolloutStatus:
    """Where a deployment stands: ``state`` is ``stable``, ``pending`` or ``failed``."""

    state: Literal["stable", "pending", "failed"]
    reason: str


def rollout_status(service: Mapping[str, Any], task_definition: str) -> RolloutStatus:
    """Classify a ``describe_services`` entry against the task definition being rolled out.

    Stable means: service ``ACTIVE``, the PRIMARY deployment runs ``task_definition``,
    its ``rolloutState`` (when reported) is ``COMPLETED``, ``runningCount ==
    desiredCount`` with nothing pending, and no older deployment is still draining.

    Args:
        service: One element of ``describe_services()["services"]``.
        task_definition: ARN expected on the PRIMARY deployment.

    Returns:
        The status with a human-readable reason.
    """
    status = service.get("status", "ACTIVE")
    if status != "ACTIVE":
        return RolloutStatus("failed", f"service status is {status}")
    deployments = list(service.get("deployments") or [])
    for dep in deployments:
        if dep.get("taskDefinition") == task_definition and dep.get("rolloutState") == "FAILED":
            reason = dep.get("rolloutStateReason") or "no reason given"
            return RolloutStatus("failed", f"rollout FAILED: {reason}")
    primary = next((d for d in deployments if d.get("status") == "PRIMARY"), None)
    if primary is None:
        return RolloutStatus("pending", "no PRIMARY deployment yet")
    if primary.get("taskDefinition") != task_definition:
        return RolloutStatus("pending", f"PRIMARY deployment runs {primary.get('taskDefinition')}")
    running = int(primary.get("runningCount", 0))
    desired = int(primary.get("desiredCount", service.get("desiredCount", 0)))
    pending = int(primary.get("pendingCount", 0))
    others = len(deployments) - 1
    rollout = primary.get("rolloutState")
    counts = f"{running}/{desired} running, {pending} pending"
    if rollout is not None and rollout != "COMPLETED":
        return RolloutStatus("pending", f"rollout {rollout}: {counts}")
    if running != desired or pending:
        return RolloutStatus("pending", counts)
    if others:
        return RolloutStatus("pending", f"{others} older deployment(s) still draining")
    return RolloutStatus("stable", f"{counts}, rollout COMPLETED")


def wait_stable(
    ecs: Client,
    cluster: str,
    service: str,
    task_definition: str,
    *,
    timeout_s: float,
    poll_interval_s: float,
    sleep: Callable[[float], None] | None = None,
    clock: Callable[[], float] | None = None,
) -> dict[str, Any]:
    """Poll ``describe_services`` until the rollout of ``task_definition`` is stable.

    Args:
        ecs: boto3 ECS client (anything with ``describe_services``).
        cluster: Cluster name.
        service: Service name.
        task_definition: ARN the PRIMARY deployment must run.
        timeout_s: Give up after this many seconds (> 0).
        poll_interval_s: Seconds between polls (> 0); the last sleep is cut to the
            deadline.
        sleep: Sleep function (default ``time.sleep``); injected by tests.
        clock: Monotonic clock in seconds (default ``time.monotonic``).

    Returns:
        The final ``describe_services`` entry.

    Raises:
        ValueError: If ``timeout_s`` or ``poll_interval_s`` is not positive.
        RolloutFailedError: If ECS reports the deployment failed or the service inactive.
        RolloutTimeoutError: If it is not stable within ``timeout_s``.
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if not poll_interval_s > 0:
        raise ValueError(f"poll_interval_s must be > 0, got {poll_interval_s}")
    sleep = sleep or time.sleep
    clock = clock or time.monotonic
    deadline = clock() + timeout_s
    while True:
        current = describe_service(ecs, cluster, service)
        status = rollout_status(current, task_definition)
        if status.state == "stable":
            log.info("service %s stable on %s (%s)", service, task_definition, status.reason)
            return current
        if status.state == "failed":
            raise RolloutFailedError(
                f"deployment of {task_definition} to service {service!r} failed: {status.reason}"
            )
        remaining = deadline - clock()
        if remaining <= 0:
            raise RolloutTimeoutError(
                f"service {service!r} not stable on {task_definition} after {timeout_s:g}s: "
                f"{status.reason}"
            )
        log.info("waiting for %s: %s", service, status.reason)
        sleep(min(poll_interval_s, remaining))


# ---------------------------------------------------------------------- endpoint


def service_endpoint_url(ecs: Client, elbv2: Client, cluster: str, service: str) -> str:
    """Public URL of the load balancer in front of an ECS service.

    Follows ``service.loadBalancers[0].targetGroupArn`` to its load balancer and prefers
    an HTTPS listener.

    Returns:
        ``https://<dns>`` or ``http://<dns>`` (with ``:<port>`` when not 443/80).

    Raises:
        LookupError: If the service has no load balancer or it has no listener.
    """
    svc = describe_service(ecs, cluster, service)
    target_groups = [
        lb["targetGroupArn"] for lb in svc.get("loadBalancers") or [] if lb.get("targetGroupArn")
    ]
    if not target_groups:
        raise LookupError(
            f"service {service!r} has no load balancer target group: pass the smoke URL"
        )
    group = elbv2.describe_target_groups(TargetGroupArns=[target_groups[0]])["TargetGroups"][0]
    lb_arns = group.get("LoadBalancerArns") or []
    if not lb_arns:
        raise LookupError(f"target group {target_groups[0]} is not attached to a load balancer")
    balancer = elbv2.describe_load_balancers(LoadBalancerArns=[lb_arns[0]])["LoadBalancers"][0]
    listeners = elbv2.describe_listeners(LoadBalancerArn=lb_arns[0])["Listeners"]
    if not listeners:
        raise LookupError(f"load balancer {balancer['DNSName']} has no listener")
    https = [item for item in listeners if item.get("Protocol") in ("HTTPS", "TLS")]
    chosen = (https or listeners)[0]
    scheme = "https" if https else "http"
    port = int(chosen["Port"])
    default_port = 443 if https else 80
    suffix = "" if port == default_port else f":{port}"
    return f"{scheme}://{balancer['DNSName']}{suffix}"


def read_secret(secretsmanager: Client, arn: str) -> str:
    """Return the ``SecretString`` of a Secrets Manager secret.

    Raises:
        ValueError: If the secret has no (or an empty) string value.
    """
    value = secretsmanager.get_secret_value(SecretId=arn).get("SecretString")
    if not value:
        raise ValueError(f"secret {arn} has no SecretString value")
    return value


# -------------------------------------------------------------------- smoke test


def tiny_test_image(size: int = 64) -> bytes:
    """A small synthetic EM-like slice as TIFF bytes: ``(size, size)`` uint8.

    Textured background with a few bright ellipses, so the service runs the whole
    preprocessing path (a constant image could be rejected by input checks).
    """
    import numpy as np
    import tifffile

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    img = 90 + 30 * np.sin(xx / 5.0) * np.cos(yy / 7.0)
    for cy, cx, r in ((size * 0.3, size * 0.3, size * 0.12), (size * 0.7, size * 0.6, size * 0.15)):
        img[((yy - cy) ** 2 + ((xx - cx) / 1.5) ** 2) < r**2] = 200
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.clip(img, 0, 255).astype(np.uint8))
    return buffer.getvalue()


def http_smoke_test(
    base_url: str,
    *,
    health_path: str = "/readyz",
    segment_path: str = "/segment",
    image_field: str = "image",
    token: str | None = None,
    timeout_s: float = 60.0,
    attempts: int = 5,
    retry_delay_s: float = 6.0,
    sleep: Callable[[float], None] | None = None,
) -> dict[str, Any]:
    """Check a live endpoint: ``GET <health_path>`` then ``POST <segment_path>``.

    The readiness probe is retried ``attempts`` times (``retry_delay_s`` apart) because
    load balancer health checks lag the ECS deployment. The segment request sends
    ``tiny_test_image()`` as multipart field ``image_field`` (``smoke.tif``) with
    ``Authorization: Bearer <token>`` when a token is given, and must answer 200 with
    a non-empty body.

    Args:
        base_url: ``http(s)://host[:port]`` of the service.
        health_path: Readiness path.
        segment_path: Segmentation path.
        image_field: Multipart field name of the image.
        token: API token for the segment request.
        timeout_s: Per-request timeout.
        attempts: Readiness attempts (>= 1).
        retry_delay_s: Seconds between readiness attempts.
        sleep: Sleep function (default ``time.sleep``).

    Returns:
        ``{"url", "readyz_status", "segment_status", "segment_bytes", "segment_seconds"}``.

    Raises:
        SmokeTestError: On a bad URL, connection error, non-200 status or empty body.
    """
    import requests

    if not re.match(r"^https?://[^/\s]+", base_url or ""):
        raise SmokeTestError(f"smoke URL {base_url!r} must start with http:// or https://")
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    sleep = sleep or time.sleep
    base = base_url.rstrip("/")
    ready_url = base + health_path
    last = ""
    ready_status = None
    for attempt in range(1, attempts + 1):
        try:
            response = requests.get(ready_url, timeout=timeout_s)
            ready_status = response.status_code
            if ready_status == 200:
                break
            last = f"status {ready_status}"
        except requests.RequestException as exc:
            last = f"{type(exc).__name__}: {exc}"
        if attempt < attempts:
            sleep(retry_delay_s)
    else:
        raise SmokeTestError(f"GET {ready_url} not ready after {attempts} attempt(s): {last}")

    segment_url = base + segment_path
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    files = {image_field: ("smoke.tif", tiny_test_image(), "image/tiff")}
    started = time.perf_counter()
    try:
        response = requests.post(segment_url, files=files, headers=headers, timeout=timeout_s)
    except requests.RequestException as exc:
        raise SmokeTestError(f"POST {segment_url} failed: {type(exc).__name__}: {exc}") from exc
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        raise SmokeTestError(
            f"POST {segment_url} returned {response.status_code}: {response.text[:200]}"
        )
    if not response.content:
        raise SmokeTestError(f"POST {segment_url} returned an empty body")
    return {
        "url": base,
        "readyz_status": ready_status,
        "segment_status": response.status_code,
        "segment_bytes": len(response.content),
        "segment_seconds": round(seconds, 3),
    }


# ------------------------------------------------------------------------ deploy


@dataclass(frozen=True)
class DeployResult:
    """Outcome of a successful deploy."""

    image: str
    task_definition: str
    previous_task_definition: str
    endpoint: str
    smoke: dict[str, Any]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return asdict(self)


def rollback(
    clients: AwsClients,
    config: DeployConfig,
    previous_task_definition: str,
    failed_task_definition: str | None,
    *,
    sleep: Callable[[float], None] | None = None,
    clock: Callable[[], float] | None = None,
) -> None:
    """Return the service to ``previous_task_definition`` and wait until it is stable.

    The failed revision is then deregistered (best effort) so it cannot be redeployed by
    accident; the image stays in ECR for debugging.

    Raises:
        RolloutError: If the rolled-back deployment does not become stable.
    """
    log.warning("rolling %s back to %s", config.service, previous_task_definition)
    update_service(clients.ecs, config.cluster, config.service, previous_task_definition)
    wait_stable(
        clients.ecs,
        config.cluster,
        config.service,
        previous_task_definition,
        timeout_s=config.rollback_timeout_s,
        poll_interval_s=config.poll_interval_s,
        sleep=sleep,
        clock=clock,
    )
    if failed_task_definition and failed_task_definition != previous_task_definition:
        try:
            clients.ecs.deregister_task_definition(taskDefinition=failed_task_definition)
        except Exception as exc:  # the rollback itself succeeded; do not mask that
            log.warning("could not deregister %s: %s", failed_task_definition, exc)


def deploy(
    config: DeployConfig,
    image: str,
    *,
    clients: AwsClients | None = None,
    smoke_url: str | None = None,
    smoke_test: SmokeTest | None = None,
    sleep: Callable[[float], None] | None = None,
    clock: Callable[[], float] | None = None,
) -> DeployResult:
    """Roll ``image`` out to the ECS service, smoke-test it, roll back on any failure.

    Steps (the name appears in ``DeployError.step``): ``describe_service`` (remember the
    current task definition), ``verify_image`` (ECR images only), ``resolve_endpoint``
    (``smoke_url`` or the service's load balancer), ``read_api_token`` (when the default
    smoke test needs the secret), ``register_task_definition``, ``update_service``,
    ``wait_stable`` and ``smoke_test``. A failure in the first four leaves the service
    untouched; from ``update_service`` on, the service is rolled back to the previous
    task definition (and waited on) before ``DeployError`` is raised.

    Args:
        config: Validated deploy configuration.
        image: Tagged (or digest-pinned) image URI, already pushed.
        clients: AWS clients; default ``make_clients(config.region)``.
        smoke_url: Base URL of the live endpoint; default: the service's load balancer.
        smoke_test: ``smoke_test(base_url) -> details``; default ``http_smoke_test`` with
            the API token read from ``config.api_token_secret_arn``.
        sleep: Sleep function for polling (tests inject a fake one).
        clock: Monotonic clock for timeouts (tests inject a fake one).

    Returns:
        The deploy result.

    Raises:
        DeployConfigError: If ``image`` is not a tagged image URI.
        DeployError: If any step fails; the message names the step and whether the
            service was rolled back.
    """
    check_image_uri(image)
    clients = clients or make_clients(config.region)
    started = (clock or time.monotonic)()
    step = "describe_service"
    previous: str | None = None
    new_td: str | None = None
    touched = False
    try:
        current = describe_service(clients.ecs, config.cluster, config.service)
        if current.get("status", "ACTIVE") != "ACTIVE":
            raise RolloutError(f"service {config.service!r} is {current.get('status')}")
        previous = current.get("taskDefinition")
        if not previous:
            raise LookupError(f"service {config.service!r} has no task definition to roll back to")

        step = "verify_image"
        if clients.ecr is not None:
            verify_image(clients.ecr, image)

        step = "resolve_endpoint"
        if smoke_url is None:
            if clients.elbv2 is None:
                raise LookupError("no smoke URL given and no ELBv2 client to look it up")
            smoke_url = service_endpoint_url(
                clients.ecs, clients.elbv2, config.cluster, config.service
            )
        run_smoke = smoke_test
        if run_smoke is None:
            step = "read_api_token"
            token = None
            if config.api_token_secret_arn:
                if clients.secretsmanager is None:
                    raise LookupError("no Secrets Manager client to read the API token")
                token = read_secret(clients.secretsmanager, config.api_token_secret_arn)

            def run_smoke(url: str) -> Mapping[str, Any]:
                return http_smoke_test(
                    url,
                    health_path=config.health_path,
                    token=token,
                    timeout_s=config.smoke_timeout_s,
                    sleep=sleep,
                )

        step = "register_task_definition"
        new_td = register_task_definition(clients.ecs, config, image)

        step = "update_service"
        touched = True
        update_service(clients.ecs, config.cluster, config.service, new_td)

        step = "wait_stable"
        wait_stable(
            clients.ecs,
            config.cluster,
            config.service,
            new_td,
            timeout_s=config.stable_timeout_s,
            poll_interval_s=config.poll_interval_s,
            sleep=sleep,
            clock=clock,
        )

        step = "smoke_test"
        log.info("smoke test against %s", smoke_url)
        details = dict(run_smoke(smoke_url))
    except Exception as exc:
        cause = f"{type(exc).__name__}: {exc}"
        message = f"deploy of {image} failed at step '{step}': {cause}."
        if not touched or previous is None:
            raise DeployError(
                f"{message} The service was not changed.",
                step=step,
                previous_task_definition=previous,
                task_definition=new_td,
            ) from exc
        try:
            rollback(clients, config, previous, new_td, sleep=sleep, clock=clock)
        except Exception as rb_exc:
            raise DeployError(
                f"{message} Rollback to {previous} ALSO FAILED: {type(rb_exc).__name__}: "
                f"{rb_exc}. Fix service {config.service!r} by hand.",
                step=step,
                previous_task_definition=previous,
                task_definition=new_td,
            ) from exc
        raise DeployError(
            f"{message} Rolled service {config.service!r} back to {previous}.",
            step=step,
            previous_task_definition=previous,
            task_definition=new_td,
            rolled_back=True,
        ) from exc
    return DeployResult(
        image=image,
        task_definition=new_td,
        previous_task_definition=previous,
        endpoint=smoke_url,
        smoke=details,
        seconds=round((clock or time.monotonic)() - started, 3),
    )
