"""Training speed: patches/s of the default recipe vs the seed recipe, in one run.

Synthetic 256x256 patches (bright ellipses on noise); the first epoch (graph tracing)
is excluded by ``train_model``. Ratios are what matter: machines differ by 2x or more.

Usage: python benchmarks/train_speed.py [--steps 15]
Writes benchmarks/results/train_speed.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from common import machine, save
from mitoseg.config import AugmentConfig, resolve_train_config
from mitoseg.io import write_json


def synthetic_patches(out: Path, n: int = 32, size: int = 256, seed: int = 0) -> None:
    """Write ``{train,val}_{images,masks}.npy`` + meta.json with ellipse 'mitochondria'."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, masks = [], []
    for _ in range(n):
        mask = np.zeros((size, size), bool)
        for _ in range(rng.integers(2, 6)):
            cy, cx = rng.integers(0, size, 2)
            ry, rx = rng.integers(8, 30, 2)
            mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        img = rng.normal(110, 25, (size, size)) + 60 * mask
        images.append(np.clip(img, 0, 255).astype(np.uint8))
        masks.append(mask.astype(np.uint8))
    out.mkdir(parents=True, exist_ok=True)
    k = n * 3 // 4
    for split, sl in (("train", slice(0, k)), ("val", slice(k, n))):
        np.save(out / f"{split}_images.npy", np.stack(images[sl]))
        np.save(out / f"{split}_masks.npy", np.stack(masks[sl]))
    write_json(
        out / "meta.json", {"n_classes": 2, "class_names": ["bg", "mito"], "patch_size": size}
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=15, help="steps per epoch (2 epochs)")
    args = parser.parse_args()

    from mitoseg.train import train_model

    cases = {
        "default_crop128": {"preset": "default"},
        "default_patch256": {"preset": "default", "crop_size": None},
        "seed_patch256": {"preset": "seed"},
    }
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        patches = Path(tmp) / "patches"
        synthetic_patches(patches)
        for name, section in cases.items():
            cfg = resolve_train_config(
                {
                    **section,
                    "epochs": 2,
                    "steps_per_epoch": args.steps,
                    "early_stopping_patience": 10,
                }
            )
            res = train_model(
                patches,
                AugmentConfig(),
                cfg,
                2,
                0,
                Path(tmp) / name,
                Path(tmp) / "ckpt",
                progress=False,
            )
            crop = cfg.crop_size or 256
            results[name] = {
                "patches_per_second": round(res.patches_per_second, 3),
                "megapixels_per_second": round(res.patches_per_second * crop * crop / 1e6, 3),
                "input_size": crop,
                "batch_size": cfg.batch_size,
                "base_filters": cfg.model.base_filters,
            }
            print(name, json.dumps(results[name]))
    seed = results["seed_patch256"]
    save(
        "train_speed",
        {
            "what": "training throughput (augmentation on), 2 epochs x "
            f"{args.steps} steps, first epoch excluded, fp32, synthetic 256x256 patches",
            "machine": machine(),
            "results": results,
            "ratio_patches_per_s_default_crop128_vs_seed": round(
                results["default_crop128"]["patches_per_second"] / seed["patches_per_second"], 2
            ),
            "ratio_patches_per_s_default_patch256_vs_seed": round(
                results["default_patch256"]["patches_per_second"] / seed["patches_per_second"], 2
            ),
            "ratio_pixels_per_s_default_crop128_vs_seed": round(
                results["default_crop128"]["megapixels_per_second"] / seed["megapixels_per_second"],
                2,
            ),
        },
    )


if __name__ == "__main__":
    main()
