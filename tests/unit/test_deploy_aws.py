"""ECR/ECS deploy with moto (``mock_aws``) plus fake ``describe_services`` sequences.

moto records ``update_service`` but never advances a deployment, so ``SimulatedEcs``
plays the ECS scheduler: every (fake) ``sleep`` of the deploy settles moto's service
deployments the way ECS would, healthy or not depending on the image.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws
from moto.ecs.models import ecs_backends
from typer.testing import CliRunner

from mitoseg.cli.deploy import deploy_app
from mitoseg.deploy import aws as dep
from mitoseg.deploy import config as cfg
from mitoseg.deploy import smoke
from mitoseg.deploy.aws import AwsClients
from mitoseg.deploy.config import (
    DeployConfig,
    DeployConfigError,
    DeployError,
    RolloutFailedError,
    RolloutTimeoutError,
    SmokeTestError,
)

REGION = "us-east-1"
ACCOUNT = "123456789012"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/mitoseg-task-execution"
REPO_URI = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/mitoseg"
IMAGE_V1 = f"{REPO_URI}:v1"
IMAGE_V2 = f"{REPO_URI}:v2"


def make_config(**overrides: Any) -> DeployConfig:
    base: dict[str, Any] = {
        "region": REGION,
        "cluster": "mitoseg-gpu",
        "service": "mitoseg-api",
        "ecr_repository": "mitoseg",
        "task_family": "mitoseg",
        "execution_role_arn": ROLE,
        "poll_interval_s": 15.0,
        "stable_timeout_s": 300.0,
        "rollback_timeout_s": 300.0,
    }
    base.update(overrides)
    return DeployConfig(**base)


# ------------------------------------------------------------------ config checks


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"cluster": ""}, "cluster must not be empty"),
        ({"service": ""}, "service must not be empty"),
        ({"task_family": ""}, "task_family must not be empty"),
        (
            {"service": "bad name"},
            "service 'bad name' is invalid: use 1-255 letters, digits, '-' or '_'",
        ),
        ({"region": ""}, "region must not be empty"),
        ({"region": "mars-1"}, "region 'mars-1' is not an AWS region name like 'us-east-1'"),
        ({"ecr_repository": ""}, "ecr_repository must not be empty"),
        (
            {"ecr_repository": "MitoSeg"},
            "ecr_repository 'MitoSeg' is invalid: use 2-256 lowercase letters and digits "
            "separated by '.', '_', '-' or '/'",
        ),
        ({"gpu_count": -1}, "gpu_count must be >= 0, got -1"),
        ({"port": 0}, "port must be in 1..65535, got 0"),
        ({"cpu": 0}, "cpu must be > 0 CPU units, got 0"),
        ({"memory_mib": -5}, "memory_mib must be > 0 MiB, got -5"),
        (
            {"execution_role_arn": "mitoseg-role"},
            "execution_role_arn 'mitoseg-role' is not an IAM role ARN "
            "(arn:aws:iam::<account>:role/<name>)",
        ),
        (
            {"task_role_arn": "arn:aws:iam::1:role/x"},
            "task_role_arn 'arn:aws:iam::1:role/x' is not an IAM role ARN "
            "(arn:aws:iam::<account>:role/<name>)",
        ),
        (
            {"api_token_secret_arn": "plaintext-token"},
            "api_token_secret_arn 'plaintext-token' is not a Secrets Manager secret ARN "
            "(arn:aws:secretsmanager:<region>:<account>:secret:<name>)",
        ),
        ({"network_mode": "nat"}, "network_mode must be one of awsvpc, bridge, host, got 'nat'"),
        ({"health_path": "readyz"}, "health_path must start with '/', got 'readyz'"),
        ({"environment": {"1BAD": "x"}}, "environment variable name '1BAD' is invalid"),
        (
            {"environment": {"MITOSEG_API_TOKEN": "s3cret"}},
            "MITOSEG_API_TOKEN must come from api_token_secret_arn, not plaintext environment",
        ),
        (
            {"health_check_start_period_s": 301},
            "health_check_start_period_s must be in 0..300, got 301",
        ),
        ({"stable_timeout_s": 0}, "stable_timeout_s must be > 0 seconds, got 0"),
        ({"rollback_timeout_s": -1}, "rollback_timeout_s must be > 0 seconds, got -1"),
        ({"poll_interval_s": 0}, "poll_interval_s must be > 0 seconds, got 0"),
        ({"smoke_timeout_s": 0}, "smoke_timeout_s must be > 0 seconds, got 0"),
    ],
)
def test_config_rejects_bad_values(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(DeployConfigError, match=f"^{re.escape(message)}$"):
        make_config(**overrides)


def test_config_defaults_and_log_group() -> None:
    config = make_config()
    assert (config.port, config.gpu_count, config.health_path) == (3000, 1, "/readyz")
    assert config.resolved_log_group == "/ecs/mitoseg"
    assert replace(config, log_group="/custom").resolved_log_group == "/custom"
    assert make_config(gpu_count=0, region="us-gov-west-1").gpu_count == 0


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("", "image URI must not be empty"),
        (f"{REPO_URI}", f"image URI '{REPO_URI}' needs an explicit tag or digest"),
        (f"{REPO_URI}:latest", f"image URI '{REPO_URI}:latest' needs an explicit tag or digest"),
        ("localhost:5000/mitoseg", "image URI 'localhost:5000/mitoseg' needs an explicit tag"),
        (f"{REPO_URI}@sha256:abc", f"image URI '{REPO_URI}@sha256:abc' has an invalid digest"),
        (f"{REPO_URI}:v 1", f"image URI '{REPO_URI}:v 1' contains whitespace"),
        (f"{REPO_URI}:-v1", f"image URI '{REPO_URI}:-v1' has an invalid tag '-v1'"),
    ],
)
def test_check_image_uri_rejects(uri: str, message: str) -> None:
    with pytest.raises(DeployConfigError, match=f"^{re.escape(message)}"):
        cfg.check_image_uri(uri)


def test_check_image_uri_accepts_tag_digest_and_registry_port() -> None:
    cfg.check_image_uri(IMAGE_V1)
    cfg.check_image_uri(f"{REPO_URI}@sha256:{'a' * 64}")
    cfg.check_image_uri("localhost:5000/mitoseg:v1.2.0-rc1")


def test_image_uri_joins_and_validates() -> None:
    assert cfg.image_uri(REPO_URI, "v1.0.0-abc123") == f"{REPO_URI}:v1.0.0-abc123"
    with pytest.raises(DeployConfigError, match=r"^image tag 'v1/x' is invalid"):
        cfg.image_uri(REPO_URI, "v1/x")
    with pytest.raises(DeployConfigError, match=r"already has a tag or digest$"):
        cfg.image_uri(IMAGE_V1, "v2")
    with pytest.raises(DeployConfigError, match=r"^repository_uri must not be empty$"):
        cfg.image_uri("", "v2")


# --------------------------------------------------------------- task definition


def test_task_definition_requests_gpu_secret_healthcheck_and_logs() -> None:
    secret = f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:mitoseg/api-token-AbCdEf"
    config = make_config(api_token_secret_arn=secret, environment={"LOG_LEVEL": "info"})
    request = cfg.build_task_definition(config, IMAGE_V2)
    (container,) = request["containerDefinitions"]
    assert request["requiresCompatibilities"] == ["EC2"]
    assert (request["cpu"], request["memory"]) == ("4096", "14336")
    assert request["executionRoleArn"] == ROLE
    assert container["resourceRequirements"] == [{"type": "GPU", "value": "1"}]
    assert container["secrets"] == [{"name": "MITOSEG_API_TOKEN", "valueFrom": secret}]
    assert container["environment"] == [{"name": "LOG_LEVEL", "value": "info"}]
    assert "s3cret" not in json.dumps(request)
    assert container["portMappings"][0]["containerPort"] == 3000
    assert container["portMappings"][0]["hostPort"] == 3000
    check = container["healthCheck"]
    assert check["command"][0] == "CMD-SHELL"
    assert "http://localhost:3000/readyz" in check["command"][1]
    assert check["startPeriod"] == 180
    options = container["logConfiguration"]["options"]
    assert container["logConfiguration"]["logDriver"] == "awslogs"
    assert (options["awslogs-group"], options["awslogs-region"]) == ("/ecs/mitoseg", REGION)


def test_task_definition_cpu_only_and_bridge_mode() -> None:
    request = cfg.build_task_definition(make_config(gpu_count=0, network_mode="bridge"), IMAGE_V1)
    (container,) = request["containerDefinitions"]
    assert "resourceRequirements" not in container
    assert "secrets" not in container
    assert container["portMappings"][0]["hostPort"] == 0
    assert "taskRoleArn" not in request


def test_health_check_command_runs_and_fails_on_closed_port() -> None:
    command = cfg.health_check_command(1, "/readyz")[1]
    probe = command.split('python -c "', 1)[1].rsplit('" || exit 1', 1)[0]
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=30)
    assert proc.returncode != 0
    assert b"URLError" in proc.stderr or b"Connection refused" in proc.stderr


# ------------------------------------------------------------ rollout (pure/fake)

NEW_TD = f"arn:aws:ecs:{REGION}:{ACCOUNT}:task-definition/mitoseg:2"
OLD_TD = f"arn:aws:ecs:{REGION}:{ACCOUNT}:task-definition/mitoseg:1"


def svc(*deployments: dict[str, Any], status: str = "ACTIVE") -> dict[str, Any]:
    return {"status": status, "desiredCount": 1, "deployments": list(deployments)}


def deployment(td: str, *, status: str = "PRIMARY", **kw: Any) -> dict[str, Any]:
    base = {"status": status, "taskDefinition": td, "desiredCount": 1, "runningCount": 1}
    base.update({"pendingCount": 0, "rolloutState": "COMPLETED"})
    base.update(kw)
    return base


@pytest.mark.parametrize(
    ("service", "state", "reason"),
    [
        (svc(deployment(NEW_TD)), "stable", "1/1 running, 0 pending, rollout COMPLETED"),
        (
            svc(deployment(NEW_TD, rolloutState="IN_PROGRESS", runningCount=0, pendingCount=1)),
            "pending",
            "rollout IN_PROGRESS: 0/1 running, 1 pending",
        ),
        (
            svc(deployment(NEW_TD), deployment(OLD_TD, status="ACTIVE")),
            "pending",
            "1 older deployment(s) still draining",
        ),
        (svc(deployment(OLD_TD)), "pending", f"PRIMARY deployment runs {OLD_TD}"),
        (svc(), "pending", "no PRIMARY deployment yet"),
        (
            svc(deployment(NEW_TD, rolloutState=None, runningCount=0)),
            "pending",
            "0/1 running, 0 pending",
        ),
        (
            svc(
                deployment(OLD_TD),
                deployment(
                    NEW_TD,
                    status="ACTIVE",
                    rolloutState="FAILED",
                    rolloutStateReason="ECS deployment circuit breaker: tasks failed to start.",
                ),
            ),
            "failed",
            "rollout FAILED: ECS deployment circuit breaker: tasks failed to start.",
        ),
        (svc(deployment(NEW_TD), status="DRAINING"), "failed", "service status is DRAINING"),
    ],
)
def test_rollout_status(service: dict[str, Any], state: str, reason: str) -> None:
    status = dep.rollout_status(service, NEW_TD)
    assert (status.state, status.reason) == (state, reason)


@dataclass
class FakeClock:
    now: float = 1000.0
    sleeps: list[float] = field(default_factory=list)

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class FakeEcs:
    """Answers describe_services from a scripted sequence (the last one repeats)."""

    def __init__(self, *responses: dict[str, Any]) -> None:
        self.responses = list(responses)
        self.calls = 0

    def describe_services(self, cluster: str, services: list[str]) -> dict[str, Any]:
        self.calls += 1
        item = self.responses.pop(0) if len(self.responses) > 1 else self.responses[0]
        return {"services": [item], "failures": []}


def test_wait_stable_polls_until_completed() -> None:
    pending = svc(deployment(NEW_TD, rolloutState="IN_PROGRESS", runningCount=0, pendingCount=1))
    ecs = FakeEcs(
        pending,
        svc(deployment(NEW_TD), deployment(OLD_TD, status="ACTIVE")),
        svc(deployment(NEW_TD)),
    )
    clock = FakeClock()
    final = _wait_stable(ecs, clock, timeout_s=300)
    assert final["deployments"][0]["taskDefinition"] == NEW_TD
    assert clock.sleeps == [15, 15]
    assert ecs.calls == 3


def _wait_stable(ecs: Any, clock: FakeClock, timeout_s: float = 40) -> dict[str, Any]:
    """``dep.wait_stable`` of service ``s`` in cluster ``c`` on ``NEW_TD``, polling every
    15 s of ``clock``."""
    return dep.wait_stable(
        ecs, "c", "s", NEW_TD, timeout_s=timeout_s, poll_interval_s=15, sleep=clock.sleep,
        clock=clock,
    )  # fmt: skip


def test_wait_stable_times_out_with_last_reason() -> None:
    pending = svc(deployment(NEW_TD, rolloutState="IN_PROGRESS", runningCount=0, pendingCount=1))
    clock = FakeClock()
    message = (
        f"service 's' not stable on {NEW_TD} after 40s: rollout IN_PROGRESS: 0/1 running, 1 pending"
    )
    with pytest.raises(RolloutTimeoutError, match=f"^{re.escape(message)}$"):
        _wait_stable(FakeEcs(pending), clock)
    assert clock.sleeps == [15, 15, 10]


def test_wait_stable_raises_when_ecs_reports_failure() -> None:
    failed = svc(deployment(NEW_TD, rolloutState="FAILED", rolloutStateReason="tasks failed"))
    clock = FakeClock()
    expected = f"deployment of {NEW_TD} to service 's' failed: rollout FAILED: tasks failed"
    with pytest.raises(RolloutFailedError, match=f"^{re.escape(expected)}$"):
        _wait_stable(FakeEcs(failed), clock)
    assert clock.sleeps == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"timeout_s": 0, "poll_interval_s": 1}, "timeout_s must be > 0, got 0"),
        ({"timeout_s": 1, "poll_interval_s": -2}, "poll_interval_s must be > 0, got -2"),
    ],
)
def test_wait_stable_validates_arguments(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        dep.wait_stable(FakeEcs(svc()), "c", "s", NEW_TD, **kwargs)


def test_describe_service_missing() -> None:
    class Missing:
        def describe_services(self, cluster: str, services: list[str]) -> dict[str, Any]:
            return {"services": [], "failures": [{"arn": "x", "reason": "MISSING"}]}

    with pytest.raises(LookupError, match=r"^service 's' not found in cluster 'c' \(MISSING\)$"):
        dep.describe_service(Missing(), "c", "s")


# ------------------------------------------------------------------- loopback HTTP


@dataclass
class EndpointState:
    ready_codes: list[int] = field(default_factory=lambda: [200])
    segment_code: int = 200
    segment_body: bytes = b"II*\x00mask"
    gets: int = 0
    auth: list[str | None] = field(default_factory=list)
    uploads: list[bytes] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    server: Any

    def log_message(self, *args: Any) -> None:
        return

    def _reply(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        state: EndpointState = self.server.state
        if self.path != "/readyz":
            self._reply(404, b"not found")
            return
        code = state.ready_codes[min(state.gets, len(state.ready_codes) - 1)]
        state.gets += 1
        self._reply(code, b"ok" if code == 200 else b"loading")

    def do_POST(self) -> None:
        state: EndpointState = self.server.state
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        state.auth.append(self.headers.get("Authorization"))
        state.uploads.append(body)
        if self.path != "/segment":
            self._reply(404, b"not found")
            return
        self._reply(
            state.segment_code, state.segment_body if state.segment_code == 200 else b"boom"
        )


@pytest.fixture
def endpoint() -> Iterator[tuple[str, EndpointState]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.state = EndpointState()  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.state  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_http_smoke_test_success_sends_tiff_and_token(endpoint: tuple[str, Any]) -> None:
    url, state = endpoint
    state.ready_codes = [503, 503, 200]
    clock = FakeClock()
    details = smoke.http_smoke_test(url + "/", token="s3cret", attempts=3, sleep=clock.sleep)
    assert details["url"] == url
    assert (details["readyz_status"], details["segment_status"]) == (200, 200)
    assert details["segment_bytes"] == len(b"II*\x00mask")
    assert clock.sleeps == [6.0, 6.0]
    assert state.auth == ["Bearer s3cret"]
    upload = state.uploads[0]
    assert b'name="image"; filename="smoke.tif"' in upload
    assert b"II*\x00" in upload


def test_tiny_test_image_is_a_64px_uint8_tiff() -> None:
    import io

    import numpy as np
    import tifffile

    image = tifffile.imread(io.BytesIO(smoke.tiny_test_image()))
    assert image.shape == (64, 64)
    assert image.dtype == np.uint8
    assert image.std() > 2.0


def test_http_smoke_test_not_ready(endpoint: tuple[str, Any]) -> None:
    url, state = endpoint
    state.ready_codes = [503]
    message = f"GET {url}/readyz not ready after 2 attempt(s): status 503"
    with pytest.raises(SmokeTestError, match=f"^{re.escape(message)}$"):
        smoke.http_smoke_test(url, attempts=2, sleep=FakeClock().sleep)
    assert state.gets == 2


def test_http_smoke_test_segment_error(endpoint: tuple[str, Any]) -> None:
    url, state = endpoint
    state.segment_code = 500
    with pytest.raises(
        SmokeTestError, match=f"^{re.escape(f'POST {url}/segment returned 500: boom')}$"
    ):
        smoke.http_smoke_test(url)


def test_http_smoke_test_empty_body(endpoint: tuple[str, Any]) -> None:
    url, state = endpoint
    state.segment_body = b""
    with pytest.raises(SmokeTestError, match=r"/segment returned an empty body$"):
        smoke.http_smoke_test(url)


def test_http_smoke_test_bad_url_and_connection_refused() -> None:
    with pytest.raises(SmokeTestError, match=r"^smoke URL 'ftp://x' must start with http"):
        smoke.http_smoke_test("ftp://x")
    with pytest.raises(ValueError, match=r"^attempts must be >= 1, got 0$"):
        smoke.http_smoke_test("http://127.0.0.1:1", attempts=0)
    with pytest.raises(SmokeTestError, match=r"not ready after 1 attempt\(s\): ConnectionError"):
        smoke.http_smoke_test("http://127.0.0.1:1", attempts=1, timeout_s=2)


# ------------------------------------------------------------------------- moto


@pytest.fixture(autouse=True)
def _root_logging() -> Iterator[None]:
    """The deploy commands configure the root logger as their own process would
    (``logging.basicConfig(force=True)``, level INFO, a handler on the runner's stderr):
    give the test process its logging back afterwards."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MOTO_ECS_SERVICE_RUNNING", raising=False)
    with mock_aws():
        yield


class SimulatedEcs:
    """Plays the ECS scheduler on moto's backend; ``sleep`` advances time and settles."""

    def __init__(self, broken: set[str] | None = None, circuit_breaker: bool = False) -> None:
        self.broken = broken or set()
        self.circuit_breaker = circuit_breaker
        self.clock = FakeClock()

    def sleep(self, seconds: float) -> None:
        self.clock.sleep(seconds)
        self.settle()

    def settle(self) -> None:
        backend = ecs_backends[ACCOUNT][REGION]
        for service in backend.services.values():
            task_def = backend.describe_task_definition(service.task_definition)
            image = task_def.container_definitions[0]["image"]
            current = service.deployments[0]
            current["taskDefinition"] = service.task_definition
            current["desiredCount"] = service.desired_count
            if image in self.broken:
                current.update(runningCount=0, pendingCount=service.desired_count)
                current["rolloutState"] = "FAILED" if self.circuit_breaker else "IN_PROGRESS"
                current["rolloutStateReason"] = "tasks failed to start (exit code 1)"
                service.running_count = 0
            else:
                current.update(runningCount=service.desired_count, pendingCount=0)
                current["rolloutState"] = "COMPLETED"
                service.running_count = service.desired_count
            service.pending_count = 0


@dataclass
class Stack:
    config: DeployConfig
    clients: AwsClients
    sim: SimulatedEcs
    previous: str

    def deploy(
        self,
        config: DeployConfig | None = None,
        *,
        clients: AwsClients | None = None,
        smoke_url: str = "https://x.example.org",
        smoke_test: Callable[[str], dict[str, Any]] = lambda url: {},
    ) -> Any:
        """``dep.deploy`` of ``IMAGE_V2`` on this stack, on the simulated clock."""
        return dep.deploy(
            config or self.config,
            IMAGE_V2,
            clients=clients or self.clients,
            smoke_url=smoke_url,
            smoke_test=smoke_test,
            sleep=self.sim.sleep,
            clock=self.sim.clock,
        )


def push_image(ecr: Any, tag: str) -> None:
    import hashlib

    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "size": 2,
            "digest": "sha256:" + hashlib.sha256(tag.encode()).hexdigest(),
        },
        "layers": [],
    }
    ecr.put_image(repositoryName="mitoseg", imageManifest=json.dumps(manifest), imageTag=tag)


@pytest.fixture
def stack(aws: None) -> Stack:
    config = make_config()
    clients = AwsClients(
        ecs=boto3.client("ecs", region_name=REGION),
        ecr=boto3.client("ecr", region_name=REGION),
        elbv2=boto3.client("elbv2", region_name=REGION),
        secretsmanager=boto3.client("secretsmanager", region_name=REGION),
    )
    dep.ensure_ecr_repository(clients.ecr, "mitoseg")
    push_image(clients.ecr, "v1")
    push_image(clients.ecr, "v2")
    clients.ecs.create_cluster(
        clusterName=config.cluster, capacityProviders=[], defaultCapacityProviderStrategy=[]
    )
    previous = dep.register_task_definition(clients.ecs, config, IMAGE_V1)
    clients.ecs.create_service(
        cluster=config.cluster,
        serviceName=config.service,
        taskDefinition=previous,
        desiredCount=1,
        capacityProviderStrategy=[{"capacityProvider": "gpu-g4dn", "weight": 1}],
    )
    sim = SimulatedEcs()
    sim.settle()
    return Stack(config, clients, sim, previous)


def service_task_definition(stack: Stack) -> str:
    return dep.describe_service(stack.clients.ecs, stack.config.cluster, stack.config.service)[
        "taskDefinition"
    ]


def td_status(stack: Stack, arn: str) -> str:
    return stack.clients.ecs.describe_task_definition(taskDefinition=arn)["taskDefinition"][
        "status"
    ]


def test_ensure_ecr_repository_is_idempotent(aws: None) -> None:
    ecr = boto3.client("ecr", region_name=REGION)
    first = dep.ensure_ecr_repository(ecr, "mitoseg")
    second = dep.ensure_ecr_repository(ecr, "mitoseg")
    assert first["created"] is True
    assert second["created"] is False
    assert first["uri"] == second["uri"] == REPO_URI
    (repo,) = ecr.describe_repositories()["repositories"]
    assert repo["imageTagMutability"] == "IMMUTABLE"
    assert repo["imageScanningConfiguration"] == {"scanOnPush": True}
    with pytest.raises(DeployConfigError, match=r"^ecr_repository 'Bad' is invalid"):
        dep.ensure_ecr_repository(ecr, "Bad")


def test_ensure_ecr_repository_survives_concurrent_creation(aws: None) -> None:
    real = boto3.client("ecr", region_name=REGION)

    class Racing:
        """describe says missing once; meanwhile another deploy creates it."""

        def __init__(self) -> None:
            self.describes = 0

        def describe_repositories(self, **kw: Any) -> Any:
            self.describes += 1
            if self.describes == 1:
                real.create_repository(repositoryName="mitoseg")
                return real.describe_repositories(repositoryNames=["missing-repo"])
            return real.describe_repositories(**kw)

        def create_repository(self, **kw: Any) -> Any:
            return real.create_repository(**kw)

    racing = Racing()
    assert dep.ensure_ecr_repository(racing, "mitoseg") == {
        "name": "mitoseg",
        "uri": REPO_URI,
        "arn": f"arn:aws:ecr:{REGION}:{ACCOUNT}:repository/mitoseg",
        "created": False,
    }
    assert racing.describes == 2


def test_ecr_login_info_decodes_token(aws: None) -> None:
    login = dep.ecr_login_info(boto3.client("ecr", region_name=REGION))
    assert login.username == "AWS"
    assert login.password
    assert login.registry == f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com"
    assert login.password not in repr(login)


def test_ecr_login_info_rejects_malformed_token() -> None:
    class Bad:
        def get_authorization_token(self) -> dict[str, Any]:
            return {
                "authorizationData": [{"authorizationToken": "bm9jb2xvbg==", "proxyEndpoint": "x"}]
            }

    with pytest.raises(RuntimeError, match=r"^ECR authorization token is not of the form"):
        dep.ecr_login_info(Bad())


def test_verify_image(stack: Stack) -> None:
    found = dep.verify_image(stack.clients.ecr, IMAGE_V2)
    assert found is not None and found["repository"] == "mitoseg"
    assert dep.verify_image(stack.clients.ecr, "ghcr.io/org/mitoseg:v2") is None
    with pytest.raises(LookupError, match=f"^image {re.escape(REPO_URI)}:v9 not found in ECR"):
        dep.verify_image(stack.clients.ecr, f"{REPO_URI}:v9")
    with pytest.raises(LookupError, match=r"^ECR repository 'nope' does not exist$"):
        dep.verify_image(stack.clients.ecr, f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/nope:v1")


def test_deploy_rolls_out_gpu_task_definition(stack: Stack) -> None:
    seen: list[str] = []

    def smoke(url: str) -> dict[str, Any]:
        seen.append(url)
        return {"ok": True}

    result = stack.deploy(smoke_url="https://api.example.org", smoke_test=smoke)
    assert seen == ["https://api.example.org"]
    assert result.previous_task_definition == stack.previous
    assert result.task_definition.endswith("task-definition/mitoseg:2")
    assert result.smoke == {"ok": True}
    assert result.to_dict()["image"] == IMAGE_V2
    assert service_task_definition(stack) == result.task_definition
    td = stack.clients.ecs.describe_task_definition(taskDefinition=result.task_definition)
    (container,) = td["taskDefinition"]["containerDefinitions"]
    assert container["image"] == IMAGE_V2
    assert container["resourceRequirements"] == [{"type": "GPU", "value": "1"}]
    described = dep.describe_service(stack.clients.ecs, stack.config.cluster, stack.config.service)
    assert described["deploymentConfiguration"]["deploymentCircuitBreaker"] == {
        "enable": True,
        "rollback": True,
    }
    assert td_status(stack, stack.previous) == "ACTIVE"
    assert stack.sim.clock.sleeps == [15.0]


def test_failing_smoke_test_rolls_back(stack: Stack) -> None:
    def smoke(url: str) -> dict[str, Any]:
        raise SmokeTestError("POST https://api.example.org/segment returned 500: boom")

    with pytest.raises(DeployError) as info:
        stack.deploy(smoke_url="https://api.example.org", smoke_test=smoke)
    err = info.value
    new_td = stack.previous.rsplit(":", 1)[0] + ":2"
    assert str(err) == (
        f"deploy of {IMAGE_V2} failed at step 'smoke_test': SmokeTestError: POST "
        "https://api.example.org/segment returned 500: boom. "
        f"Rolled service 'mitoseg-api' back to {stack.previous}."
    )
    assert (err.step, err.rolled_back, err.task_definition) == ("smoke_test", True, new_td)
    assert service_task_definition(stack) == stack.previous
    assert td_status(stack, new_td) == "INACTIVE"


def test_stability_timeout_rolls_back(stack: Stack) -> None:
    stack.sim.broken = {IMAGE_V2}
    config = replace(stack.config, stable_timeout_s=60.0)
    with pytest.raises(DeployError) as info:
        stack.deploy(config, smoke_url="https://api.example.org")
    err = info.value
    assert err.step == "wait_stable"
    assert err.rolled_back is True
    assert "failed at step 'wait_stable': RolloutTimeoutError: service 'mitoseg-api' not " in str(
        err
    )
    assert "after 60s: rollout IN_PROGRESS: 0/1 running, 1 pending." in str(err)
    assert service_task_definition(stack) == stack.previous
    assert stack.sim.clock.sleeps == [15.0, 15.0, 15.0, 15.0, 15.0]  # 4 waiting + 1 rollback


def test_circuit_breaker_failure_rolls_back(stack: Stack) -> None:
    stack.sim.broken = {IMAGE_V2}
    stack.sim.circuit_breaker = True
    with pytest.raises(DeployError, match=r"rollout FAILED: tasks failed to start \(exit code 1\)"):
        stack.deploy()
    assert service_task_definition(stack) == stack.previous


def test_failed_rollback_is_reported(stack: Stack) -> None:
    stack.sim.broken = {IMAGE_V1, IMAGE_V2}
    config = replace(stack.config, stable_timeout_s=30.0, rollback_timeout_s=30.0)
    with pytest.raises(DeployError) as info:
        stack.deploy(config)
    err = info.value
    assert err.rolled_back is False
    assert err.step == "wait_stable"
    assert f"Rollback to {stack.previous} ALSO FAILED: RolloutTimeoutError" in str(err)
    assert str(err).endswith("Fix service 'mitoseg-api' by hand.")


def test_update_service_error_rolls_back(stack: Stack) -> None:
    real = stack.clients.ecs

    class FlakyEcs:
        def __init__(self) -> None:
            self.updates = 0

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def update_service(self, **kw: Any) -> Any:
            self.updates += 1
            if self.updates == 1:
                raise RuntimeError("throttled")
            return real.update_service(**kw)

    flaky = FlakyEcs()
    with pytest.raises(
        DeployError, match=r"failed at step 'update_service': RuntimeError: throttled"
    ):
        stack.deploy(clients=replace(stack.clients, ecs=flaky))
    assert flaky.updates == 2
    assert service_task_definition(stack) == stack.previous


@pytest.mark.parametrize(
    ("config_overrides", "image", "kwargs", "step", "message"),
    [
        (
            {"service": "missing"},
            IMAGE_V2,
            {"smoke_url": "https://x.example.org"},
            "describe_service",
            "LookupError: service 'missing' not found in cluster 'mitoseg-gpu' (MISSING).",
        ),
        (
            {},
            f"{REPO_URI}:v9",
            {"smoke_url": "https://x.example.org"},
            "verify_image",
            f"LookupError: image {REPO_URI}:v9 not found in ECR repository 'mitoseg': push it "
            "first.",
        ),
        (
            {},
            IMAGE_V2,
            {},
            "resolve_endpoint",
            "LookupError: service 'mitoseg-api' has no load balancer target group: pass the "
            "smoke URL.",
        ),
        (
            {
                "api_token_secret_arn": (
                    f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:missing-AbCdEf"
                )
            },
            IMAGE_V2,
            {"smoke_url": "https://x.example.org"},
            "read_api_token",
            "ResourceNotFoundException",
        ),
    ],
)
def test_preflight_failures_leave_service_unchanged(
    stack: Stack,
    config_overrides: dict[str, Any],
    image: str,
    kwargs: dict[str, Any],
    step: str,
    message: str,
) -> None:
    config = replace(stack.config, **config_overrides)
    with pytest.raises(DeployError) as info:
        dep.deploy(config, image, clients=stack.clients, sleep=stack.sim.sleep, **kwargs)
    err = info.value
    assert err.step == step
    assert str(err).startswith(f"deploy of {image} failed at step '{step}': ")
    assert message in str(err)
    assert str(err).endswith("The service was not changed.")
    assert (err.rolled_back, err.task_definition) == (False, None)
    assert service_task_definition(stack) == stack.previous
    families = stack.clients.ecs.list_task_definitions(familyPrefix="mitoseg")
    assert families["taskDefinitionArns"] == [stack.previous]


def test_deploy_rejects_untagged_image(stack: Stack) -> None:
    with pytest.raises(DeployConfigError, match=r"needs an explicit tag or digest"):
        dep.deploy(stack.config, f"{REPO_URI}:latest", clients=stack.clients)


def test_default_smoke_test_uses_secret_token_and_load_balancer(
    stack: Stack, endpoint: tuple[str, Any]
) -> None:
    url, state = endpoint
    sm = stack.clients.secretsmanager
    arn = sm.create_secret(Name="mitoseg/api-token", SecretString="tok-123")["ARN"]
    config = replace(stack.config, api_token_secret_arn=arn)
    result = dep.deploy(
        config,
        IMAGE_V2,
        clients=stack.clients,
        smoke_url=url,
        sleep=stack.sim.sleep,
        clock=stack.sim.clock,
    )
    assert state.auth == ["Bearer tok-123"]
    assert result.smoke["segment_status"] == 200
    assert result.endpoint == url
    (container,) = stack.clients.ecs.describe_task_definition(
        taskDefinition=result.task_definition
    )["taskDefinition"]["containerDefinitions"]
    assert container["secrets"] == [{"name": "MITOSEG_API_TOKEN", "valueFrom": arn}]
    assert all("tok-123" not in json.dumps(e) for e in container["environment"])


def test_read_secret_rejects_binary_secret(aws: None) -> None:
    sm = boto3.client("secretsmanager", region_name=REGION)
    arn = sm.create_secret(Name="bin", SecretBinary=b"\x00\x01")["ARN"]
    with pytest.raises(ValueError, match=f"^secret {re.escape(arn)} has no SecretString value$"):
        dep.read_secret(sm, arn)


def test_service_endpoint_url_from_load_balancer(stack: Stack) -> None:
    ec2 = boto3.client("ec2", region_name=REGION)
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnets = [
        ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.0.{i}.0/24", AvailabilityZone=f"{REGION}{z}")[
            "Subnet"
        ]["SubnetId"]
        for i, z in ((1, "a"), (2, "b"))
    ]
    elbv2 = stack.clients.elbv2
    lb = elbv2.create_load_balancer(Name="mitoseg", Subnets=subnets)["LoadBalancers"][0]
    tg = elbv2.create_target_group(
        Name="mitoseg", Protocol="HTTP", Port=3000, VpcId=vpc, TargetType="ip"
    )["TargetGroups"][0]
    elbv2.create_listener(
        LoadBalancerArn=lb["LoadBalancerArn"],
        Protocol="HTTP",
        Port=8080,
        DefaultActions=[{"Type": "forward", "TargetGroupArn": tg["TargetGroupArn"]}],
    )
    stack.clients.ecs.create_service(
        cluster=stack.config.cluster,
        serviceName="with-lb",
        taskDefinition=stack.previous,
        desiredCount=1,
        loadBalancers=[
            {
                "targetGroupArn": tg["TargetGroupArn"],
                "containerName": "mitoseg",
                "containerPort": 3000,
            }
        ],
    )
    url = dep.service_endpoint_url(stack.clients.ecs, elbv2, stack.config.cluster, "with-lb")
    assert url == f"http://{lb['DNSName']}:8080"
    with pytest.raises(LookupError, match=r"^service 'mitoseg-api' has no load balancer"):
        dep.service_endpoint_url(stack.clients.ecs, elbv2, stack.config.cluster, "mitoseg-api")


# -------------------------------------------------------------------------- CLI


def cli_args(*extra: str) -> list[str]:
    return [
        "aws",
        "--image",
        IMAGE_V2,
        "--region",
        REGION,
        "--cluster",
        "mitoseg-gpu",
        "--service",
        "mitoseg-api",
        "--repository",
        "mitoseg",
        "--execution-role-arn",
        ROLE,
        *extra,
    ]


def test_cli_rejects_bad_config_with_exit_2() -> None:
    runner = CliRunner()
    result = runner.invoke(deploy_app, [*cli_args(), "--gpus", "-1"])
    assert result.exit_code == 2
    assert "error: gpu_count must be >= 0, got -1" in result.stderr
    result = runner.invoke(deploy_app, [*cli_args(), "--env", "NOEQUALS"])
    assert result.exit_code == 2
    assert "error: --env expects KEY=VALUE, got 'NOEQUALS'" in result.stderr


def test_cli_ecr_repo_prints_uri(aws: None) -> None:
    runner = CliRunner()
    first = runner.invoke(deploy_app, ["ecr-repo", "--repository", "mitoseg"])
    second = runner.invoke(deploy_app, ["ecr-repo", "--repository", "mitoseg"])
    assert (first.exit_code, second.exit_code) == (0, 0)
    assert first.stdout.strip() == second.stdout.strip() == REPO_URI
    bad = runner.invoke(deploy_app, ["ecr-repo", "--repository", "mitoseg", "--region", "x"])
    assert bad.exit_code == 2
    assert "error: region 'x' is not an AWS region name like 'us-east-1'" in bad.stderr


def test_cli_deploy_end_to_end_writes_result(
    stack: Stack, endpoint: tuple[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, _ = endpoint
    monkeypatch.setattr(dep.time, "sleep", stack.sim.sleep)
    out = tmp_path / "deploy.json"
    result = CliRunner().invoke(
        deploy_app,
        cli_args("--smoke-url", url, "--poll-interval", "0.01", "--result", str(out)),
    )
    assert result.exit_code == 0, result.stderr
    payload = json.loads(out.read_text())
    assert payload["ok"] is True
    assert payload["image"] == IMAGE_V2
    assert payload["previous_task_definition"] == stack.previous
    assert service_task_definition(stack) == payload["task_definition"]
    assert json.loads(result.stdout)["task_definition"] == payload["task_definition"]


def test_cli_deploy_failure_writes_result_and_exits_1(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dep.time, "sleep", stack.sim.sleep)
    out = tmp_path / "deploy.json"
    result = CliRunner().invoke(
        deploy_app,
        cli_args(
            "--smoke-url", "http://127.0.0.1:1", "--poll-interval", "0.01", "--result", str(out)
        ),
    )
    assert result.exit_code == 1
    payload = json.loads(out.read_text())
    assert (payload["ok"], payload["step"], payload["rolled_back"]) == (False, "smoke_test", True)
    assert "error: deploy of" in result.stderr
    assert service_task_definition(stack) == stack.previous


def test_python_m_mitoseg_deploy_help() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mitoseg.deploy", "aws", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "python -m mitoseg.deploy aws" in proc.stdout
    assert "--smoke-url" in proc.stdout
