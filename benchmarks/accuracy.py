"""Accuracy that holds away from the training slices: recipes side by side, IoU vs CPU time.

Neighbouring EM sections are nearly the same image, so a test split next to the training
slices overstates accuracy. Splits (slice ranges of a 20-slice labelled stack):

* ``gap`` (default): train on slices 0-9 (the patchify stage holds 25 % of them out for
  validation, i.e. threshold and plan choice), skip 10-14, test on 15-19;
* ``adjacent``: train 0-14, test 15-19 (the old README figure, for comparison);
* ``cross``: train on the whole VNC stack, test on CDeep3M slices 15-19 (another volume,
  another lab; no rescaling: the CDeep3M voxel size is not recorded in ``../shared``).

Each recipe (``seed``, ``default``, or any preset) trains once under ``--budget`` minutes
of wall clock; the model is snapshotted when the training time passes each of
``--curve`` minutes, and every snapshot gets the evaluate stage's own plan decision
(:func:`mitoseg.planner.make_plan`, threshold on the validation slices) and is scored on
the test slices (:func:`mitoseg.planner.evaluate_split`): IoU, Dice, precision, recall,
object F1. Datasets: ``cdeep3m`` (``../shared/data/cdeep3m``, 20 x 1024 x 1024) and ``vnc``
(``../shared/data/vnc``, 20 x 1024 x 1024).

Usage:
    python benchmarks/accuracy.py --dataset cdeep3m --split gap --budget 30 \\
        --curve 5 10 30 --recipes seed default
Writes benchmarks/results/accuracy_<dataset>_<split>.json. Keep the machine otherwise idle.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from common import ROOT, SHARED, machine, save
from mitoseg.config import (
    AugmentConfig,
    BaseConfig,
    EvaluateConfig,
    PatchifyConfig,
    resolve_train_config,
)
from mitoseg.data.fetch import fetch
from mitoseg.data.layout import read_split
from mitoseg.data.patches import make_patch_dataset

#: Recipes compared: overrides of the ``patchify``, ``augment`` and ``train`` sections
#: (over their defaults) and the ``evaluate`` settings the plan is decided with. ``v1`` pins
#: the default recipe before the distant-slice work (issue 10), so it stays reproducible
#: after the default changes; ``seed`` and ``v1`` are planned without z-averaging or
#: hysteresis, as they were (the validation slices are now one block of consecutive
#: sections for all).
V1_TRAIN: dict[str, Any] = {
    "preset": "default",
    "model": {"depth": 4, "base_filters": 16, "batch_norm": True, "dropout": 0.1},
    "loss": "bce_dice",
    "learning_rate": 1e-3,
    "batch_size": 8,
    "crop_size": 128,
    "foreground_crop_prob": 0.5,
    "hard_negative_prob": 0.0,
}
V1_AUGMENT: dict[str, Any] = {"brightness": 0.1, "contrast": 0.2, "gamma": 0.2}
V1_EVALUATE: dict[str, Any] = {"z_average": 0, "seed_threshold": None}
RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "seed": {"train": {"preset": "seed"}, "evaluate": V1_EVALUATE},
    "v1": {
        "train": V1_TRAIN,
        "augment": V1_AUGMENT,
        "patchify": {"z_context": 0},
        "evaluate": V1_EVALUATE,
    },
    "v1+2.5d": {"train": V1_TRAIN, "augment": V1_AUGMENT, "patchify": {"z_context": 1}},
    "v1+hardneg": {
        "train": {**V1_TRAIN, "foreground_crop_prob": 0.4, "hard_negative_prob": 0.3},
        "augment": V1_AUGMENT,
    },
    "v1+crop256": {"train": {**V1_TRAIN, "crop_size": 256, "batch_size": 2}, "augment": V1_AUGMENT},
    "v1+bce": {"train": {**V1_TRAIN, "loss": "bce"}, "augment": V1_AUGMENT},
    "v1+wideint": {
        "train": V1_TRAIN,
        "augment": {"brightness": 0.2, "contrast": 0.4, "gamma": 0.4},
    },
    "default": {},  # whatever params defaults and the default preset say today
}

STACKS = {
    "cdeep3m": ("cdeep3m/cdeep3m_train_raw.tif", "cdeep3m/cdeep3m_train_mito.tif"),
    "vnc": ("vnc/vnc_stack1_raw.tif", "vnc/vnc_stack1_mito.tif"),
}
SPLITS = {"gap": ((0, 10), (15, 20)), "adjacent": ((0, 15), (15, 20))}


def _entry(dataset: str, slices: tuple[int, int]) -> dict[str, Any]:
    image, mask = (SHARED / p for p in STACKS[dataset])
    if not image.is_file() or not mask.is_file():
        raise SystemExit(f"{image}: not found (this benchmark needs ../shared/data)")
    return {"image": str(image), "mask": str(mask), "slices": list(slices)}


def prepare(dataset: str, split: str, work: Path) -> tuple[Path, BaseConfig, dict]:
    """Write the split's manifest and fetch it into ``work/raw``."""
    if split == "cross":
        train, test = _entry("vnc", (0, 20)), _entry("cdeep3m", (15, 20))
    else:
        tr, te = SPLITS[split]
        train, test = _entry(dataset, tr), _entry(dataset, te)
    return fetch_split(train, test, work)


def fetch_split(train: dict, test: dict, work: Path) -> tuple[Path, BaseConfig, dict]:
    """Fetch manifest entries (:func:`_entry`) into the canonical layout ``work/raw``."""
    manifest = work / "manifest.yaml"
    work.mkdir(parents=True, exist_ok=True)
    manifest.write_text(yaml.safe_dump({"train": [train], "test": [test]}))
    raw = work / "raw"
    base = BaseConfig(seed=42)
    fetch(str(manifest), raw, progress=False, force=True)
    return raw, base, {"train": train, "test": test}


def patches_dir(work: Path, cfg: PatchifyConfig) -> Path:
    """Where :func:`patchify` writes the patches of ``cfg`` under ``work``."""
    return work / f"patches_z{cfg.z_context}_p{cfg.patch_size}"


def patchify(raw: Path, work: Path, base: BaseConfig, cfg: PatchifyConfig) -> Path:
    """The patchify stage for one recipe's ``patchify`` settings, written again each call
    into :func:`patches_dir`."""
    patches = patches_dir(work, cfg)
    if patches.exists():
        shutil.rmtree(patches)
    make_patch_dataset(raw, patches, base, cfg, base.seed)
    return patches


def _snapshot_callback(out: Path, minutes: list[float]) -> Any:
    import keras

    class Snapshots(keras.callbacks.Callback):
        """Save the model when the training time first passes each of ``minutes``."""

        def __init__(self) -> None:
            super().__init__()
            self.pending = sorted(minutes)
            self.saved: list[tuple[float, Path, int]] = []

        def on_train_begin(self, logs: dict | None = None) -> None:
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            elapsed = (time.perf_counter() - self.start) / 60.0
            while self.pending and elapsed >= self.pending[0]:
                m = self.pending.pop(0)
                path = out / f"snapshot_{m:g}min.keras"
                self.model.save(path)
                self.saved.append((m, path, epoch + 1))

    return Snapshots()


#: Unlabelled CDeep3M slices 081-085, 50+ sections from the labelled 010-029: how much a
#: model calls mitochondria far away (the labelled slices are 8.8 % foreground).
DISTANT = "cdeep3m/cdeep3m_test_raw.tif"
#: an object at least this elongated (major / minor axis) counts as long
LONG = 3.0


def slice_ious(rows: list[dict[str, Any]]) -> list[float]:
    """Test IoU of each slice in z order (:attr:`EvaluationResult.rows`): at a stack's end
    slices 2.5D input and z-averaging read the end slice again where a neighbour would be."""
    return [round(float(row["iou"]), 4) for row in rows]


def false_objects(pred: np.ndarray, truth: np.ndarray, min_size: int) -> dict[str, float]:
    """Predicted objects with no labelled mitochondrion under them, by shape.

    The failure issue 19 names: whole objects called mitochondria where the labels have
    none, mostly long, evenly dark processes. Objects are 8-connected within one slice.

    Args:
        pred: ``(Z, H, W)`` predicted class indexes (foreground ``!= 0``).
        truth: ``(Z, H, W)`` labelled class indexes.
        min_size: objects smaller than this many pixels are not counted (the plan's).

    Returns:
        per slice: ``false_objects``, ``long_false_objects`` (elongation >= :data:`LONG`)
        and ``long_false_pixels`` (their pixels, as a fraction of the slice).
    """
    from mitoseg.inference.objects import measure_objects
    from mitoseg.metrics import label_objects

    counts = {"false_objects": 0, "long_false_objects": 0, "long_false_pixels": 0}
    for p, t in zip(pred, truth, strict=True):
        labels, n = label_objects(p, min_size)
        if n == 0:
            continue
        hit = np.zeros(n + 1, bool)
        hit[labels[(t != 0) & (labels > 0)]] = True
        for row in measure_objects(labels):
            if hit[row["id"]]:
                continue
            counts["false_objects"] += 1
            if row["elongation"] >= LONG:
                counts["long_false_objects"] += 1
                counts["long_false_pixels"] += row["voxels"]
    z = len(pred)
    return {
        "false_objects": round(counts["false_objects"] / z, 2),
        "long_false_objects": round(counts["long_false_objects"] / z, 2),
        "long_false_pixels": round(counts["long_false_pixels"] / pred[0].size / z, 5),
    }


def _distant(model: Any, plan: Any, figure: Path | None) -> dict[str, Any] | None:
    """Foreground fraction, objects per slice and long objects per slice (elongation >=
    :data:`LONG`: the long dark processes the distant false positives mostly are) on
    :data:`DISTANT` (no labels), and an overlay of its first slice written to ``figure``."""
    from mitoseg.inference.objects import measure_objects
    from mitoseg.inference.predict import segment_stack
    from mitoseg.io import read_stack
    from mitoseg.metrics import label_objects

    path = SHARED / DISTANT
    if not path.is_file():
        return None
    stack = read_stack(path)
    masks = segment_stack(model, stack, plan)
    labelled = [label_objects(m, plan.min_object_size) for m in masks]
    objects = [n for _, n in labelled]
    long_ = [
        sum(row["elongation"] >= LONG for row in measure_objects(lab)) if n else 0
        for lab, n in labelled
    ]
    if figure is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 8), dpi=80)
        ax.imshow(stack[0], cmap="gray")
        ax.imshow(np.ma.masked_equal(masks[0], 0), cmap="autumn", alpha=0.45)
        ax.set_axis_off()
        fig.savefig(figure, bbox_inches="tight")
        plt.close(fig)
    return {
        "foreground_fraction": round(float((masks != 0).mean()), 4),
        "objects_per_slice": round(float(np.mean(objects)), 1),
        "long_objects_per_slice": round(float(np.mean(long_)), 1),
        # each slice in z order: an end slice is its own missing neighbour
        "per_slice": {
            "foreground_fraction": [round(float((m != 0).mean()), 4) for m in masks],
            "objects": [int(n) for n in objects],
            "long_objects": [int(n) for n in long_],
        },
    }


def plan_split(raw: Path, patches: Path, base: BaseConfig, plan_on: str) -> dict[str, Any]:
    """The slices a plan is chosen and scored on, as the evaluate stage reads them.

    Args:
        raw: the canonical layout (``train/``, ``test/``).
        patches: the patchify output whose ``meta.json`` names the validation block.
        base: class table.
        plan_on: ``evaluate.plan_on`` (:func:`mitoseg.planner.planning_slices`).

    Returns:
        ``val_images`` / ``val_masks``: the slices of the training stack the plan is
        chosen on (``(V, H, W)`` raw and class indexes; None when there are none),
        ``engine_slices``: the validation block's positions among them,
        ``test_images`` / ``test_masks``: the test slices (``(T, H, W)``).
    """
    from mitoseg.evaluate import masks_to_indices
    from mitoseg.planner import planning_slices

    images, masks = read_split(raw, "train")
    val = json.loads((patches / "meta.json").read_text())["val_slices"]
    chosen_on, engine_slices = planning_slices(len(images), val, plan_on)
    test_images, test_masks = read_split(raw, "test")
    v2i = base.value_to_index()
    return {
        "val_images": images[chosen_on] if chosen_on else None,
        "val_masks": masks_to_indices(masks[chosen_on], v2i, "val") if chosen_on else None,
        "engine_slices": engine_slices,
        "test_images": test_images,
        "test_masks": masks_to_indices(test_masks, v2i, "test"),
    }


def _score(
    model: Any,
    raw: Path,
    patches: Path,
    base: BaseConfig,
    figure: Path | None = None,
    evaluate: dict[str, Any] | None = None,
) -> dict[str, Any]:
    from mitoseg.planner import evaluate_split, make_plan

    cfg = EvaluateConfig(**{**(evaluate or {}), "engines": ["keras/fp32"]})
    data = plan_split(raw, patches, base, cfg.plan_on)
    plan, _ = make_plan(
        model,
        cfg,
        base.class_names,
        data["val_images"],
        data["val_masks"],
        engine_slices=data["engine_slices"],
    )
    res = evaluate_split(model, plan, data["test_images"], data["test_masks"])
    m = res.metrics
    out = {k: round(float(m[k]), 4) for k in ("iou", "dice", "precision", "recall")}
    out["object_f1"] = round(float(m["objects"]["f1"]), 4)
    out["test_slice_iou"] = slice_ious(res.rows)
    out["test_slices"] = false_objects(res.predictions, res.masks, plan.min_object_size)
    out["threshold"] = plan.threshold
    out["border"] = plan.border
    out["z_average"] = plan.z_average
    out["seed_threshold"] = plan.seed_threshold
    out["plan_on"] = cfg.plan_on
    distant = _distant(model, plan, figure)
    if distant is not None:
        out["distant_unlabelled"] = distant
    return out


def run_recipe(
    name: str, budget_min: float | None, steps: int | None, curve: list[float], raw: Path,
    base: BaseConfig, work: Path, *, init_from: Path | None = None, label: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Train recipe ``name`` once for ``budget_min`` minutes (or ``steps`` optimizer steps,
    for machine-independent comparisons), scoring a snapshot at each ``curve`` minute.
    ``init_from``: fine-tune from this ``.keras`` model (``train.init_from``)."""
    import keras

    from mitoseg.train import initial_weights, train_model

    recipe = RECIPES[name]
    train = dict(recipe.get("train", {}))
    if init_from is not None:
        train["init_from"] = str(init_from)
    per_epoch = None if train.get("preset") == "seed" else 40
    bound: dict[str, Any] = (
        {"max_train_seconds": budget_min * 60, "epochs": 100000}
        if budget_min is not None
        else {"epochs": max(1, round((steps or 0) / (per_epoch or 1)))}
    )
    cfg = resolve_train_config(
        {
            **train,
            **bound,
            "early_stopping_patience": 100000,  # the budget ends it: use all of it
            **({"steps_per_epoch": per_epoch} if per_epoch else {}),
        }
    )
    augment = AugmentConfig(**recipe.get("augment", {}))
    patches = patchify(raw, work, base, PatchifyConfig(**recipe.get("patchify", {})))
    out = work / f"train_{label or name}"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    snaps = _snapshot_callback(out, [m for m in curve if budget_min is None or m < budget_min])
    init = None
    if init_from is not None:
        init = initial_weights(keras.saving.load_model(init_from, compile=False), cfg, 2)
    t0 = time.perf_counter()
    ckpt = work / "ckpt" / (label or name)  # fresh: never resume an earlier invocation
    if ckpt.exists():
        shutil.rmtree(ckpt)
    res = train_model(
        patches, augment, cfg, base.n_classes, base.seed, out, ckpt,
        progress=True, callbacks=[snaps], init_weights=init,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    points = []
    # the snapshots, then what the train stage would register (best validation epoch)
    end = budget_min if budget_min is not None else round(wall / 60, 2)
    for minutes, path, epoch in [*snaps.saved, (end, res.model_path, res.best_epoch)]:
        model = keras.saving.load_model(path, compile=False)
        figure = out / f"distant_{minutes:g}min.png"
        points.append(
            {
                "train_minutes": minutes,
                "epoch": epoch,
                **_score(model, raw, patches, base, figure, recipe.get("evaluate")),
            }
        )
        print(name, points[-1], flush=True)
    return {
        "recipe": recipe,
        "train_wall_s": round(wall, 1),
        "epochs_run": res.epochs_run,
        "stop_reason": res.stop_reason,
        "train_patches_per_s": round(res.patches_per_second, 3),
        "curve": points,
        "resolved_config": {
            "train": cfg.model_dump(),
            "augment": augment.model_dump(),
            "patchify": json.loads((patches / "meta.json").read_text())["z_context"],
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="cdeep3m", choices=sorted(STACKS))
    parser.add_argument("--split", default="gap", choices=[*SPLITS, "cross"])
    parser.add_argument("--budget", type=float, default=30, help="training minutes per recipe")
    parser.add_argument(
        "--budget-for",
        nargs="+",
        default=[],
        metavar="RECIPE=MINUTES",
        help="another budget for some recipes, e.g. seed=10",
    )
    parser.add_argument(
        "--steps", type=int, help="bound each recipe by optimizer steps instead of --budget"
    )
    parser.add_argument("--curve", type=float, nargs="+", default=[5, 10, 30, 60])
    parser.add_argument("--recipes", nargs="+", default=["seed", "v1", "default"])
    parser.add_argument("--tag", default="", help="suffix of the result file name")
    parser.add_argument(
        "--init-from",
        type=Path,
        help="fine-tune every recipe from this .keras model (train.init_from), e.g. one "
        "pre-trained on VNC by benchmarks/finetune.py",
    )
    args = parser.parse_args()
    unknown = [r for r in args.recipes if r not in RECIPES]
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}; choose from {sorted(RECIPES)}")

    dataset = "vnc-to-cdeep3m" if args.split == "cross" else args.dataset
    work = ROOT / "benchmarks" / ".work" / f"accuracy_{dataset}_{args.split}"
    raw, base, split = prepare(args.dataset, args.split, work)
    budget = None if args.steps else args.budget
    budgets = {}
    for item in args.budget_for:
        name, _, minutes = item.partition("=")
        if name not in args.recipes or not minutes.replace(".", "", 1).isdigit():
            parser.error(f"--budget-for {item!r}: expected RECIPE=MINUTES for a listed recipe")
        budgets[name] = float(minutes)
    runs: dict[str, Any] = {}
    for n in args.recipes:  # the file is rewritten after each recipe: a stopped run keeps them
        b = None if args.steps else budgets.get(n, budget)
        runs[n] = run_recipe(
            n,
            b,
            args.steps,
            args.curve,
            raw,
            base,
            work,
            init_from=args.init_from,
            label=f"{n}{args.tag}",
        )
        runs[n]["init_from"] = str(args.init_from) if args.init_from else None
        runs[n]["budget_minutes"] = b
        _save(args, dataset, work, split, budget, runs)


def _save(
    args: argparse.Namespace, dataset: str, work: Path, split: dict, budget: float | None,
    runs: dict[str, Any],
) -> None:  # fmt: skip
    meta = json.loads(next(work.glob("patches_*/meta.json")).read_text())
    save(
        f"accuracy_{dataset}_{args.split}{args.tag}",
        {
            "what": "each recipe trained once under a wall-clock budget on 2 CPU cores; "
            "snapshots at each curve point get the evaluate stage's plan (threshold on the "
            "validation slices) and are scored on the test slices",
            "split": {
                "name": args.split,
                "train": split["train"],
                "test": split["test"],
                "val_slices_of_train": meta["val_slices"],
            },
            "budget_minutes": budget,
            "steps": args.steps,
            "machine": machine(),
            "runs": runs,
        },
    )


if __name__ == "__main__":
    main()
