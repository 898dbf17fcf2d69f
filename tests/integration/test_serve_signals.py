"""``mitoseg serve`` stops every process it started when a supervisor sends SIGTERM.

systemd, Docker and ECS stop a service with SIGTERM to its main process. The real
``mitoseg serve`` runs on loopback with a client stalled in the middle of a request (a
worker cannot finish it gracefully) and clients whose requests queue for the model (a
runner that drained its queue before exiting outlived the stop deadline and was
killed); after SIGTERM, every process it started must be gone (descendants found in
``/proc`` while it ran, and anything in its session or process group) before the
supervisor's kill deadline, by itself, and the port must be closed; the queued requests
get an answer (200 or a JSON 503), not a hang.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

pytestmark = pytest.mark.integration

MITOSEG = str(Path(sys.executable).with_name("mitoseg"))
#: Every process gone within this, before ``mitoseg serve`` kills what is left (8 s).
STOP_WITHIN_S = 7.0
#: Concurrent clients with a large slice each (thousands of 64-pixel tiles in the queue).
CLIENTS = 6


def _proc_stat(pid: int) -> tuple[str, int, int, int, int] | None:
    """``(state, ppid, pgrp, session, starttime)`` of a live process from /proc."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[2]), int(fields[3]), int(fields[19])


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _descendants(root: int) -> dict[int, int]:
    """``{pid: starttime}`` of every live descendant of ``root`` (``root`` included)."""
    stats = {pid: s for pid in _all_pids() if (s := _proc_stat(pid)) is not None}
    found = {root: stats[root][4]}
    grew = True
    while grew:
        grew = False
        for pid, (_, ppid, _, _, start) in stats.items():
            if ppid in found and pid not in found:
                found[pid] = start
                grew = True
    return found


def _remaining(tracked: dict[int, int], leader: int) -> list[int]:
    """Tracked processes still running (same start time, not a zombie), and any process
    in the leader's session or process group."""
    left = []
    for pid in _all_pids():
        stat = _proc_stat(pid)
        if stat is None or stat[0] == "Z":
            continue
        _, _, pgrp, session, start = stat
        if tracked.get(pid) == start or leader in (pgrp, session):
            left.append(pid)
    return left


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _queue_requests(port: int) -> list[concurrent.futures.Future[int | str]]:
    """Send :data:`CLIENTS` requests of a 2048 x 2048 slice at once; wait until the
    runner works on them. Each future gives the status code (or the exception name)."""
    import numpy as np
    import tifffile

    img = np.random.default_rng(0).integers(0, 255, (2048, 2048), dtype=np.uint8)
    buf = io.BytesIO()
    tifffile.imwrite(buf, img)
    data = buf.getvalue()

    def post() -> int | str:
        try:
            url = f"http://127.0.0.1:{port}/segment"
            return requests.post(url, files={"image": ("a.tif", data)}, timeout=60).status_code
        except requests.RequestException as exc:
            return type(exc).__name__

    pool = concurrent.futures.ThreadPoolExecutor(CLIENTS)
    futures = [pool.submit(post) for _ in range(CLIENTS)]
    pool.shutdown(wait=False)
    time.sleep(3.0)  # decoded, priced and queued in the runner
    assert not any(f.done() for f in futures), [f.result() for f in futures if f.done()]
    return futures


@pytest.fixture()
def model_dir(tmp_path: Path) -> Path:
    import keras

    from mitoseg.config import ModelConfig
    from mitoseg.inference.plan import PLAN_FILE, InferencePlan
    from mitoseg.model.unet import build_unet

    keras.utils.set_random_seed(1)
    model = build_unet(
        ModelConfig(depth=2, base_filters=4, batch_norm=False, dropout=0.0), n_classes=2
    )
    model.save(tmp_path / "tiny.keras")
    InferencePlan.default_for(1, 4, tile_size=64, halo=8).write(tmp_path / PLAN_FILE)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"serve": {"max_batch_size": 8}}))
    return tmp_path


def test_sigterm_stops_every_process_and_closes_the_port(model_dir: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    env = {
        **os.environ,
        "BENTOML_HOME": str(model_dir / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "True",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    env.pop("MITOSEG_API_TOKEN", None)
    env.pop("MALLOC_ARENA_MAX", None)  # mitoseg serve's default
    log = model_dir / "server.log"
    cmd = [MITOSEG, "serve", "--model", str(model_dir / "tiny.keras"), "--port", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*cmd, "--params", str(model_dir / "params.yaml")],
            cwd=model_dir,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own session and process group, as under systemd
        )
    tracked: dict[int, int] = {}
    stalled = None
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, log.read_text()[-4000:]
            try:
                if requests.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.5)
        tracked = _descendants(proc.pid)
        # mitoseg serve, the bentoml arbiter and the two service workers (in sessions of
        # their own, so a signal to the process group would not reach them)
        assert len(tracked) >= 4, tracked
        for pid in tracked:  # fewer malloc arenas in every server process (memory)
            assert b"MALLOC_ARENA_MAX=2\0" in Path(f"/proc/{pid}/environ").read_bytes()
        busy = _queue_requests(port)
        stalled = socket.create_connection(("127.0.0.1", port))
        stalled.sendall(
            b"POST /segment HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n"
        )
        time.sleep(0.5)

        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        while time.monotonic() - start < STOP_WITHIN_S:
            left = _remaining(tracked, proc.pid)
            if not left and not _port_open(port):
                break
            time.sleep(0.2)
        elapsed = time.monotonic() - start
        assert not _remaining(tracked, proc.pid), (elapsed, log.read_text()[-3000:])
        assert not _port_open(port)
        assert elapsed < STOP_WITHIN_S
        assert proc.wait(timeout=5) == 0
        assert "still running" not in log.read_text()  # nothing had to be killed
        answers = [f.result(timeout=10) for f in busy]
        assert all(a in (200, 503) for a in answers), answers
        assert 503 in answers, answers  # queued requests were refused, not waited for
    finally:
        if stalled is not None:
            stalled.close()
        for pid in _remaining(tracked, proc.pid):  # never leave a server behind
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
