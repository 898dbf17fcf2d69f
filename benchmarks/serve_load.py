"""Bounded HTTP load test of the BentoML service on loopback.

Starts ``bentoml serve`` for a model, then for each concurrency level (default 1, 4, 16
clients) sends ``/segment`` requests with one real EM slice (default: a 1024x1024
CDeep3M slice from ``../shared/data``, else the bundled VNC sample tiled to size) until
``--requests`` responses or ``--max-seconds`` have passed, whichever comes first. It
reports p50/p99 latency and throughput per level, the in-process latency of the same
``segment_stack`` call on the same slice, and the peak RSS of the server's process tree.
Writes ``benchmarks/results/serve_load.json``.

Examples::

    python benchmarks/serve_load.py                           # champion, full run
    python benchmarks/serve_load.py --tiny --requests 2       # smoke test, tiny model
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


class RssSampler(threading.Thread):
    """Samples the summed RSS of a process and its children until stopped."""

    def __init__(self, pid: int, every: float = 0.2) -> None:
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process(pid)
        self.every = every
        self.peak = 0
        self.peak_per_process: dict[str, int] = {}
        self._stop_event = threading.Event()

    def run(self) -> None:
        import psutil

        while not self._stop_event.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                total = 0
                for p in procs:
                    try:
                        rss = p.memory_info().rss
                        name = " ".join(p.cmdline()[-3:])[:80]
                    except psutil.Error:
                        continue
                    total += rss
                    self.peak_per_process[name] = max(self.peak_per_process.get(name, 0), rss)
                self.peak = max(self.peak, total)
            except psutil.Error:
                pass
            self._stop_event.wait(self.every)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


def start_server(tag: str, home: str | None, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "MITOSEG_BENTO_MODEL": tag, "BENTOML_DO_NOT_TRACK": "True"}
    env.pop("MITOSEG_API_TOKEN", None)
    if home:
        env["BENTOML_HOME"] = home
    cmd = [sys.executable, "-m", "bentoml", "serve", "mitoseg.serving.service:MitoSeg"]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as out:
        return subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models:/mitoseg-unet@champion")
    ap.add_argument("--tiny", action="store_true", help="serve a tiny untrained UNet (smoke)")
    ap.add_argument("--size", type=int, default=1024, help="slice side, pixels")
    ap.add_argument("--levels", default="1,4,16", help="concurrent clients per level")
    ap.add_argument("--requests", type=int, default=50, help="requests per level (at most)")
    ap.add_argument("--max-seconds", type=float, default=120.0, help="time bound per level")
    ap.add_argument("--inproc-repeats", type=int, default=3)
    ap.add_argument("--bentoml-home", default=None, help="default: a temporary store")
    ap.add_argument("--name", default="serve_load", help="results file name")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",") if x]
    if not levels or min(levels) < 1 or args.requests < 1 or args.max_seconds <= 0:
        ap.error("--levels, --requests and --max-seconds must be positive")

    tmp = Path(tempfile.mkdtemp(prefix="serve_load-"))
    home = args.bentoml_home or str(tmp / "bentoml")
    os.environ["BENTOML_HOME"] = home
    from mitoseg.config import load_section
    from mitoseg.serving.bento import import_model

    model_uri = str(tiny_model(tmp / "tiny.keras")) if args.tiny else args.model
    params = ROOT / "params.yaml"
    serve_cfg = load_section("serve", params) if params.exists() else None
    tag, meta = import_model(model_uri, serve=serve_cfg)
    import bentoml

    stored_path = bentoml.models.get(tag).path

    img, source = load_slice(args.size)
    buf = io.BytesIO()
    tifffile.imwrite(buf, img)
    payload = buf.getvalue()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp / "server.log"
    proc = start_server(tag, home, port, log)
    sampler = None
    try:
        startup = wait_ready(url, proc, log)
        sampler = RssSampler(proc.pid)
        sampler.start()
        warm = time.perf_counter()
        r = requests.post(url + "/segment", files={"image": ("s.tif", payload)}, timeout=600)
        r.raise_for_status()
        first = time.perf_counter() - warm
        results = [run_level(url, payload, c, args.requests, args.max_seconds) for c in levels]
    finally:
        if sampler is not None:
            sampler.stop()
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    mpix = img.size / 1e6
    for res in results:
        res["throughput_mpix_s"] = (res["throughput_rps"] or 0) * mpix
    inproc = in_process_latency(stored_path, img, meta, args.inproc_repeats)
    single = results[0]["p50_s"] if results and results[0]["clients"] == 1 else None
    data: dict[str, Any] = {
        "benchmark": "serve_load",
        "machine": machine(),
        "model": {"uri": model_uri, "tiny": args.tiny, "bento_model": tag},
        "slice": {"source": source, "shape": list(img.shape), "dtype": str(img.dtype)},
        "serve": meta["serve"],
        "bounds": {"requests_per_level": args.requests, "max_seconds_per_level": args.max_seconds},
        "server_startup_s": round(startup, 3),
        "first_request_s": round(first, 3),
        "levels": results,
        "in_process": inproc,
        "http_overhead_s": (single - inproc["p50_s"]) if single is not None else None,
        "server_peak_rss_mb": round(sampler.peak / 2**20, 1) if sampler else None,
        "server_peak_rss_per_process_mb": {
            k: round(v / 2**20, 1) for k, v in (sampler.peak_per_process if sampler else {}).items()
        },
    }
    save(args.name, data)


if __name__ == "__main__":
    main()
