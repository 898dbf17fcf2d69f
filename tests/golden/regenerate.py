"""Regenerate the golden test data (tests/golden/*): a small stored model and a real EM crop.

The model is a small UNet (depth 4, base 8 filters) trained by the library's own
``train_model`` on the bundled VNC sample's train split; the crop and its ground-truth
mask come from the sample's *test* split (never trained on). ``golden.json`` records the
Dice measured at generation time; ``tests/unit/test_golden.py`` checks that the current
inference code still reaches it (within a small tolerance) and still predicts the stored
mask.

Usage (from the repo root, ~5 min on 2 CPU cores):
    python tests/golden/regenerate.py [--budget 240]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np

from mitoseg.config import AugmentConfig, BaseConfig, PatchifyConfig, resolve_train_config
from mitoseg.data.fetch import fetch
from mitoseg.data.layout import read_split
from mitoseg.data.patches import make_patch_dataset
from mitoseg.io import write_json, write_stack

HERE = Path(__file__).resolve().parent
#: The crop: test slice 2 (slice 17 of the VNC stack), rows 128-383, columns 192-575.
SLICE, ROWS, COLS = 2, slice(128, 384), slice(192, 576)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=240)
    args = parser.parse_args()

    from mitoseg.inference.predict import segment_stack
    from mitoseg.metrics import evaluate_masks
    from mitoseg.train import train_model

    base = BaseConfig(seed=7)
    with tempfile.TemporaryDirectory() as tmp:
        raw, patches = Path(tmp) / "raw", Path(tmp) / "patches"
        fetch("sample", raw, progress=False)
        make_patch_dataset(raw, patches, base, PatchifyConfig(), base.seed)
        cfg = resolve_train_config(
            {
                "preset": "default",
                "model": {"base_filters": 8},
                "epochs": 1000,
                "steps_per_epoch": 30,
                "max_train_seconds": args.budget,
            }
        )
        res = train_model(
            patches, AugmentConfig(), cfg, 2, base.seed, Path(tmp) / "out", Path(tmp) / "ck"
        )
        shutil.copyfile(res.model_path, HERE / "model.keras")
        images, masks = read_split(raw, "test")

    crop = images[SLICE, ROWS, COLS]
    truth = (masks[SLICE, ROWS, COLS] > 0).astype(np.uint8)
    import keras

    model = keras.models.load_model(HERE / "model.keras", compile=False)
    from mitoseg.model.analysis import default_plan

    plan = default_plan(model).with_overrides(tile_size=256, halo=64, threshold=0.5)
    pred = segment_stack(model, crop, plan)[0]
    dice = evaluate_masks(truth[None], pred[None], 2)[0]["dice"]
    write_stack(HERE / "crop.tif", crop)
    write_stack(HERE / "expected_mask.tif", truth * 255)
    write_stack(HERE / "predicted_mask.tif", pred * 255)
    write_json(
        HERE / "golden.json",
        {
            "source": "bundled VNC sample, test split slice 2, rows 128-383, cols 192-575",
            "model": "UNet depth 4, base 8, default recipe, "
            f"{res.epochs_run} epochs in {res.train_seconds:.0f} s",
            "threshold": 0.5,
            "tile_size": 256,
            "halo": 64,
            "dice_vs_expected": round(float(dice), 4),
        },
    )
    print(f"dice vs expected mask: {dice:.4f}")


if __name__ == "__main__":
    main()
