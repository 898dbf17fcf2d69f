"""Inference speed and IoU, side by side in one run: today's tiled Keras FP32 against
single-tile inference (halo from the measured receptive field) on every engine.

"Today" is the old default: Keras FP32, 256-pixel tiles at overlap 0.5 (halo 64),
batch 8, blended. Each new variant runs on one engine of
:func:`mitoseg.inference.runtime.available_engines` with the planner's halo
(``halo_for(receptive_field.effective)``) and either one adaptive tile per slice
(``tile_size`` 1536, so a 1024x1024 slice is one 1184x1184 forward pass) or the tiled
path (512-pixel tiles, for images larger than memory allows). Every variant is scored
on the same slices: the trained model's validation slices (VNC sample, ``val_slices``
of the patch metadata) and real 1024x1024 CDeep3M slices, foreground IoU against the
ground truth; a variant is *eligible* when its IoU is at most ``--tolerance`` (0.005)
below today's on every set. ``border0`` variants keep the seam halo but do not reflect-pad
the image border (the evaluate stage chooses this on validation slices). Seconds per
1024x1024 slice (normalise, predict, threshold) are timed on CDeep3M slices, variants
interleaved round by round so that load changes on a shared machine hit all of them
alike. ``recommended`` is the eligible variant with the fastest timed run (int8 is
quantised with training slices that the inference plan stores beside itself).

Usage: python benchmarks/inference_speed.py [--repeats 3] [--timing-slices 3]
Writes benchmarks/results/inference_speed.json (about 3 minutes on 2 quiet cores).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from common import SHARED, machine, save

DEFAULT_MODEL = Path("/tmp/run1/artifacts/train/model.keras")
DEFAULT_RAW = Path("/tmp/run1/data/raw")
DEFAULT_META = Path("/tmp/run1/artifacts/patches/meta.json")
DEFAULT_CDEEP3M = SHARED / "cdeep3m" / "cdeep3m_train_raw.tif"
DEFAULT_CDEEP3M_MASK = SHARED / "cdeep3m" / "cdeep3m_train_mito.tif"
#: /proc/cpuinfo flags that decide which arithmetic is fast.
ISA_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


def cpu_flags() -> list[str]:
    """All flags of the first CPU in /proc/cpuinfo (empty when it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].split()
    except OSError:
        pass
    return []


def _slices(spec: str, n: int) -> list[int]:
    """``"a:b"`` or ``"i,j,k"`` -> slice indexes, checked against ``n``."""
    if ":" in spec:
        a, b = spec.split(":", 1)
        out = list(range(int(a) if a else 0, int(b) if b else n))
    else:
        out = [int(v) for v in spec.split(",") if v.strip()]
    bad = [i for i in out if not 0 <= i < n]
    if not out or bad:
        raise SystemExit(f"slices {spec!r}: need indexes in 0..{n - 1}, got {bad or 'none'}")
    return out


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise SystemExit(f"{path}: {what} not found (pass its path, see --help)")
    return path


def _iou(preds: list[np.ndarray], truths: list[np.ndarray]) -> float:
    inter = sum(int(np.logical_and(p, t).sum()) for p, t in zip(preds, truths, strict=True))
    union = sum(int(np.logical_or(p, t).sum()) for p, t in zip(preds, truths, strict=True))
    return inter / union if union else 1.0


def _tiles(length: int, tiling: dict[str, Any], divisor: int) -> tuple[int, int]:
    """``(tiles, side)`` along one axis of ``length`` pixels, as predict_tiled lays them."""
    from mitoseg.inference.predict import tile_layout

    t = int(tiling["tile_size"])
    halo = tiling.get("halo")
    if halo is None:
        halo = (t - max(1, round(t * (1.0 - float(tiling.get("overlap", 0.5)))))) // 2
    side, _, _, starts = tile_layout(length, t, int(halo), divisor, tiling.get("border"))
    return len(starts), side


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="trained .keras model")
    parser.add_argument(
        "--raw", type=Path, default=DEFAULT_RAW, help="raw data dir: train/{images,masks}.tif"
    )
    parser.add_argument(
        "--meta", type=Path, default=DEFAULT_META, help="patch meta.json with val_slices"
    )
    parser.add_argument("--cdeep3m", type=Path, default=DEFAULT_CDEEP3M, help="1024x1024 stack")
    parser.add_argument(
        "--cdeep3m-mask", type=Path, default=DEFAULT_CDEEP3M_MASK, help="its 0/255 masks"
    )
    parser.add_argument(
        "--cdeep3m-slices", default="0:10", help="CDeep3M slices scored (a:b or i,j,k)"
    )
    parser.add_argument(
        "--timing-slices", type=int, default=3, help="first N scored CDeep3M slices timed"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timing rounds")
    parser.add_argument(
        "--calibration-slices",
        type=int,
        default=4,
        help="int8 calibration: first N non-validation training slices (as the evaluate stage)",
    )
    parser.add_argument("--tolerance", type=float, default=0.005, help="largest |IoU - today's|")
    parser.add_argument("--tile-size", type=int, default=1536, help="single-tile variants")
    parser.add_argument("--small-tile", type=int, default=512, help="tiled-path variants")
    parser.add_argument("--threads", type=int, default=None, help="OpenVINO threads")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write here instead of benchmarks/results/inference_speed.json",
    )
    args = parser.parse_args()
    if args.repeats < 1 or args.timing_slices < 1:
        parser.error("--repeats and --timing-slices must be >= 1")

    run_start = time.perf_counter()
    model_path = _require(args.model, "trained model")
    images_path = _require(args.raw / "train" / "images.tif", "VNC training images")
    masks_path = _require(args.raw / "train" / "masks.tif", "VNC training masks")
    meta_path = _require(args.meta, "patch metadata (val_slices)")
    cdeep_path = _require(args.cdeep3m, "CDeep3M image stack (needs ../shared/data)")
    cdeep_mask_path = _require(args.cdeep3m_mask, "CDeep3M mask stack (needs ../shared/data)")

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import openvino
    import tifffile

    from mitoseg.inference.normalize import normalize_slice
    from mitoseg.inference.predict import predict_tiled
    from mitoseg.inference.runtime import available_engines, compile_predictor
    from mitoseg.model.analysis import halo_for, model_divisor, receptive_field

    model = keras.saving.load_model(str(model_path), compile=False)
    divisor = model_divisor(model)
    meta = json.loads(meta_path.read_text())
    vnc_images, vnc_masks = tifffile.imread(images_path), tifffile.imread(masks_path) > 0
    val = [int(i) for i in meta["val_slices"]]
    train = [i for i in range(vnc_images.shape[0]) if i not in set(val)]
    cdeep_images, cdeep_masks = tifffile.imread(cdeep_path), tifffile.imread(cdeep_mask_path) > 0
    scored = _slices(args.cdeep3m_slices, cdeep_images.shape[0])
    timed = scored[: args.timing_slices]
    sets = {
        "vnc_val": ([vnc_images[i] for i in val], [vnc_masks[i] for i in val]),
        "cdeep3m": ([cdeep_images[i] for i in scored], [cdeep_masks[i] for i in scored]),
    }
    inputs = {k: [normalize_slice(s) for s in imgs] for k, (imgs, _) in sets.items()}
    calibration = np.stack(
        [normalize_slice(vnc_images[i]) for i in train[: args.calibration_slices]]
    )

    keras_fp32 = compile_predictor(model)
    field = receptive_field(keras_fp32, probe=max(512, 4 * divisor))
    halo_eff, halo_full = halo_for(field["effective"]), halo_for(field["full"])
    print(f"receptive field {dict(field)}: halo {halo_eff} (effective), {halo_full} (full)")

    engines: dict[str, Any] = {"keras/fp32": keras_fp32}
    compile_seconds: dict[str, float] = {"keras/fp32": 0.0}
    errors: dict[str, str] = {}
    for runtime, precision in available_engines():
        name = f"{runtime}/{precision}"
        if name in engines:
            continue
        start = time.perf_counter()
        try:
            engines[name] = compile_predictor(
                model, runtime, precision, calibration=calibration, threads=args.threads
            )
        except Exception as exc:  # reported, not fatal: the other engines still run
            errors[name] = f"{type(exc).__name__}: {exc}"
            continue
        compile_seconds[name] = round(time.perf_counter() - start, 2)
        print(f"compiled {name} in {compile_seconds[name]} s")

    single = {"tile_size": args.tile_size, "halo": halo_eff, "batch_size": 1}
    tiled = {"tile_size": args.small_tile, "halo": halo_eff, "batch_size": 4}
    variants: list[dict[str, Any]] = [
        {
            "name": "today",
            "engine": "keras/fp32",
            "role": "today",
            "tiling": {"tile_size": 256, "overlap": 0.5, "batch_size": 8},
        }
    ]
    for name in engines:
        variants.append(
            {"name": f"{name} single", "engine": name, "role": "candidate", "tiling": single}
        )
    variants.append(
        {
            "name": "keras/fp32 single halo-full",
            "engine": "keras/fp32",
            "role": "candidate",
            "tiling": {**single, "halo": halo_full},
        }
    )
    for name in engines:
        variants.append(
            {
                "name": f"{name} tiles{args.small_tile}",
                "engine": name,
                "role": "candidate",
                "tiling": tiled,
            }
        )
    for name in engines:
        variants.append(
            {
                "name": f"{name} single border0",
                "engine": name,
                "role": "candidate",
                "note": "seam halo from the receptive field, but no reflect padding at the image "
                "border (the network's own zero padding there, as in the training crops)",
                "tiling": {**single, "border": 0},
            }
        )
    for name in engines:
        variants.append(
            {
                "name": f"{name} tiles{args.small_tile} border0",
                "engine": name,
                "role": "candidate",
                "tiling": {**tiled, "border": 0},
            }
        )

    def run(variant: dict[str, Any], x: np.ndarray) -> np.ndarray:
        return predict_tiled(x, engines[variant["engine"]], **variant["tiling"])

    # ---- IoU on every scored slice (also warms every engine up on every shape)
    references: dict[str, dict[str, list[np.ndarray]]] = {}
    results: dict[str, dict[str, Any]] = {}
    for v in variants:
        start = time.perf_counter()
        probs = {k: [run(v, x) for x in xs] for k, xs in inputs.items()}
        again = run(v, inputs["cdeep3m"][0])
        iou = {
            k: round(_iou([p[..., 0] >= args.threshold for p in probs[k]], sets[k][1]), 6)
            for k in sets
        }
        ny, hy = _tiles(1024, v["tiling"], divisor)
        r: dict[str, Any] = {
            "engine": v["engine"],
            "role": v["role"],
            "tiling": v["tiling"],
            "tiles_per_1024_slice": ny * ny,
            "forward_pixels_per_1024_slice": ny * ny * hy * hy,
            "iou": iou,
            "deterministic": bool(np.array_equal(again, probs["cdeep3m"][0])),
            "compile_seconds": compile_seconds[v["engine"]],
            "scoring_seconds": round(time.perf_counter() - start, 2),
        }
        if "note" in v:
            r["note"] = v["note"]
        key = json.dumps(v["tiling"], sort_keys=True)
        if v["engine"] == "keras/fp32":
            references.setdefault(key, probs)
        elif key in references:
            ref = references[key]
            diffs = [np.abs(p - q) for k in probs for p, q in zip(probs[k], ref[k], strict=True)]
            flips = [
                np.mean((p[..., 0] >= args.threshold) != (q[..., 0] >= args.threshold))
                for k in probs
                for p, q in zip(probs[k], ref[k], strict=True)
            ]
            r["vs_keras_fp32_same_tiling"] = {
                "max_abs_prob_diff": round(float(max(d.max() for d in diffs)), 6),
                "mean_abs_prob_diff": round(float(np.mean([d.mean() for d in diffs])), 7),
                "mask_pixels_changed": round(float(np.mean(flips)), 7),
            }
        results[v["name"]] = r
        print(f"{v['name']}: IoU {iou} ({r['scoring_seconds']} s)", flush=True)
        del probs

    # ---- timing: whole slice (normalise, predict, threshold), variants interleaved
    times: dict[str, list[float]] = {v["name"]: [] for v in variants}
    for _ in range(args.repeats):
        for v in variants:
            for i in timed:
                start = time.perf_counter()
                p = run(v, normalize_slice(cdeep_images[i]))
                _ = p[..., 0] >= args.threshold
                times[v["name"]].append(time.perf_counter() - start)
    today = results["today"]
    today_s = float(np.median(times["today"]))
    for v in variants:
        r = results[v["name"]]
        median = float(np.median(times[v["name"]]))
        r["seconds_per_slice_median"] = round(median, 4)
        r["seconds_per_slice_min"] = round(min(times[v["name"]]), 4)
        r["seconds_per_slice_all"] = [round(t, 4) for t in times[v["name"]]]
        r["speedup_vs_today"] = round(today_s / median, 2)
        r["speedup_vs_today_min"] = round(min(times["today"]) / min(times[v["name"]]), 2)
        r["iou_delta_vs_today"] = {k: round(r["iou"][k] - today["iou"][k], 6) for k in sets}
        r["eligible"] = v["role"] != "diagnostic" and all(
            d >= -args.tolerance for d in r["iou_delta_vs_today"].values()
        )
        print(
            f"{v['name']}: {median:.3f} s/slice, x{r['speedup_vs_today']}, "
            f"dIoU {r['iou_delta_vs_today']}, eligible {r['eligible']}"
        )
    eligible = [
        (results[v["name"]]["seconds_per_slice_min"], v["name"])
        for v in variants
        if v["role"] == "candidate" and results[v["name"]]["eligible"]
    ]
    recommended = min(eligible)[1] if eligible else "today"
    results[recommended]["recommended"] = True

    flags = cpu_flags()
    core = openvino.Core()
    data = {
        "what": "seconds per 1024x1024 CDeep3M slice (normalise, predict, threshold) and "
        "foreground IoU against ground truth, every variant in one run; today = Keras FP32, "
        "256 tiles, overlap 0.5, batch 8, blended",
        "eligibility": f"IoU at most {args.tolerance} below today's on every scored set "
        "(vnc_val and cdeep3m), diagnostic variants excluded",
        "recommended": recommended,
        "recommended_by": "fastest eligible candidate by seconds_per_slice_min (the fastest "
        "timed run of each variant: other load on a shared machine only adds time)",
        "recommended_speedup_vs_today": results[recommended]["speedup_vs_today"],
        "recommended_speedup_vs_today_min": results[recommended]["speedup_vs_today_min"],
        "today_seconds_per_slice": round(today_s, 4),
        "speedup_basis": "median seconds per slice (speedup_vs_today_min: fastest run of each, "
        "less sensitive to other load on a shared machine)",
        "run_seconds": round(time.perf_counter() - run_start, 1),
        "machine": machine(),
        "cpu_isa": [f for f in ISA_FLAGS if f in flags],
        "cpu_flags": flags,
        "threads": {
            "openvino": args.threads or len(os.sched_getaffinity(0)),
            "cpus_available": len(os.sched_getaffinity(0)),
        },
        "software": {
            "python": sys.version.split()[0],
            "keras": keras.__version__,
            "openvino": openvino.__version__,
            "nncf": _version("nncf"),
            "openvino_cpu_capabilities": [
                str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
            ],
        },
        "model": str(model_path),
        "params": int(model.count_params()),
        "divisor": divisor,
        "receptive_field": dict(field),
        "halo": {"effective": halo_eff, "full": halo_full},
        "data": {
            "vnc_val": {"images": str(images_path), "slices": val},
            "cdeep3m": {"images": str(cdeep_path), "slices": scored, "timed": timed},
            "int8_calibration": {
                "images": str(images_path),
                "slices": train[: args.calibration_slices],
            },
        },
        "repeats": args.repeats,
        "threshold": args.threshold,
        "engine_errors": errors,
        "variants": results,
    }
    if args.out is None:
        save("inference_speed", data)
    else:
        from mitoseg.io import write_json

        write_json(args.out, data)
        print(f"wrote {args.out}")
    summary = [
        f"{name:30s} {r['seconds_per_slice_median']:6.3f} s (min {r['seconds_per_slice_min']:.3f})"
        f"  x{r['speedup_vs_today']:<6} "
        f"IoU {r['iou']}  eligible={r['eligible']}"
        for name, r in results.items()
    ]
    print("\n".join(summary))
    print(f"recommended: {recommended}")


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
