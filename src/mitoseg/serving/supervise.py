"""The supervisor of ``mitoseg serve``: run ``bentoml serve``, forward stop signals, leave
no process behind.

``mitoseg serve`` imports the model (TensorFlow, about 750 MB) and then replaces itself
by ``python -m mitoseg.serving.supervise -- CMD...`` (``exec``: same process id, what the
supervisor of the service signals), so the process that lives as long as the server
holds only this module (about 50 MB).
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["STOP_DEADLINE_S", "STOP_SIGNALS", "main", "supervise"]

#: Seconds after a stop signal when whatever ``mitoseg serve`` started is killed.
STOP_DEADLINE_S = 8.0
#: Signals forwarded to ``bentoml serve`` (each starts the stop deadline).
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP")


def supervise(cmd: list[str], env: dict[str, str], *, deadline_s: float = STOP_DEADLINE_S) -> int:
    """Run ``cmd`` until it exits; forward stop signals; leave no process behind.

    BentoML's arbiter starts its workers in sessions of their own, so a signal to this
    process group does not reach them, and a worker busy with a request can hold the
    arbiter up. Here every descendant of the child is tracked while it runs (on Linux
    this process is also made a child subreaper, so orphaned workers stay its
    descendants); SIGTERM, SIGINT or SIGHUP is forwarded to the child, and
    ``deadline_s`` seconds later whatever is still running is killed. Descendants left
    after the child exits are stopped too.

    Returns:
        The child's exit status (``128 + signal`` when a signal ended it).
    """
    import signal
    import subprocess
    import time

    import psutil

    received: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        received.append(signum)

    stop_signals = [getattr(signal, name) for name in STOP_SIGNALS if hasattr(signal, name)]
    previous = {sig: signal.signal(sig, on_signal) for sig in stop_signals}
    tracked: dict[int, psutil.Process] = {}
    me = psutil.Process()
    _become_subreaper()

    def track(root: psutil.Process) -> None:
        for parent in (root, me):
            try:
                for proc in parent.children(recursive=True):
                    tracked.setdefault(proc.pid, proc)
            except psutil.Error:
                pass

    try:
        child = subprocess.Popen(cmd, env=env)
        root = psutil.Process(child.pid)
        tracked[child.pid] = root
        forwarded = 0
        kill_at: float | None = None
        killed = False
        next_scan = 0.0
        while True:
            now = time.monotonic()
            if forwarded < len(received) or now >= next_scan:
                track(root)
                next_scan = now + 0.5
            while forwarded < len(received):
                signum = received[forwarded]
                forwarded += 1
                if child.poll() is None:
                    child.send_signal(signum)
                kill_at = kill_at or time.monotonic() + deadline_s
            try:
                rc = child.wait(timeout=0.1)
                break
            except subprocess.TimeoutExpired:
                pass
            if kill_at is not None and time.monotonic() >= kill_at:
                if not killed:
                    running = [p for p in tracked.values() if _running(p)]
                    _report_kill(running, f"{deadline_s:g} s after the stop signal")
                    killed = True
                _kill(tracked.values(), signal.SIGKILL)
        track(root)  # orphans adopted by this (subreaper) process
        left = [p for pid, p in tracked.items() if pid != child.pid and _running(p)]
        if left:
            grace = 2.0 if kill_at is None else max(0.0, kill_at - time.monotonic())
            _kill(left, signal.SIGTERM)
            _, alive = psutil.wait_procs(left, timeout=grace)
            if alive and not killed:
                why = (
                    f"{deadline_s:g} s after the stop signal"
                    if kill_at
                    else "after bentoml serve exited"
                )
                _report_kill(alive, why)
            _kill(alive, signal.SIGKILL)
            psutil.wait_procs(alive, timeout=2.0)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - rc if rc < 0 else rc


def _report_kill(procs: list[Any], why: str) -> None:
    """One stderr line naming the processes killed and why."""
    names = []
    for proc in procs:
        try:
            names.append(f"{proc.pid} ({' '.join(proc.cmdline()[1:4])[:60]})")
        except Exception:
            names.append(str(proc.pid))
    print(
        f"mitoseg serve: {len(procs)} process(es) still running {why}, killed: {', '.join(names)}",
        file=sys.stderr,
        flush=True,
    )


def _become_subreaper() -> None:
    """Linux: adopt orphaned descendants (``PR_SET_CHILD_SUBREAPER``); a no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def _running(proc: Any) -> bool:
    try:
        return bool(proc.is_running()) and proc.status() != "zombie"
    except Exception:
        return False


def _kill(procs: Any, sig: int) -> None:
    for proc in procs:
        try:
            if _running(proc):
                proc.send_signal(sig)
        except Exception:
            pass


def main(argv: list[str] | None = None) -> int:
    """``python -m mitoseg.serving.supervise [--] CMD [ARG...]``: :func:`supervise` CMD with
    this process's environment; returns its exit status."""
    import os

    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print("usage: python -m mitoseg.serving.supervise [--] CMD [ARG...]", file=sys.stderr)
        return 2
    return supervise(args, dict(os.environ))


if __name__ == "__main__":
    sys.exit(main())
