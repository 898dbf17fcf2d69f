"""Shared pytest fixtures.

Loopback servers live in ``tests/servers.py`` (importable as ``servers`` because
``tests/`` has no ``__init__.py`` and pytest puts it on ``sys.path``):

- ``s3_server``: session-wide SeaweedFS S3 (``endpoint_url``, ``access_key``,
  ``secret_key``, ``make_bucket(name)``, ``client()``, ``env()``);
- ``s3_env``: the same with its ``AWS_*`` variables set in ``os.environ`` for one test;
- ``http_server``: factory ``http_server(directory)`` for a Range-capable HTTP server;
- ``mitoseg_server``: session-wide ``mitoseg serve`` of a tiny UNet (API, web page and
  volume job tests);
- ``vnc_unet``: session-wide depth-2 UNet trained for seconds on the bundled VNC slices,
  its plan beside it (bioimage.io export and monitoring tests).

``tests/tracking_state.py``: ``empty_mlflow_db``, an empty embedded MLflow store made once
per session (``seed_store`` copies it where a test's store goes, instead of seconds of
migrations per store).

``--reverse`` runs the collected tests in reverse order (``make test-reverse``), so a
test that passes only after another one set some state up shows itself.
"""

from __future__ import annotations

import pytest

from servers import http_server, mitoseg_server, s3_env, s3_server, vnc_unet
from tracking_state import empty_mlflow_db

__all__ = [
    "empty_mlflow_db",
    "http_server",
    "mitoseg_server",
    "s3_env",
    "s3_server",
    "vnc_unet",
]


#: Session fixtures that start something expensive (a server, a training run): every test
#: that uses one runs on the same pytest-xdist worker, so it starts once per session.
SHARED_FIXTURES = ("mitoseg_server", "vnc_unet")


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register ``--reverse``."""
    parser.addoption(
        "--reverse",
        action="store_true",
        default=False,
        help="run the collected tests in reverse order (find order dependence)",
    )


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Group tests for ``pytest -n N --dist loadgroup`` (``make test``): by the shared
    session fixture they use, else by module, so module- and session-scoped fixtures are
    set up once, as in a serial run (without ``-n`` the marks change nothing). Then
    reverse the collected items when ``--reverse`` is given (after any other reorder)."""
    for item in items:
        shared = [name for name in SHARED_FIXTURES if name in item.fixturenames]
        group = shared[0] if shared else item.nodeid.split("::", 1)[0]
        item.add_marker(pytest.mark.xdist_group(group))
    if config.getoption("--reverse"):
        items.reverse()
