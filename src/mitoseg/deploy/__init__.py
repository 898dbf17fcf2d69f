"""Delivery: push the Bento image to ECR and roll it out to ECS on EC2 GPU capacity.

See ``mitoseg.deploy.aws`` (every AWS call), ``mitoseg.deploy.config`` (the validated
configuration, image references and errors), ``mitoseg.deploy.smoke`` (the HTTP smoke
test) and docs/DEPLOY.md. Importing this package does not import
boto3 (clients are created lazily by ``make_clients``).
"""

from __future__ import annotations

from mitoseg.deploy.aws import (
    AwsClients,
    DeployResult,
    EcrLogin,
    deploy,
    ecr_login_info,
    ensure_ecr_repository,
    make_clients,
    register_task_definition,
    rollback,
    wait_stable,
)
from mitoseg.deploy.config import (
    DeployConfig,
    DeployConfigError,
    DeployError,
    RolloutError,
    RolloutFailedError,
    RolloutTimeoutError,
    SmokeTestError,
    image_uri,
)
from mitoseg.deploy.smoke import http_smoke_test

__all__ = [
    "AwsClients",
    "DeployConfig",
    "DeployConfigError",
    "DeployError",
    "DeployResult",
    "EcrLogin",
    "RolloutError",
    "RolloutFailedError",
    "RolloutTimeoutError",
    "SmokeTestError",
    "deploy",
    "ecr_login_info",
    "ensure_ecr_repository",
    "http_smoke_test",
    "image_uri",
    "make_clients",
    "register_task_definition",
    "rollback",
    "wait_stable",
]
