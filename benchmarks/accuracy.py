"""Accuracy at equal CPU wall-clock budget: the default recipe vs the `seed` preset.

Data: the labelled CDeep3M slices in ../shared/data (20 x 1024 x 1024), split slice-wise:
slices 0-14 train (of which the patchify stage holds 25 % of the slices out for
validation / threshold choice), slices 15-19 test. Each recipe trains under the same
``max_train_seconds`` budget, then is scored on the test slices with the same whole-slice
tiled inference (overlap 0.5, threshold chosen on the validation slices).

``--dataset vnc-labels`` runs the multiclass case on the bundled VNC label map instead
(default recipe only unless --recipes says otherwise; mean IoU over 5 classes).

Usage:
    python benchmarks/accuracy.py --budget 600
    python benchmarks/accuracy.py --dataset vnc-labels --budget 300 --recipes default
Writes benchmarks/results/accuracy_<dataset>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from common import ROOT, cdeep3m_split_manifest, machine, save
from mitoseg.config import (
    VNC_CLASSES,
    AugmentConfig,
    BaseConfig,
    EvaluateConfig,
    PatchifyConfig,
    resolve_train_config,
)
from mitoseg.data.fetch import fetch
from mitoseg.data.layout import read_split
from mitoseg.data.patches import make_patch_dataset


def prepare(dataset: str, work: Path) -> tuple[Path, Path, BaseConfig]:
    """Fetch ``dataset`` into ``work/raw`` and patchify it into ``work/patches``."""
    raw, patches = work / "raw", work / "patches"
    if dataset == "cdeep3m":
        base = BaseConfig(seed=42)
        source = str(cdeep3m_split_manifest(work / "cdeep3m_split.yaml"))
        fetch(source, raw, progress=False, force=True)
    elif dataset == "vnc-labels":
        base = BaseConfig(seed=42, classes=VNC_CLASSES)
        fetch("sample", raw, mask_kind="labels", progress=False, force=True)
    else:
        raise SystemExit(f"unknown dataset {dataset!r}")
    if patches.exists():
        shutil.rmtree(patches)
    make_patch_dataset(raw, patches, base, PatchifyConfig(), base.seed)
    return raw, patches, base


def run_recipe(
    name: str, budget: float, raw: Path, patches: Path, base: BaseConfig, work: Path
) -> dict:
    """Train ``name`` under ``budget`` seconds, then evaluate on the test split."""
    from mitoseg.evaluate import masks_to_indices
    from mitoseg.planner import evaluate_split, make_plan
    from mitoseg.tracking import load_model
    from mitoseg.train import train_model

    cfg = resolve_train_config(
        {
            "preset": name,
            "max_train_seconds": budget,
            "epochs": 1000,
            **({"steps_per_epoch": 40} if name == "default" else {}),
        }
    )
    out = work / f"train_{name}"
    t0 = time.perf_counter()
    res = train_model(
        patches, AugmentConfig(), cfg, base.n_classes, base.seed, out, work / "ckpt", progress=True
    )
    wall = time.perf_counter() - t0
    model = load_model(str(res.model_path))

    meta = json.loads((patches / "meta.json").read_text())
    images, masks = read_split(raw, "train")
    v2i = base.value_to_index()
    val_idx = meta["val_slices"]
    # The same plan decision as the evaluate stage (threshold and engine on validation).
    plan, _ = make_plan(
        model,
        EvaluateConfig(),
        base.class_names,
        images[val_idx] if val_idx else None,
        masks_to_indices(masks[val_idx], v2i, "val") if val_idx else None,
    )
    threshold = plan.threshold
    test_images, test_masks = read_split(raw, "test")
    t1 = time.perf_counter()
    result = evaluate_split(model, plan, test_images, masks_to_indices(test_masks, v2i, "test"))
    eval_s = time.perf_counter() - t1
    m = result.metrics
    return {
        "preset": name,
        "params": int(model.count_params()),
        "train_budget_s": budget,
        "train_wall_s": round(wall, 1),
        "epochs_run": res.epochs_run,
        "best_epoch": res.best_epoch,
        "stop_reason": res.stop_reason,
        "train_patches_per_s": round(res.patches_per_second, 3),
        "threshold": threshold,
        "test": {k: m[k] for k in ("iou", "mean_iou", "dice", "accuracy", "precision", "recall")},
        "per_class": m.get("per_class"),
        "objects": m.get("objects"),
        "eval_seconds_per_slice": round(eval_s / len(test_images), 2),
        "resolved_config": cfg.model_dump(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="cdeep3m", choices=["cdeep3m", "vnc-labels"])
    parser.add_argument("--budget", type=float, default=600, help="train seconds per recipe")
    parser.add_argument("--recipes", nargs="+", default=["default", "seed"])
    args = parser.parse_args()

    work = ROOT / "benchmarks" / ".work" / args.dataset
    work.mkdir(parents=True, exist_ok=True)
    raw, patches, base = prepare(args.dataset, work)
    meta = json.loads((patches / "meta.json").read_text())
    runs = {}
    for name in args.recipes:
        runs[name] = run_recipe(name, args.budget, raw, patches, base, work)
        print(name, json.dumps(runs[name]["test"]), flush=True)
    summary = {}
    if "default" in runs and "seed" in runs:
        d, s = runs["default"], runs["seed"]
        summary = {
            "iou_default_minus_seed": round(d["test"]["iou"] - s["test"]["iou"], 4),
            "train_patches_per_s_ratio": round(
                d["train_patches_per_s"] / max(s["train_patches_per_s"], 1e-9), 2
            ),
            "default_beats_seed_iou": d["test"]["iou"] > s["test"]["iou"],
        }
    save(
        f"accuracy_{args.dataset}",
        {
            "what": "equal CPU wall-clock training budget per recipe, then whole-slice tiled "
            "evaluation (256 tiles, overlap 0.5) on held-out slices",
            "dataset": args.dataset,
            "split": {
                "train_slices": meta["train_slices"],
                "val_slices": meta["val_slices"],
                "test_slices": int(np.asarray(read_split(raw, "test")[0]).shape[0]),
            },
            "classes": base.class_names,
            "machine": machine(),
            "runs": runs,
            "summary": summary,
        },
    )


if __name__ == "__main__":
    main()
