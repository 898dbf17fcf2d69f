"""The volume path at scale: Dask scaling, overhead, memory, kill -9 and a capacity model.

Input volumes are OME-Zarr stores of real EM: the bundled VNC slices (train + test,
512 x 768) tiled to ``--side`` x ``--side`` slices and cycled back and forth in z,
written chunk by chunk (``(block_z, 512, 512)`` chunks), so a store of any size is made
without holding it in memory. The model is a small UNet (depth 2, 4 filters, fixed
seed, threshold at the median probability so objects and stitching are realistic) unless
``--model`` names a ``.keras`` file with its plan. TensorFlow runs ``--threads`` threads
per worker (``TF_NUM_INTRAOP_THREADS``), the in-process reference too.

Measures (all into ``benchmarks/results/volume.json`` with the machine and git commit):

1. **scaling**: the same volume (``--scale-gb``) with 1 and 2 Dask workers
   (``LocalCluster``, one process each): voxels/s and the ratio.
2. **overhead**: the 1-worker job against in-process
   :func:`mitoseg.inference.predict.segment_stack` on the same voxels (read into memory first):
   ``overhead_predict`` compares the predict phase (blocks: read, predict, write image,
   mask and local labels), ``overhead_total`` the whole job (plus stitching, instance
   ids, pyramids and ``objects.csv``). Goal: predict within 10 %. The predict phase is
   split into Dask's share and the tasks' read, predict, write and instance parts
   (:func:`overhead_figures`).
3. **memory**: peak RSS of every worker process (psutil, sampled every 0.1 s from this
   process) for volumes of ``--sizes-gb`` (default 0.25, 1, 4 GB of uint8 voxels).
4. **kill -9**: ``mitoseg predict`` on a volume, killed with SIGKILL (its whole process
   group) once a third of the blocks are recorded, started again, and compared by
   SHA-256 of image, mask, instances and ``objects.csv`` with an uninterrupted run.
5. **capacity**: :func:`capacity_model` turns the measured per-block figures into the
   time and cost of segmenting a 1 TB volume on K CPU or GPU workers, and where it
   stops scaling (scheduler, S3 request rate, the stitching graph). Prices and the GPU
   speed-up are assumptions (options below, defaults with their date and source).

Usage:
    python benchmarks/volume.py --quick          # smoke test, tiny sizes, ~2 min
    python benchmarks/volume.py                  # full run (see docs/VOLUMES.md)
    python benchmarks/volume.py --readme         # print the README table from the JSON
    python benchmarks/volume.py --skip memory kill --model M.keras --name volume_overhead
                                                 # scaling and overhead with a real model
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from common import RESULTS, ROOT, machine, save
from mitoseg.volume.cluster import DROPPED_WORKER_ENV
from mitoseg.volume.spec import MIN_BLOCK_Z, auto_block_z

GB = 1e9
SKIPPABLE = ("memory", "kill")  # scaling, overhead and capacity always run
TB_VOXELS = 1e12  # 1 TB of uint8 voxels
VNC = ROOT / "src" / "mitoseg" / "sample_data" / "vnc"
#: AWS on-demand Linux, us-east-1, as listed on 2026-06-17 (factualminds.com, "Amazon EC2
#: On-Demand Pricing ... (2026)"): m7g.large (2 vCPU) and g5.xlarge (1 A10G GPU), $/h.
PRICE_CPU_WORKER = 0.0816
PRICE_GPU_WORKER = 1.006
#: S3 standard request prices, $ per 1000 (PUT, GET); S3's documented per-prefix rates.
S3_PUT_PER_1000, S3_GET_PER_1000 = 0.005, 0.0004
S3_PUT_PER_S, S3_GET_PER_S = 3500, 5500
#: Dask's scheduler: about 1 ms of overhead per task (dask.org best practices).
SCHEDULER_TASKS_PER_S = 1000


# ------------------------------------------------------------------ inputs


def em_slices() -> np.ndarray:
    """The bundled real VNC slices, train then test, ``(Z, 512, 768)`` uint8."""
    import tifffile

    return np.concatenate([tifffile.imread(VNC / s / "images.tif") for s in ("train", "test")])


def write_volume(path: Path, voxels: float, side: int, block_z: int) -> tuple[str, tuple]:
    """An OME-Zarr store of about ``voxels`` uint8 voxels: ``side`` x ``side`` slices of
    tiled real EM, ``Z = voxels / side**2`` (at least ``block_z``), written slab by slab.

    Returns:
        ``(uri, shape)``.
    """
    import zarr

    src = em_slices()
    depth = max(block_z, round(voxels / side / side))
    cycle = np.concatenate([np.arange(len(src)), np.arange(len(src) - 2, 0, -1)])
    reps = (-(-side // src.shape[1]), -(-side // src.shape[2]))
    shutil.rmtree(path, ignore_errors=True)
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    arr = root.create_array(
        "0", shape=(depth, side, side), chunks=(block_z, 512, 512), dtype="uint8",
        dimension_names=["z", "y", "x"],
    )  # fmt: skip
    for z0 in range(0, depth, block_z):
        z1 = min(depth, z0 + block_z)
        slab = np.stack([np.tile(src[cycle[z % cycle.size]], reps)[:side, :side] for z in
                         range(z0, z1)])  # fmt: skip
        arr[z0:z1] = slab
    axes = [{"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"]
    scale = {"type": "scale", "scale": [50.0, 4.6, 4.6]}
    ms = {"axes": axes, "datasets": [{"path": "0", "coordinateTransformations": [scale]}]}
    root.attrs.update({"ome": {"version": "0.5", "multiscales": [ms]}})
    return str(path), (depth, side, side)


def build_model(workdir: Path, model: Path | None) -> tuple[Path, Any, Any]:
    """``(path, model, plan)``: ``--model`` with its plan, or the small benchmark UNet."""
    from mitoseg import tracking

    if model is not None:
        net, plan = tracking.load_model_and_plan(str(model))
        return model, net, plan
    import keras

    from mitoseg.config import ModelConfig
    from mitoseg.inference.plan import InferencePlan
    from mitoseg.inference.predict import iter_stack_probabilities
    from mitoseg.model.unet import build_unet

    keras.utils.set_random_seed(7)
    net = build_unet(ModelConfig(depth=2, base_filters=4, batch_norm=False, dropout=0.0), 2)
    path = workdir / "bench.keras"
    net.save(path)
    plan = InferencePlan.default_for(1, 4, tile_size=512, halo=16, batch_size=4,
                                     min_object_size=5)  # fmt: skip
    probs = next(iter_stack_probabilities(net, em_slices()[0], plan))
    plan = plan.with_overrides(threshold=round(float(np.median(probs)), 6), source="evaluate")
    plan.write(workdir / "bench.inference_plan.json")
    return path, net, plan


# ------------------------------------------------------------------ measuring


class RssSampler:
    """Peak resident memory of the given processes, sampled every ``interval`` s."""

    def __init__(self, pids: list[int], interval: float = 0.1) -> None:
        import psutil

        self._procs = {pid: psutil.Process(pid) for pid in pids}
        self.peak = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid, proc in self._procs.items():
                with contextlib.suppress(Exception):  # a worker may be gone
                    self.peak[pid] = max(self.peak[pid], proc.memory_info().rss)
            self._stop.wait(self._interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_job(src: str, out: Path, net: Any, plan: Any, workers: int, block_z: int | None,
            block_yx: int | None = None, dask_environ: bool = False) -> dict[str, Any]:  # fmt: skip
    """One job on a fresh ``LocalCluster`` of ``workers`` processes (the job's own
    :func:`~mitoseg.volume.cluster.local_cluster`, or with ``dask_environ`` Dask's default
    worker environment); the summary plus ``voxels_per_s`` (whole job),
    ``predict_voxels_per_s`` and ``peak_rss_mb`` per worker."""
    from distributed import Client, LocalCluster

    from mitoseg.volume.cluster import local_cluster
    from mitoseg.volume.job import run_volume_job

    shutil.rmtree(out, ignore_errors=True)
    cluster = (
        LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
        )
        if dask_environ
        else local_cluster(workers)
    )
    with cluster, Client(cluster) as client:
        pids = list(client.run(os.getpid).values())
        with RssSampler(pids) as rss:
            summary = run_volume_job(src, str(out), net, plan, client=client, block_z=block_z,
                                     block_yx=block_yx, force=True)  # fmt: skip
    voxels = float(np.prod(summary["shape"]))
    summary["voxels_per_s"] = voxels / summary["seconds"]
    summary["predict_voxels_per_s"] = voxels / summary["phase_seconds"]["predict"]
    summary["peak_rss_mb"] = [round(v / 2**20, 1) for v in rss.peak.values()]
    shutil.rmtree(out, ignore_errors=True)
    return summary


def in_process(src: str, net: Any, plan: Any) -> dict[str, float]:
    """``segment_stack`` on the whole volume in memory (read time excluded)."""
    from mitoseg.inference.predict import segment_stack
    from mitoseg.volume.store import open_volume

    vol = open_volume(src)
    data = vol.read(0, vol.shape[0])
    start = time.perf_counter()
    segment_stack(net, data, plan)
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 3), "voxels_per_s": data.size / seconds}


def in_process_outputs(src: str, net: Any, plan: Any, out: Path, block_z: int) -> dict[str, Any]:
    """The job's work done in this process without Dask: ``segment_stack`` on the whole
    volume in memory (read time excluded), then the same outputs written with the job's
    own writers (image, mask and instance pyramids, ``objects.csv``), instance labels
    and measurements of the whole mask at once. Seconds per part."""
    from mitoseg.inference.objects import instance_labels, measure_objects, write_object_table
    from mitoseg.inference.predict import segment_stack
    from mitoseg.volume import ngff
    from mitoseg.volume.store import open_volume

    vol = open_volume(src)
    data = vol.read(0, vol.shape[0])
    shutil.rmtree(out, ignore_errors=True)
    marks = [time.perf_counter()]
    mask = segment_stack(net, data, plan)
    marks.append(time.perf_counter())
    root = ngff.create_output(
        str(out), shape=data.shape, dtype=data.dtype, voxel_size_nm=vol.voxel_size_nm,
        block_z=block_z, n_blocks=1, instances=True,
    )  # fmt: skip
    ngff.write_levels(root, data, 0, False)
    ngff.write_levels(root["labels/mask"], mask, 0, True)
    marks.append(time.perf_counter())
    labels, n = instance_labels(mask == 1)
    ngff.write_levels(root["labels/instances"], labels, 0, True)
    write_object_table(out / "objects.csv", measure_objects(labels, data, vol.voxel_size_nm))
    marks.append(time.perf_counter())
    shutil.rmtree(out, ignore_errors=True)
    parts = dict(zip(("predict", "write", "instances"), np.diff(marks).round(3).tolist(),
                     strict=True))  # fmt: skip
    return {"seconds": round(marks[-1] - marks[0], 3), "objects": n, "parts": parts}


def _done_rows(out: Path) -> int:
    import zarr

    try:
        return int((zarr.open_group(str(out), mode="r")["mitoseg_done"][:][:, 0] > 0).sum())
    except Exception:
        return 0


def checksum(out: Path) -> str:
    """SHA-256 over image, mask and instances (level 0) and ``objects.csv``."""
    import zarr

    root = zarr.open_group(str(out), mode="r")
    h = hashlib.sha256()
    for name in ("0", "labels/mask/0", "labels/instances/0"):
        h.update(np.ascontiguousarray(root[name][:]).tobytes())
    h.update((out / "objects.csv").read_bytes())
    return h.hexdigest()


def kill_and_resume(src: str, workdir: Path, model: Path, workers: int, block_z: int,
                    blocks: int) -> dict[str, Any]:  # fmt: skip
    """SIGKILL ``mitoseg predict`` once a third of the blocks are recorded, restart it,
    and compare with an uninterrupted run."""
    exe = str(Path(sys.executable).with_name("mitoseg"))
    out, fresh = workdir / "killed.ome.zarr", workdir / "fresh.ome.zarr"
    for p in (out, fresh):
        shutil.rmtree(p, ignore_errors=True)
    cmd = [exe, "--no-progress", "predict", "--model", str(model), src, "--workers",
           str(workers), "--block-z", str(block_z), "--out"]  # fmt: skip
    proc = subprocess.Popen([*cmd, str(out)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    target = max(1, blocks // 3)
    while _done_rows(out) < target and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    at_kill = _done_rows(out)
    start = time.perf_counter()
    resumed = subprocess.run([*cmd, str(out)], capture_output=True, text=True, check=True)
    resume_s = time.perf_counter() - start
    start = time.perf_counter()
    subprocess.run([*cmd, str(fresh)], capture_output=True, text=True, check=True)
    fresh_s = time.perf_counter() - start
    a, b = checksum(out), checksum(fresh)
    result = {
        "blocks": blocks, "recorded_at_kill": at_kill, "resume_seconds": round(resume_s, 2),
        "uninterrupted_seconds": round(fresh_s, 2), "resume_output": resumed.stdout.strip(),
        "sha256_resumed": a, "sha256_uninterrupted": b, "identical": a == b,
    }  # fmt: skip
    for p in (out, fresh):
        shutil.rmtree(p, ignore_errors=True)
    return result


# ------------------------------------------------------------------ capacity model


def puts_per_block(block: tuple[int, int, int], levels: int = 4, chunk: int = 256) -> int:
    """Objects one block writes to S3: image, mask, local and final instances (level 0),
    image / mask / instance pyramid levels (y, x halved), one completion row."""
    _, by, bx = block
    total = 0
    for level in range(levels):
        y, x = max(1, by >> level), max(1, bx >> level)
        n = -(-y // chunk) * -(-x // chunk)
        total += n * (4 if level == 0 else 3)
    return total + 1


def capacity_model(
    block_voxels: int,
    block_seconds: float,
    post_seconds_per_voxel: float,
    efficiency: float,
    objects_per_voxel: float,
    block_shape: tuple[int, int, int],
    workers: list[int],
    price_cpu: float = PRICE_CPU_WORKER,
    price_gpu: float = PRICE_GPU_WORKER,
    gpu_speedup: float = 10.0,
    voxels: float = TB_VOXELS,
) -> dict[str, Any]:
    """Time and cost of segmenting ``voxels`` on K workers, from measured per-block
    figures.

    Args:
        block_voxels: voxels of one block as measured.
        block_seconds: median seconds of one predict task (read, predict, write).
        post_seconds_per_voxel: stitching + relabel worker-seconds per voxel.
        efficiency: measured parallel efficiency (2-worker voxels/s over twice 1-worker).
        objects_per_voxel: instances found per voxel (sizes the stitching graph).
        block_shape: ``(z, y, x)`` of a block (sets the S3 requests per block).
        workers: the K to tabulate.
        price_cpu: $/h of one CPU worker (the measured kind).
        price_gpu: $/h of one GPU worker.
        gpu_speedup: GPU worker throughput over the measured CPU worker (assumption
            unless measured on a GPU).
        voxels: volume size (1e12: 1 TB of uint8).

    Returns:
        ``{"assumptions", "per_worker_voxels_per_s", "rows", "limits"}``; each row: kind,
        K, hours, cost in $ (compute + S3 requests), and whether it exceeds a limit.
    """
    blocks = voxels / block_voxels
    puts = puts_per_block(block_shape)
    gets = 2 * (-(-block_shape[1] // 512)) * (-(-block_shape[2] // 512))  # predict + relabel
    s3_cost = blocks * (puts * S3_PUT_PER_1000 + gets * S3_GET_PER_1000) / 1000
    rows = []
    limits: dict[str, Any] = {}
    for kind, speed, price in (("cpu", 1.0, price_cpu), ("gpu", gpu_speedup, price_gpu)):
        per_block = block_seconds / speed
        # tasks per block: predict, face, relabel; the scheduler handles ~1000 tasks/s
        k_sched = SCHEDULER_TASKS_PER_S * per_block / 3
        k_s3 = S3_PUT_PER_S * per_block / puts  # PUTs/s to one prefix
        limits[kind] = {"scheduler_workers": round(k_sched), "s3_prefix_workers": round(k_s3)}
        for k in workers:
            compute = blocks * per_block + voxels * post_seconds_per_voxel
            hours = compute / (k * efficiency) / 3600
            rows.append({
                "kind": kind, "workers": k, "hours": round(hours, 2),
                "cost_usd": round(hours * k * price + s3_cost, 2),
                "limited_by": [n for n, v in (("scheduler", k_sched), ("s3", k_s3)) if k > v],
            })  # fmt: skip
    objects = voxels * objects_per_voxel
    limits["stitching"] = {
        "objects": round(objects),
        "mapping_mb": round(objects * 4 / 2**20, 1),  # uint32 id map broadcast to workers
        "note": "one graph over all objects on the client (scipy connected components)",
    }
    return {
        "assumptions": {
            "voxels": voxels,
            "block_shape": list(block_shape),
            "price_cpu_usd_h": price_cpu,
            "price_gpu_usd_h": price_gpu,
            "gpu_speedup": gpu_speedup,
            "prices": "AWS on-demand us-east-1 2026-06-17 (factualminds.com EC2 pricing "
            "2026): m7g.large CPU worker, g5.xlarge GPU worker; S3 $0.005 / 1000 PUT, "
            "$0.0004 / 1000 GET, 3500 PUT/s and 5500 GET/s per prefix",
            "s3_puts_per_block": puts,
            "s3_requests_usd": round(s3_cost, 2),
            "efficiency": round(efficiency, 3),
        },
        "per_worker_voxels_per_s": {
            "cpu": block_voxels / block_seconds,
            "gpu": block_voxels / block_seconds * gpu_speedup,
        },
        "rows": rows,
        "limits": limits,
    }


def overhead_figures(
    one: dict[str, Any], ref: dict[str, float], same_outputs: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The 1-worker job against in-process ``segment_stack`` (``ref``), split up.

    ``overhead_predict``: the predict phase's wall time over ``segment_stack``'s, minus 1
    (the goal: at most 0.10); ``overhead_total``: the whole job's. The phase is then split
    into its parts, each as a share of ``segment_stack``'s time: ``dask`` (the phase's
    wall time not spent inside a task: scheduling, transfers, worker start), and the
    tasks' ``read``, ``predict`` (normalise, predict, decide the mask), ``write`` (image,
    mask and their pyramids) and ``instances`` (per-block labels and their write), from
    ``block_parts_seconds``; ``compute_vs_in_process`` compares ``read + predict`` alone.
    ``same_outputs`` (:func:`in_process_outputs`): the whole job against the same work
    in one process without Dask (``overhead_vs_same_outputs``).
    """
    phase = one["phase_seconds"]["predict"]
    parts = one.get("block_parts_seconds", {})
    in_tasks = one["block_seconds"].get("mean", 0.0) * one["block_seconds"].get("n", 0)
    share = {k: round(v / ref["seconds"], 4) for k, v in parts.items()}
    out = {
        "in_process": ref, "job_seconds": one["seconds"], "predict_seconds": phase,
        "overhead_predict": phase / ref["seconds"] - 1,
        "overhead_total": one["seconds"] / ref["seconds"] - 1, "goal": 0.10,
        "parts_vs_in_process": {"dask": round((phase - in_tasks) / ref["seconds"], 4), **share},
    }  # fmt: skip
    if parts:
        compute = parts["read"] + parts["predict"]
        out["compute_vs_in_process"] = round(compute / ref["seconds"] - 1, 4)
    if same_outputs is not None:
        out["same_outputs_in_process"] = same_outputs
        out["overhead_vs_same_outputs"] = round(one["seconds"] / same_outputs["seconds"] - 1, 4)
    return out


# ------------------------------------------------------------------ README table


def readme_table(data: dict[str, Any]) -> str:
    """The README's volume table (README.md, Benchmarks, **Volumes**) from ``volume.json``:
    replace the whole table with this output."""
    s, o, m, k = data["scaling"], data["overhead"], data["memory"], data["kill"]
    gb = data["settings"].get("scale_gb", "?")
    cap = {(r["kind"], r["workers"]): r for r in data["capacity"]["rows"]}

    def tb(kind: str) -> str:
        return " / ".join(
            f"{cap[(kind, n)]['hours']:.1f} h, ${cap[(kind, n)]['cost_usd']:.0f}" for n in (8, 64)
        )

    speedup = data["capacity"]["assumptions"]["gpu_speedup"]
    sizes = " / ".join(f"{r['gb']:g}" for r in m)
    peaks = " / ".join(f"{max(r['peak_rss_mb']):.0f}" for r in m)
    return "\n".join([
        "| measure | result |",
        "|---|---|",
        f"| 1 worker, {gb:g} GB volume | {s['1']['voxels_per_s'] / 1e6:.2f} Mvoxel/s |",
        f"| 2 workers, same volume | {s['2']['voxels_per_s'] / 1e6:.2f} Mvoxel/s "
        f"({s['ratio']:.2f}x) |",
        f"| Dask predict phase vs in-process `segment_stack` (goal +10 %) | "
        f"{o['overhead_predict']:+.1%} (whole job {o['overhead_total']:+.1%}) |",
        *_same_work_rows(o),
        f"| peak RSS per worker, {sizes} GB volume | {peaks} MB |",
        f"| kill -9 after a third of the blocks, restart | "
        f"{'identical' if k['identical'] else 'DIFFERENT'} (SHA-256; "
        f"{k['recorded_at_kill']} of {k['blocks']} blocks recorded at the kill) |",
        f"| 1 TB on 8 / 64 CPU workers (model: hours, $) | {tb('cpu')} |",
        f"| 1 TB on 8 / 64 GPU workers (model, assumed {speedup:g}x a CPU worker: hours, $) "
        f"| {tb('gpu')} |",
    ])  # fmt: skip


def _same_work_rows(o: dict[str, Any]) -> list[str]:
    """README rows for the same-work reference and the worker environment (newer runs)."""
    rows = []
    if "overhead_vs_same_outputs" in o:
        same = o["same_outputs_in_process"]
        rows.append(
            "| whole job vs the same work in one process without Dask (`segment_stack`, "
            f"then the same outputs; {same['seconds']:.1f} s) | "
            f"{o['overhead_vs_same_outputs']:+.1%} |"
        )
    env = o.get("worker_environment")
    if env:
        rows.append(
            f"| predict part with Dask's default worker environment ({', '.join(env['dropped'])} "
            f"set) vs without | {env['predict_part_s_dask_default']:.1f} s vs "
            f"{env['predict_part_s']:.1f} s |"
        )
    return rows


# ------------------------------------------------------------------ main


@contextlib.contextmanager
def _workdir(path: Path, keep: bool) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    ap.add_argument("--sizes-gb", type=float, nargs="+", default=[0.25, 1.0, 4.0])
    ap.add_argument("--scale-gb", type=float, default=0.25, help="volume of scaling/overhead")
    ap.add_argument("--kill-gb", type=float, default=0.1, help="volume of the kill -9 run")
    ap.add_argument("--side", type=int, default=2048, help="slice side, pixels")
    ap.add_argument("--block-z", type=int, default=None,
                    help="slices per block (default: auto_block_z for the plan)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=1, help="TensorFlow threads per worker")
    ap.add_argument("--model", type=Path, default=None, help=".keras with its plan")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/mitoseg-bench-volume"))
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--price-cpu", type=float, default=PRICE_CPU_WORKER)
    ap.add_argument("--price-gpu", type=float, default=PRICE_GPU_WORKER)
    ap.add_argument("--gpu-speedup", type=float, default=10.0,
                    help="GPU worker over the measured CPU worker (assumption)")  # fmt: skip
    ap.add_argument("--name", default=None, help="result file name (default volume[_quick])")
    ap.add_argument("--readme", action="store_true", help="print the README table and exit")
    ap.add_argument("--skip", nargs="+", choices=SKIPPABLE, default=[],
                    help="leave these measures out (no README table then)")  # fmt: skip
    args = ap.parse_args(argv)
    name = args.name or ("volume_quick" if args.quick else "volume")
    if args.readme:
        print(readme_table(json.loads((RESULTS / f"{name}.json").read_text())))
        return
    if args.quick:
        args.sizes_gb, args.scale_gb, args.kill_gb, args.side = [0.002, 0.004], 0.002, 0.002, 256
        args.block_z = args.block_z or 4
    os.environ["TF_NUM_INTRAOP_THREADS"] = str(args.threads)  # before TensorFlow loads
    os.environ["TF_NUM_INTEROP_THREADS"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    started = time.perf_counter()
    with _workdir(args.workdir, args.keep) as work:
        model_path, net, plan = build_model(work, args.model)
        chunk_z = args.block_z or MIN_BLOCK_Z  # the inputs' chunk depth
        src, shape = write_volume(work / "scale.ome.zarr", args.scale_gb * GB, args.side,
                                  chunk_z)  # fmt: skip
        block_z = args.block_z or auto_block_z(plan, shape, None)
        scaling = {str(w): run_job(src, work / "out.ome.zarr", net, plan, w, block_z)
                   for w in (1, 2)}  # fmt: skip
        scaling["ratio"] = scaling["2"]["voxels_per_s"] / scaling["1"]["voxels_per_s"]
        ref = in_process(src, net, plan)
        one = scaling["1"]
        same = in_process_outputs(src, net, plan, work / "same.ome.zarr", one["block_z"])
        overhead = overhead_figures(one, ref, same)
        dask_env = run_job(src, work / "out.ome.zarr", net, plan, 1, block_z,
                           dask_environ=True)  # fmt: skip
        overhead["worker_environment"] = {
            "dropped": list(DROPPED_WORKER_ENV),
            "predict_part_s": one["block_parts_seconds"]["predict"],
            "predict_part_s_dask_default": dask_env["block_parts_seconds"]["predict"],
            "predict_phase_s": one["phase_seconds"]["predict"],
            "predict_phase_s_dask_default": dask_env["phase_seconds"]["predict"],
        }
        memory = []
        for gb in args.sizes_gb if "memory" not in args.skip else []:
            vsrc, vshape = write_volume(work / "mem.ome.zarr", gb * GB, args.side, chunk_z)
            res = run_job(vsrc, work / "out.ome.zarr", net, plan, 2, block_z)
            memory.append(
                {
                    "gb": gb,
                    "shape": list(vshape),
                    "peak_rss_mb": res["peak_rss_mb"],
                    "voxels_per_s": res["voxels_per_s"],
                    "seconds": res["seconds"],
                }
            )
            shutil.rmtree(work / "mem.ome.zarr", ignore_errors=True)  # fmt: skip
        kill = None
        if "kill" not in args.skip:
            ksrc, kshape = write_volume(work / "kill.ome.zarr", args.kill_gb * GB, args.side,
                                        chunk_z)  # fmt: skip
            blocks = -(-kshape[0] // block_z)
            kill = kill_and_resume(ksrc, work, model_path, 2, block_z, blocks)
    voxels = float(np.prod(one["shape"]))
    post = sum(v for k, v in one["phase_seconds"].items() if k != "predict") / voxels
    capacity = capacity_model(
        block_voxels=one["block_voxels"], block_seconds=one["block_seconds"]["median"],
        post_seconds_per_voxel=post, efficiency=min(1.0, scaling["ratio"] / 2),
        objects_per_voxel=one["objects"] / voxels,
        block_shape=(block_z, args.side, args.side), workers=[1, 8, 64, 256, 1024],
        price_cpu=args.price_cpu, price_gpu=args.price_gpu, gpu_speedup=args.gpu_speedup,
    )  # fmt: skip
    data = {
        "benchmark": "volume", "quick": args.quick, "machine": machine(),
        "settings": {"side": args.side, "block_z": block_z, "threads": args.threads,
                     "block_z_source": "given" if args.block_z else "auto_block_z",
                     "scale_gb": args.scale_gb, "sizes_gb": args.sizes_gb,
                     "scale_shape": list(shape), "model": str(args.model or "bench UNet"),
                     "plan": plan.model_dump(mode="json")},
        "scaling": scaling, "overhead": overhead, "memory": memory, "kill": kill,
        "capacity": capacity, "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    save(name, data)
    if not args.skip:
        print(readme_table(data))
    else:
        print(json.dumps(overhead, indent=1))


if __name__ == "__main__":
    main()
