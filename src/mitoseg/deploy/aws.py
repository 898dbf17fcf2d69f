"""Roll a Bento image out to an ECS service running on EC2 GPU capacity.

Every AWS call of a deploy lives here, so the permissions a deploy needs can be reviewed
in one file (the workflow only builds and pushes the image). What a deploy accepts and
its errors are :mod:`mitoseg.deploy.config`; the HTTP smoke test is
:mod:`mitoseg.deploy.smoke`.

1. ``ensure_ecr_repository`` / ``ecr_login_info`` / ``verify_image``:
   the ECR side (the push itself is ``docker push`` in the workflow).
2. ``register_task_definition`` (the request built by
   :func:`mitoseg.deploy.config.build_task_definition`): an EC2 task definition that
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
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, NoReturn

from mitoseg.deploy.config import (
    DeployConfig,
    DeployError,
    RolloutError,
    RolloutFailedError,
    RolloutTimeoutError,
    build_task_definition,
    check_image_uri,
    check_repository,
)
from mitoseg.deploy.smoke import SmokeTest, http_smoke_test

log = logging.getLogger(__name__)

Client = Any
"""A boto3 client (or a test double exposing the same methods)."""

CIRCUIT_BREAKER_CONFIG: dict[str, Any] = {
    "deploymentCircuitBreaker": {"enable": True, "rollback": True},
    "maximumPercent": 200,
    "minimumHealthyPercent": 100,
}

_ECR_IMAGE_RE = re.compile(
    r"^(?P<registry>\d{12})\.dkr\.ecr\.(?P<region>[a-z0-9-]+)\.amazonaws\.com(?:\.cn)?/"
    r"(?P<repository>[^:@]+)(?::(?P<tag>[^@]+))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?$"
)


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
    check_repository(name)
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
    _wait_service(clients, config, previous_task_definition, config.rollback_timeout_s,
                  sleep, clock)  # fmt: skip
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
    state = _Progress()
    try:
        smoke_url, run_smoke = _prepare(clients, config, image, smoke_url, smoke_test, sleep, state)
        new_td = _roll_out(clients, config, image, sleep, clock, state)
        state.step = "smoke_test"
        log.info("smoke test against %s", smoke_url)
        details = dict(run_smoke(smoke_url))
    except Exception as exc:
        _fail(clients, config, image, exc, state, sleep, clock)
    assert state.previous is not None
    return DeployResult(
        image=image,
        task_definition=new_td,
        previous_task_definition=state.previous,
        endpoint=smoke_url,
        smoke=details,
        seconds=round((clock or time.monotonic)() - started, 3),
    )


@dataclass
class _Progress:
    """Where a deploy is: the step running, the task definitions, whether the service
    was touched (from ``update_service`` on, a failure rolls it back)."""

    step: str = "describe_service"
    previous: str | None = None
    task_definition: str | None = None
    touched: bool = False


def _prepare(
    clients: AwsClients,
    config: DeployConfig,
    image: str,
    smoke_url: str | None,
    smoke_test: SmokeTest | None,
    sleep: Callable[[float], None] | None,
    state: _Progress,
) -> tuple[str, SmokeTest]:
    """The steps that leave the service untouched: ``describe_service``,
    ``verify_image``, ``resolve_endpoint`` and ``read_api_token``. Returns the smoke URL
    and the smoke test to run (see :func:`deploy`)."""
    current = describe_service(clients.ecs, config.cluster, config.service)
    if current.get("status", "ACTIVE") != "ACTIVE":
        raise RolloutError(f"service {config.service!r} is {current.get('status')}")
    state.previous = current.get("taskDefinition")
    if not state.previous:
        raise LookupError(f"service {config.service!r} has no task definition to roll back to")

    state.step = "verify_image"
    if clients.ecr is not None:
        verify_image(clients.ecr, image)

    state.step = "resolve_endpoint"
    if smoke_url is None:
        if clients.elbv2 is None:
            raise LookupError("no smoke URL given and no ELBv2 client to look it up")
        smoke_url = service_endpoint_url(clients.ecs, clients.elbv2, config.cluster, config.service)
    if smoke_test is not None:
        return smoke_url, smoke_test
    state.step = "read_api_token"
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

    return smoke_url, run_smoke


def _roll_out(
    clients: AwsClients,
    config: DeployConfig,
    image: str,
    sleep: Callable[[float], None] | None,
    clock: Callable[[], float] | None,
    state: _Progress,
) -> str:
    """``register_task_definition``, ``update_service`` and ``wait_stable``; returns the
    new task definition's ARN."""
    state.step = "register_task_definition"
    new_td = state.task_definition = register_task_definition(clients.ecs, config, image)

    state.step = "update_service"
    state.touched = True
    update_service(clients.ecs, config.cluster, config.service, new_td)

    state.step = "wait_stable"
    _wait_service(clients, config, new_td, config.stable_timeout_s, sleep, clock)
    return new_td


def _wait_service(
    clients: AwsClients,
    config: DeployConfig,
    task_definition: str,
    timeout_s: float,
    sleep: Callable[[float], None] | None,
    clock: Callable[[], float] | None,
) -> None:
    """:func:`wait_stable` for the configured service on ``task_definition``."""
    wait_stable(
        clients.ecs, config.cluster, config.service, task_definition, timeout_s=timeout_s,
        poll_interval_s=config.poll_interval_s, sleep=sleep, clock=clock,
    )  # fmt: skip


def _fail(
    clients: AwsClients,
    config: DeployConfig,
    image: str,
    exc: Exception,
    state: _Progress,
    sleep: Callable[[float], None] | None,
    clock: Callable[[], float] | None,
) -> NoReturn:
    """Raise the :class:`DeployError` of a failed step, after rolling the service back
    when it was touched."""
    step, previous, new_td = state.step, state.previous, state.task_definition
    cause = f"{type(exc).__name__}: {exc}"
    message = f"deploy of {image} failed at step '{step}': {cause}."
    if not state.touched or previous is None:
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
