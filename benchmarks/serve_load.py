"""Bounded HTTP load test of ``mitoseg serve`` on loopback, with its memory.

Starts ``mitoseg serve`` for a model (the way users start it: the supervisor, BentoML's
arbiter, the entry service and the model runner), then for each concurrency level
(default 1, 4, 16 clients) sends ``/segment`` requests with one real EM slice (default:
a 1024x1024 CDeep3M slice from ``../shared/data``, else the bundled VNC sample tiled to
size) until ``--requests`` responses or ``--max-seconds`` have passed, whichever comes
first. It reports p50/p99 latency and throughput per level and, sampled every 0.2 s over
the whole server process tree, the summed RSS and PSS (``/proc/<pid>/smaps_rollup``:
shared pages counted once, split between the processes sharing them) at idle and the
peak of each level, per process role too. After the levels the server gets SIGTERM and
the time until its last process is gone is recorded (``stop_s``). Also: the in-process
latency of the same ``segment_stack`` call on the same slice.

``--variant NAME=DIR`` (repeatable) serves the ``src/`` and ``params.yaml`` of another
checkout too (e.g. a ``git clone`` at another commit; ``--variant-env NAME:KEY=VALUE``
sets a server environment variable of one variant, e.g. ``MALLOC_ARENA_MAX``); variants
run interleaved, ``--rounds`` times each (a, b, a, b, ...: a machine whose speed drifts
hits them alike), each a fresh server, and ``comparison`` holds the ratios of each
variant to the first within this one run. Writes ``benchmarks/results/<name>.json``.

Examples::

    python benchmarks/serve_load.py                           # champion, full run
    python benchmarks/serve_load.py --tiny --requests 2       # smoke test, tiny model
    python benchmarks/serve_load.py --model artifacts/train/model.keras \
        --variant before=/tmp/base --rounds 2                 # before/after, one run
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import requests
import tifffile

from common import ROOT, SHARED, machine, save

VNC = ROOT / "src" / "mitoseg" / "sample_data" / "vnc" / "test" / "images.tif"
CDEEP3M = SHARED / "cdeep3m" / "cdeep3m_test_raw.tif"


def load_slice(size: int) -> tuple[np.ndarray, str]:
    """A real ``(size, size)`` uint8 EM slice and where it came from."""
    if CDEEP3M.is_file():
        img = tifffile.imread(CDEEP3M, key=0)
        if img.shape[0] >= size and img.shape[1] >= size:
            return img[:size, :size], f"{CDEEP3M.name} page 0"
    img = tifffile.imread(VNC)[0]
    reps = (-(-size // img.shape[0]), -(-size // img.shape[1]))
    return np.tile(img, reps)[:size, :size], f"{VNC.name} page 0 tiled"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tiny_model(path: Path) -> Path:
    """Save a tiny untrained UNet (for smoke runs)."""
    import keras

    from mitoseg.config import ModelConfig
    from mitoseg.model.unet import build_unet

    keras.utils.set_random_seed(0)
    build_unet(ModelConfig(depth=2, base_filters=4, batch_norm=False, dropout=0.0), 2).save(path)
    return path


def _pss(pid: int) -> int:
    """Proportional set size of a process in bytes (0 when it cannot be read)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def process_role(cmdline: list[str]) -> str:
    """What a process of the ``mitoseg serve`` tree is, from its command line."""
    text = " ".join(cmdline)
    if "_bentoml_impl.worker.service" in text:
        return "runner worker" if "mitoseg-unet-runner" in text else "entry worker"
    old_cli = len(cmdline) > 2 and Path(cmdline[1]).name == "mitoseg" and cmdline[2] == "serve"
    if "mitoseg.serving.supervise" in text or old_cli:
        return "supervisor (mitoseg serve)"
    if "bentoml" in text and "serve" in text:
        return "arbiter (bentoml serve)"
    return Path(cmdline[0]).name if cmdline else "?"


class MemorySampler(threading.Thread):
    """Samples RSS and PSS of a process and all its descendants every ``every`` s.

    ``peak(t0, t1)`` gives the peak of the summed RSS / PSS over samples in a time
    window, and per role the peak of each process's own RSS / PSS.
    """

    def __init__(self, pid: int, every: float = 0.2) -> None:
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process(pid)
        self.every = every
        self.samples: list[tuple[float, int, int, dict[str, tuple[int, int]]]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        import psutil

        while not self._stop_event.is_set():
            now = time.monotonic()
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
            except psutil.Error:
                procs = []
            rss_sum = pss_sum = 0
            roles: dict[str, tuple[int, int]] = {}
            for p in procs:
                try:
                    rss, role = p.memory_info().rss, process_role(p.cmdline())
                except psutil.Error:
                    continue
                pss = _pss(p.pid)
                rss_sum, pss_sum = rss_sum + rss, pss_sum + pss
                old = roles.get(role, (0, 0))
                roles[role] = (old[0] + rss, old[1] + pss)
            if procs:
                self.samples.append((now, rss_sum, pss_sum, roles))
            self._stop_event.wait(self.every)

    def peak(self, t0: float, t1: float) -> dict[str, Any]:
        """Peak summed RSS/PSS (MB) of the samples in ``[t0, t1]``, and per role."""
        window = [s for s in self.samples if t0 <= s[0] <= t1]
        per_role: dict[str, dict[str, float]] = {}
        for _, _, _, roles in window:
            for role, (rss, pss) in roles.items():
                r = per_role.setdefault(role, {"rss_mb": 0.0, "pss_mb": 0.0})
                r["rss_mb"] = max(r["rss_mb"], _mb(rss))
                r["pss_mb"] = max(r["pss_mb"], _mb(pss))
        return {
            "samples": len(window),
            "rss_mb": _mb(max((s[1] for s in window), default=0)),
            "pss_mb": _mb(max((s[2] for s in window), default=0)),
            "per_role": per_role,
        }

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


def _mb(n: float) -> float:
    return round(n / 2**20, 1)


def start_server(
    model: str, home: str, port: int, log: Path, src: Path, params: Path, extra: dict[str, str]
) -> subprocess.Popen:
    """``mitoseg serve`` of the code in ``src`` (its own session, BentoML home ``home``,
    ``extra`` environment variables)."""
    env = {**os.environ, "BENTOML_HOME": home, "BENTOML_DO_NOT_TRACK": "True", **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("MITOSEG_API_TOKEN", None)
    cmd = [str(Path(sys.executable).with_name("mitoseg")), "serve", "--model", model]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--params", str(params)]
    with log.open("wb") as out:
        return subprocess.Popen(
            cmd, cwd=src.parent, env=env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip


def stop_server(proc: subprocess.Popen, deadline_s: float = 60.0) -> float | None:
    """SIGTERM to the top process; seconds until every process of its tree is gone
    (None: some were still running after ``deadline_s`` and were killed)."""
    import psutil

    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.Error:
        tree = []
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    while time.monotonic() - t0 < deadline_s:
        proc.poll()
        if not [p for p in tree if _alive(p)]:
            return round(time.monotonic() - t0, 2)
        time.sleep(0.1)
    for p in tree:
        if _alive(p):
            p.kill()
    proc.wait(timeout=10)
    return None


def _alive(p: Any) -> bool:
    import psutil

    try:
        return bool(p.is_running()) and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if requests.get(url + "/readyz", timeout=5).status_code == 200:
                return time.monotonic() - t0
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not ready after {timeout} s:\n{log.read_text()[-3000:]}")


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def run_level(url: str, payload: bytes, clients: int, n_requests: int, max_s: float) -> dict:
    """Send up to ``n_requests`` with ``clients`` concurrent workers within ``max_s``."""
    lat: list[float] = []
    errors: dict[str, int] = {}
    lock = threading.Lock()
    counter = iter(range(n_requests))
    t0 = time.monotonic()

    def worker() -> None:
        session = requests.Session()
        while time.monotonic() - t0 < max_s:
            with lock:
                if next(counter, None) is None:
                    return
            start = time.perf_counter()
            try:
                r = session.post(
                    url + "/segment",
                    files={"image": ("slice.tif", payload, "image/tiff")},
                    timeout=600,
                )
                key = None if r.status_code == 200 else str(r.status_code)
            except requests.RequestException as exc:
                key = type(exc).__name__
            elapsed = time.perf_counter() - start
            with lock:
                if key is None:
                    lat.append(elapsed)
                else:
                    errors[key] = errors.get(key, 0) + 1

    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(worker) for _ in range(clients)]:
            f.result()
    wall = time.monotonic() - t0
    return {
        "clients": clients,
        "completed": len(lat),
        "errors": errors,
        "wall_s": round(wall, 3),
        "p50_s": percentile(lat, 50),
        "p99_s": percentile(lat, 99),
        "mean_s": float(np.mean(lat)) if lat else None,
        "throughput_rps": len(lat) / wall if wall > 0 else None,
        "throughput_mpix_s": None,
    }


def in_process_latency(stored_path: str, img: np.ndarray, meta: dict, repeats: int) -> dict:
    """Latency of the same ``segment_stack`` call in-process (model and plan loaded once)."""
    import keras

    from mitoseg.inference.plan import PLAN_FILE, InferencePlan
    from mitoseg.inference.predict import segment_stack
    from mitoseg.inference.runtime import predictor_for_plan
    from mitoseg.serving.bento import MODEL_FILE

    model = keras.saving.load_model(os.path.join(stored_path, MODEL_FILE), compile=False)
    plan = InferencePlan.read(os.path.join(stored_path, PLAN_FILE))
    predict = predictor_for_plan(model, plan)
    segment_stack(predict, img, plan)  # warm-up (graph tracing / compilation)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        segment_stack(predict, img, plan)
        times.append(time.perf_counter() - t)
    return {"repeats": repeats, "p50_s": percentile(times, 50), "min_s": min(times)}


def parse_variants(specs: list[str]) -> dict[str, Path]:
    """``NAME=DIR`` pairs; the current checkout is ``current`` and comes first."""
    variants = {"current": ROOT}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        root = Path(folder).resolve()
        if not sep or not name or name in variants:
            raise SystemExit(f"--variant {spec!r}: expected a new NAME=DIR")
        if not (root / "src" / "mitoseg").is_dir():
            raise SystemExit(f"--variant {spec!r}: {root}/src/mitoseg not found")
        variants[name] = root
    return variants


def serve_once(
    model: str,
    root: Path,
    home: str,
    payload: bytes,
    levels: list[int],
    args: Any,
    log: Path,
    env: dict[str, str],
) -> dict[str, Any]:
    """Start ``mitoseg serve`` of the checkout ``root``, measure idle and each level, stop."""
    params = root / "params.yaml" if args.params is None else Path(args.params)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(model, home, port, log, root / "src", params, env)
    sampler = None
    try:
        startup = wait_ready(url, proc, log)
        sampler = MemorySampler(proc.pid)
        sampler.start()
        t_idle = time.monotonic()
        time.sleep(args.idle_seconds)
        idle = sampler.peak(t_idle, time.monotonic())
        warm = time.perf_counter()
        r = requests.post(url + "/segment", files={"image": ("s.tif", payload)}, timeout=600)
        r.raise_for_status()
        first = time.perf_counter() - warm
        results = []
        for clients in levels:
            t0 = time.monotonic()
            res = run_level(url, payload, clients, args.requests, args.max_seconds)
            mem = sampler.peak(t0, time.monotonic())
            res.update(
                peak_rss_mb=mem["rss_mb"], peak_pss_mb=mem["pss_mb"],
                peak_per_role_mb=mem["per_role"], memory_samples=mem["samples"],
            )  # fmt: skip
            results.append(res)
        overall = sampler.peak(0.0, time.monotonic())
    finally:
        if sampler is not None:
            sampler.stop()
        stop_s = stop_server(proc)
    return {
        "server_startup_s": round(startup, 3),
        "first_request_s": round(first, 3),
        "levels": results,
        "idle": {"rss_mb": idle["rss_mb"], "pss_mb": idle["pss_mb"], "per_role": idle["per_role"]},
        "server_peak_rss_mb": overall["rss_mb"],
        "server_peak_pss_mb": overall["pss_mb"],
        "server_peak_per_role_mb": overall["per_role"],
        "stop_s": stop_s,
    }


def _commit(root: Path) -> str | None:
    """Short commit of a checkout (None when it is not a git checkout)."""
    out = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return out.stdout.strip() or None


def _median(values: list[float | None]) -> float | None:
    import statistics

    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def summarise(runs: dict[str, list[dict[str, Any]]], levels: list[int]) -> dict[str, Any]:
    """Per variant and level: medians over rounds; ratios of each variant to the first."""
    out: dict[str, Any] = {}
    for name, rounds in runs.items():
        per_level = {}
        for i, clients in enumerate(levels):
            rows = [r["levels"][i] for r in rounds]
            per_level[str(clients)] = {
                key: _median([row[key] for row in rows])
                for key in ("throughput_rps", "p50_s", "p99_s", "peak_rss_mb", "peak_pss_mb")
            }
        out[name] = {
            "levels": per_level,
            "idle_rss_mb": _median([r["idle"]["rss_mb"] for r in rounds]),
            "idle_pss_mb": _median([r["idle"]["pss_mb"] for r in rounds]),
            "stop_s": [r["stop_s"] for r in rounds],
        }
    first = next(iter(out))
    ratios: dict[str, Any] = {}
    for name in out:
        if name == first:
            continue
        ratios[f"{first}/{name}"] = {
            clients: {
                key: round(a[key] / b[key], 3) if a[key] and b[key] else None
                for key in ("throughput_rps", "p50_s", "peak_rss_mb", "peak_pss_mb")
            }
            for clients, a, b in (
                (c, out[first]["levels"][c], out[name]["levels"][c]) for c in out[first]["levels"]
            )
        }
    return {"medians": out, "ratios": ratios}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models:/mitoseg-unet@champion")
    ap.add_argument("--tiny", action="store_true", help="serve a tiny untrained UNet (smoke)")
    ap.add_argument("--size", type=int, default=1024, help="slice side, pixels")
    ap.add_argument("--levels", default="1,4,16", help="concurrent clients per level")
    ap.add_argument("--requests", type=int, default=50, help="requests per level (at most)")
    ap.add_argument("--max-seconds", type=float, default=120.0, help="time bound per level")
    ap.add_argument("--idle-seconds", type=float, default=3.0, help="idle memory window")
    ap.add_argument("--inproc-repeats", type=int, default=3, help="0: skip")
    ap.add_argument("--params", default=None, help="default: each checkout's params.yaml")
    ap.add_argument("--variant", action="append", default=[], help="NAME=DIR, repeatable")
    ap.add_argument("--variant-env", action="append", default=[], help="NAME:KEY=VALUE, server env")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved runs of each variant")
    ap.add_argument("--name", default="serve_load", help="results file name")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",") if x]
    if not levels or min(levels) < 1 or args.requests < 1 or args.max_seconds <= 0:
        ap.error("--levels, --requests and --max-seconds must be positive")
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    variants = parse_variants(args.variant)
    envs: dict[str, dict[str, str]] = {name: {} for name in variants}
    for spec in args.variant_env:
        name, _, pair = spec.partition(":")
        key, sep, value = pair.partition("=")
        if name not in envs or not sep or not key:
            ap.error(f"--variant-env {spec!r}: expected NAME:KEY=VALUE for a known variant")
        envs[name][key] = value

    tmp = Path(tempfile.mkdtemp(prefix="serve_load-"))
    model_uri = str(tiny_model(tmp / "tiny.keras")) if args.tiny else args.model

    img, source = load_slice(args.size)
    buf = io.BytesIO()
    tifffile.imwrite(buf, img)
    payload = buf.getvalue()

    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    for i in range(args.rounds):
        for name, root in variants.items():
            home = str(tmp / f"bentoml-{name}")  # one store per variant, reused by its rounds
            log = tmp / f"server-{name}-{i}.log"
            print(f"round {i}: {name} ({root})", file=sys.stderr, flush=True)
            env = envs[name]
            runs[name].append(serve_once(model_uri, root, home, payload, levels, args, log, env))
    current = runs["current"][-1]
    mpix = img.size / 1e6
    for rounds in runs.values():
        for run in rounds:
            for res in run["levels"]:
                res["throughput_mpix_s"] = (res["throughput_rps"] or 0) * mpix

    os.environ["BENTOML_HOME"] = str(tmp / "bentoml-current")
    import bentoml

    from mitoseg.config import load_section
    from mitoseg.serving.bento import import_model

    params = Path(args.params) if args.params else ROOT / "params.yaml"
    serve_cfg = load_section("serve", params) if params.exists() else None
    tag, meta = import_model(model_uri, serve=serve_cfg)  # reused: the server imported it
    inproc = None
    if args.inproc_repeats > 0:
        inproc = in_process_latency(bentoml.models.get(tag).path, img, meta, args.inproc_repeats)
    single = current["levels"][0]["p50_s"] if current["levels"][0]["clients"] == 1 else None
    data: dict[str, Any] = {
        "benchmark": "serve_load",
        "machine": machine(),
        "model": {"uri": model_uri, "tiny": args.tiny, "bento_model": tag},
        "slice": {"source": source, "shape": list(img.shape), "dtype": str(img.dtype)},
        "serve": meta["serve"],
        "bounds": {
            "requests_per_level": args.requests,
            "max_seconds_per_level": args.max_seconds,
            "rounds": args.rounds,
        },
        "memory_sampling": "RSS and PSS (/proc/<pid>/smaps_rollup) summed over the mitoseg "
        "serve process tree every 0.2 s; peaks per level",
        **{k: v for k, v in current.items() if k != "levels"},
        "levels": current["levels"],
        "in_process": inproc,
        "http_overhead_s": (single - inproc["p50_s"]) if single and inproc else None,
        "variants": {
            name: {
                "checkout": str(root),
                "git_commit": _commit(root),
                "env": envs[name],
                "runs": runs[name],
            }
            for name, root in variants.items()
        },
        "comparison": summarise(runs, levels) if len(variants) > 1 or args.rounds > 1 else None,
    }
    save(args.name, data)


if __name__ == "__main__":
    main()
