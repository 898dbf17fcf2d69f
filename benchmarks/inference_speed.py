"""Whole-slice inference speed: seconds per 1024x1024 slice with overlapping tiles and
blending, for the default and the seed architectures (untrained weights: speed only).

Usage: python benchmarks/inference_speed.py [--repeats 3] [--overlap 0.5]
Writes benchmarks/results/inference_speed.json.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from common import machine, save
from mitoseg.config import resolve_train_config
from mitoseg.inference import segment_stack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    from mitoseg.model.unet import build_unet

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (1, args.size, args.size), dtype=np.uint8)
    results = {}
    for preset in ("default", "seed"):
        cfg = resolve_train_config({"preset": preset})
        model = build_unet(cfg.model, n_classes=2)
        for tta in (False, True):
            kw = dict(tile_size=256, overlap=args.overlap, batch_size=args.batch_size, tta=tta)
            segment_stack(model, image[:, :256, :256], **kw)  # warm-up / graph trace
            times = []
            for _ in range(args.repeats if not tta else 1):
                t0 = time.perf_counter()
                segment_stack(model, image, **kw)
                times.append(time.perf_counter() - t0)
            key = f"{preset}{'_tta' if tta else ''}"
            results[key] = {
                "params": int(model.count_params()),
                "seconds_per_slice_median": float(np.median(times)),
                "seconds_per_slice_all": [round(t, 3) for t in times],
                "tta": tta,
            }
            print(key, results[key])
    save(
        "inference_speed",
        {
            "what": f"whole-slice inference, {args.size}x{args.size} uint8 slice, 256 tiles, "
            f"overlap {args.overlap}, smooth blending, batch {args.batch_size}, fp32",
            "machine": machine(),
            "results": results,
            "speedup_default_vs_seed": results["seed"]["seconds_per_slice_median"]
            / results["default"]["seconds_per_slice_median"],
        },
    )


if __name__ == "__main__":
    main()
