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


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Group tests for ``pytest -n N --dist loadgroup`` (``make test``): by the shared
    session fixture they use, else by module, so module- and session-scoped fixtures are
    set up once, as in a serial run (without ``-n`` the marks change nothing).

    ``tryfirst``: pytest-xdist's worker appends each item's ``xdist_group`` to its node id
    in its own (plain) implementation of this hook, which must see the marks; added after
    it, they changed nothing and every test was scheduled on its own.
    """
    for item in items:
        shared = [name for name in SHARED_FIXTURES if name in item.fixturenames]
        group = shared[0] if shared else item.nodeid.split("::", 1)[0]
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.hookimpl(trylast=True, specname="pytest_collection_modifyitems")
def pytest_collection_modifyitems_last(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Reverse the collected items when ``--reverse`` is given (after any other reorder)."""
    if config.getoption("--reverse"):
        items.reverse()


def pytest_configure(config: pytest.Config) -> None:
    """Refuse ``--dist loadgroup`` where it would silently not group: pytest-xdist 3.8
    writes each group into the legacy ``Item._nodeid``, which pytest 9.2 no longer reads
    (pytest-xdist issue #1386). The suite would still pass, building every module fixture
    and server on every worker, minutes slower."""
    if config.getoption("dist", default="no") != "loadgroup" or hasattr(config, "workerinput"):
        return
    import xdist
    from packaging.version import Version

    if Version(pytest.__version__) >= Version("9.2") and Version(xdist.__version__) <= Version(
        "3.8.0"
    ):
        raise pytest.UsageError(
            f"--dist loadgroup does not group tests with pytest {pytest.__version__} and "
            f"pytest-xdist {xdist.__version__} (pytest-xdist issue #1386): pin pytest<9.2 "
            "(pyproject.toml, requirements.lock)"
        )
