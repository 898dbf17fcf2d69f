"""How much a recipe's quality depends on chance: the same recipe over several seeds.

One run of a recipe proves nothing here: the same recipe gave bundled-sample test IoU
0.671, 0.747 and 0.796 on three machines, and two seeds of one recipe differ by 0.02-0.03.
This benchmark is the yardstick every recipe change is judged on. Each recipe is trained
at **equal optimizer steps** (``--steps``, default 1200 = ``make run``'s 30 epochs x 40)
with each of ``--seeds`` (the training seed: initial weights, dropout, data order, crop
positions and augmentation; the patchify seed, so the validation block, stays 42), then
gets the evaluate stage's own plan decision on the validation block
(:func:`mitoseg.planner.make_plan`, Keras FP32) and is scored on the test slices.

Datasets (``--datasets``):

* ``gap``: CDeep3M (``../shared/data/cdeep3m``), train slices 0-9 (2 of them the
  validation block), skip 10-14, test 15-19: slices separated from training by a gap;
* ``sample``: the bundled VNC sample as ``make run`` uses it (train 0-14, test 15-19:
  adjacent slices, the figure a fresh clone reproduces).

Per run it records test IoU, Dice, precision, recall, object F1, the plan's choices, the
false objects on the test slices (no labelled mitochondrion under them; how many per slice,
how many of them long), the fraction called mitochondria, the objects and the long objects
(elongation >= 3) per slice on the unlabelled CDeep3M slices 081-085 (50+ sections away;
the first one's overlay in the first seed's ``distant.png``) and how much the validation
curve swings: the mean and largest epoch-to-epoch change of ``val_iou`` over the second
half of training, and the epochs whose validation pixel accuracy collapsed below 0.5. Per
dataset and recipe: mean, sd, min and max over seeds.

Usage:
    python benchmarks/stability.py --datasets gap sample --recipes default v2 \\
        --seeds 0 1 2 3 4 --steps 1200
Writes ``benchmarks/results/stability<tag>.json`` after every run; ``--resume`` skips the
runs already in that file (a stopped benchmark continues where it was). ``--replan`` scores
saved models again with today's evaluate stage, ``--recount`` only counts their objects
again with each run's recorded plan. Recipe ``vnc_init`` starts every seed from one model
pre-trained on the VNC stack (:func:`pretrained`; gap split only).
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from accuracy import RECIPES, _entry, _score, fetch_split, patches_dir, patchify, prepare
from common import RESULTS, ROOT, machine, save
from mitoseg.config import AugmentConfig, BaseConfig, PatchifyConfig, resolve_train_config
from mitoseg.data.fetch import fetch
from mitoseg.stability import StabilityReport

#: ``v2``: the default recipe before issue 19 (what ``make run`` trained at 4f67f1a):
#: BatchNorm moving averages as trained, no warm-up, clipping or weight average, the
#: best epoch by patch val_loss kept, early stopping after 8 epochs without improvement.
V2_TRAIN: dict[str, Any] = {
    "preset": "default",
    "warmup_fraction": 0.0,
    "clipnorm": None,
    "ema_momentum": None,
    "keep": "best",
    "precise_bn_batches": 0,
    "early_stopping_patience": 8,
}
STABILITY_RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "default": {},  # today's preset
    "v2": {"train": V2_TRAIN},
    # one change at a time over v2, to see what the default's parts buy
    "v2+precise_bn": {"train": {**V2_TRAIN, "precise_bn_batches": 10}},
    "v2+last_ema": {
        "train": {**V2_TRAIN, "keep": "last", "ema_momentum": 0.99, "early_stopping_patience": None}
    },
    "v1": RECIPES["v1"],
    # issue 19 item 3: hard-negative crops centred on the model's own confident false
    # positives (mitoseg.model.mining) instead of dark background; the rest as default
    "mined": {"train": {"hard_negative_source": "mined"}},
    # BCE alone (no Dice term): is the Dice term why the default's thresholds are 0.85-0.97?
    "bce": {"train": {"loss": "bce"}},
    # fewer crops centred on mitochondria (0.4 -> 0.2): is the crop prior why the default's
    # best thresholds are 0.9 and more, and does a lower one transfer better along z?
    "fg20": {"train": {"foreground_crop_prob": 0.2}},
    # start from a model of another lab's volume (train.init_from), as a lab starts from the
    # champion: the default recipe trained for make run's 1200 steps on the whole VNC stack
    # (another species; seed 0, trained once and reused), then the default recipe on the split
    "vnc_init": {"pretrain": {"stack": "vnc", "steps": 1200, "seed": 0}},
    # half the base filters (8, not 16): about half the CPU time a step on the 2-core
    # EPYC (docs/development.md). Does the default need its width, at make run's steps?
    "f8": {"train": {"model": {"base_filters": 8}}},
    # issue 19 item 3, 2.5D revisited with the stable recipe: slices z-1, z, z+1 as input
    # channels (one seed of an older recipe lost 0.059, docs/ACCURACY.md); the rest as default
    "z1": {"patchify": {"z_context": 1}},
}
#: stacks a dataset's runs may not be pre-trained on: its test slices come from them (the
#: bundled sample is a crop of VNC stack 1, so a VNC-pre-trained model has seen them)
PRETRAIN_FORBIDDEN = {"sample": {"vnc"}}
STEPS_PER_EPOCH = 40
#: ``make run``'s optimizer steps (30 epochs x 40): the yardstick's default
DEFAULT_STEPS = 1200


def step_bound(steps: int) -> dict[str, int]:
    """The ``train:`` keys that bound a run to ``steps`` optimizer steps (epochs of
    :data:`STEPS_PER_EPOCH`)."""
    return {"epochs": max(1, round(steps / STEPS_PER_EPOCH)), "steps_per_epoch": STEPS_PER_EPOCH}


def run_label(recipe: str, seed: int, steps: int) -> str:
    """The folder name of one run's model under the dataset's work folder: runs of other
    lengths (``--steps``) keep their own, so a longer run never overwrites a 1200-step one."""
    return f"{recipe}_s{seed}" if steps == DEFAULT_STEPS else f"{recipe}_s{seed}_{steps}"


WHAT = (
    "each recipe trained at equal optimizer steps with each training seed (patchify seed 42); "
    "the evaluate stage's plan (Keras FP32; each run's plan_on says which slices it was "
    "chosen on, validation when absent) scored on the test slices. gap: CDeep3M train 0-9 "
    "(validation block inside), test 15-19; sample: the bundled VNC sample, train 0-14, "
    "test 15-19 (adjacent)"
)


def prepare_sample(work: Path) -> tuple[Path, BaseConfig]:
    """The bundled sample in the canonical layout ``work/raw`` (as ``make run`` fetches it)."""
    raw = work / "raw"
    fetch("sample", raw, progress=False, force=True)
    return raw, BaseConfig(seed=42)


def prepare_dataset(dataset: str) -> tuple[Path, BaseConfig, Path]:
    """``(raw, base, work)`` of a stability dataset (``gap`` or ``sample``)."""
    work = ROOT / "benchmarks" / ".work" / f"stability_{dataset}"
    if dataset == "gap":
        raw, base, _ = prepare("cdeep3m", "gap", work)
    else:
        raw, base = prepare_sample(work)
    return raw, base, work


def val_swing(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Epoch-to-epoch movement of the validation curve.

    Args:
        history: the training history rows (``epoch``, ``val_iou``, ``val_accuracy``).

    Returns:
        ``mean_abs_delta_val_iou`` and ``max_drop_val_iou`` over the second half of the
        epochs (where a settled recipe should move little), and ``collapsed_epochs``: the
        epochs whose validation pixel accuracy fell below 0.5 (most pixels called wrong).
    """
    rows = [r for r in history if r.get("val_iou") is not None]
    ious = [float(r["val_iou"]) for r in rows]
    half = ious[len(ious) // 2 :]
    deltas = [b - a for a, b in itertools.pairwise(half)]
    return {
        "mean_abs_delta_val_iou": round(statistics.fmean(abs(d) for d in deltas), 4)
        if deltas
        else None,
        "max_drop_val_iou": round(-min(deltas), 4) if deltas and min(deltas) < 0 else 0.0,
        "collapsed_epochs": [
            int(r["epoch"])
            for r in rows
            if r.get("val_accuracy") is not None and float(r["val_accuracy"]) < 0.5
        ],
    }


def summarise(values: list[float]) -> dict[str, Any]:
    """Mean, sample sd, min and max of ``values`` (sd ``None`` for fewer than 2)."""
    return {
        "n": len(values),
        "mean": round(statistics.fmean(values), 4),
        "sd": round(statistics.stdev(values), 4) if len(values) > 1 else None,
        "min": round(min(values), 4),
        "max": round(max(values), 4),
    }


def replan(
    run: dict[str, Any], raw: Path, base: BaseConfig, work: Path, commit: str
) -> dict[str, Any] | None:
    """``run`` scored again with today's evaluate stage (no training): its saved model
    planned with the evaluate defaults plus the recipe's overrides. None when the model
    is not in ``work`` any more."""
    import keras

    label = run_label(run["recipe"], run["seed"], run["steps"])
    path = work / f"train_{label}" / "model.keras"
    if not path.is_file():
        return None
    recipe = STABILITY_RECIPES[run["recipe"]]
    cfg = PatchifyConfig(**recipe.get("patchify", {}))
    patches = patches_dir(work, cfg)  # the training run's split (only meta.json is read)
    if not (patches / "meta.json").is_file():
        patches = patchify(raw, work, base, cfg)
    model = keras.saving.load_model(path, compile=False)
    scores = _score(model, raw, patches, base, None, recipe.get("evaluate"))
    return {**run, **scores, "scored_at": commit}


def pretrained(spec: dict[str, Any]) -> tuple[Path, float]:
    """The model a recipe with ``pretrain`` starts from, and its training seconds.

    The default recipe trained for ``spec["steps"]`` steps with seed ``spec["seed"]`` on
    every slice of the ``spec["stack"]`` stack (:data:`accuracy.STACKS`; a quarter held out
    as its validation block), once: later runs reuse
    ``benchmarks/.work/pretrain_<stack>_<steps>_s<seed>/``. Like a published base model, it
    is one model for every seed of the runs that start from it.
    """
    from mitoseg.train import train_model

    work = (
        ROOT / "benchmarks" / ".work" / f"pretrain_{spec['stack']}_{spec['steps']}_s{spec['seed']}"
    )
    out, record = work / "train", work / "pretrain.json"
    if (out / "model.keras").is_file() and record.is_file():
        return out / "model.keras", float(json.loads(record.read_text())["train_wall_s"])
    # the split's test entry is never read: the pre-trained model is scored only through
    # the runs that start from it
    raw, base, _ = fetch_split(_entry(spec["stack"], (0, 20)), _entry("cdeep3m", (15, 20)), work)
    patches = patchify(raw, work, base, PatchifyConfig())
    cfg = resolve_train_config(step_bound(spec["steps"]))
    ckpt = work / "ckpt"
    for d in (out, ckpt):
        if d.exists():
            shutil.rmtree(d)
    t0 = time.perf_counter()
    res = train_model(
        patches, AugmentConfig(), cfg, base.n_classes, spec["seed"], out, ckpt, progress=False
    )  # fmt: skip
    wall = round(time.perf_counter() - t0, 1)
    record.write_text(
        json.dumps(
            {
                **spec,
                "train_wall_s": wall,
                "epochs_run": res.epochs_run,
                "git_commit": machine()["git_commit"],
            }
        )
    )
    return res.model_path, wall


def run_one(
    recipe_name: str, seed: int, steps: int, raw: Path, base: BaseConfig, work: Path,
    figure: bool,
) -> dict[str, Any]:  # fmt: skip
    """Train ``recipe_name`` with training seed ``seed`` for ``steps`` steps and score it
    (a recipe with ``pretrain`` starts from :func:`pretrained`'s model)."""
    import keras

    from mitoseg.train import initial_weights, train_model

    recipe = STABILITY_RECIPES[recipe_name]
    source, pretrain_s = pretrained(recipe["pretrain"]) if "pretrain" in recipe else (None, None)
    cfg = resolve_train_config(
        {
            **recipe.get("train", {}),
            **step_bound(steps),
            **({"init_from": str(source)} if source is not None else {}),
        }
    )
    init = None
    if source is not None:
        init = initial_weights(keras.saving.load_model(source, compile=False), cfg, base.n_classes)
    augment = AugmentConfig(**recipe.get("augment", {}))
    patches = patchify(raw, work, base, PatchifyConfig(**recipe.get("patchify", {})))
    label = run_label(recipe_name, seed, steps)
    out, ckpt = work / f"train_{label}", work / "ckpt" / label
    for d in (out, ckpt):
        if d.exists():
            shutil.rmtree(d)
    t0 = time.perf_counter()
    res = train_model(
        patches, augment, cfg, base.n_classes, seed, out, ckpt, progress=False,
        init_weights=init,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    model = keras.saving.load_model(res.model_path, compile=False)
    scores = _score(
        model, raw, patches, base, out / "distant.png" if figure else None, recipe.get("evaluate")
    )
    return {
        "recipe": recipe_name,
        "seed": seed,
        "steps": res.epochs_run * STEPS_PER_EPOCH,
        "epochs_run": res.epochs_run,
        "saved_epoch": res.best_epoch,
        "stop_reason": res.stop_reason,
        "train_wall_s": round(wall, 1),
        **({"pretrain": {**recipe["pretrain"], "train_wall_s": pretrain_s}} if source else {}),
        "validation_curve": val_swing(res.history),
        "val_iou_per_epoch": [
            None if r.get("val_iou") is None else round(float(r["val_iou"]), 4) for r in res.history
        ],
        **scores,
    }


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per dataset and recipe: test IoU (and object F1) over seeds, and the val swing."""
    out: dict[str, Any] = {}
    for run in runs:
        key = f"{run['dataset']}/{run['recipe']}"
        out.setdefault(key, []).append(run)
    return {
        key: {
            "seeds": [r["seed"] for r in group],
            "test_iou": summarise([r["iou"] for r in group]),
            "object_f1": summarise([r["object_f1"] for r in group]),
            "mean_abs_delta_val_iou": summarise(
                [
                    r["validation_curve"]["mean_abs_delta_val_iou"]
                    for r in group
                    if r["validation_curve"]["mean_abs_delta_val_iou"] is not None
                ]
                or [0.0]
            ),
            "runs_with_collapsed_validation": sum(
                bool(r["validation_curve"]["collapsed_epochs"]) for r in group
            ),
            **_counts(group),
        }
        for key, group in out.items()
    }


def _counts(group: list[dict[str, Any]]) -> dict[str, Any]:
    """The object counts over seeds, where every run of ``group`` has them."""
    where = {
        "test_false_objects_per_slice": ("test_slices", "false_objects"),
        "test_long_false_objects_per_slice": ("test_slices", "long_false_objects"),
        "distant_long_objects_per_slice": ("distant_unlabelled", "long_objects_per_slice"),
    }
    out = {}
    for name, (part, key) in where.items():
        values = [(r.get(part) or {}).get(key) for r in group]
        if all(v is not None for v in values):
            out[name] = summarise(values)
    return out


def markdown_table(report: StabilityReport) -> str:
    """The summary as a Markdown table (for docs/ACCURACY.md and the README)."""
    lines = [
        "| dataset / recipe | seeds | test IoU mean +- sd | min - max | object F1 mean "
        "| val IoU move per epoch (2nd half) | runs whose validation collapsed |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, row in sorted(report.summary.items()):
        iou, swing = row.test_iou, row.mean_abs_delta_val_iou
        sd = "-" if iou.sd is None else f"{iou.sd:.3f}"
        lines.append(
            f"| {key} | {', '.join(map(str, row.seeds))} | {iou.mean:.3f} +- {sd} "
            f"| {iou.min:.3f} - {iou.max:.3f} | {row.object_f1.mean:.3f} | {swing.mean:.3f} "
            f"| {row.runs_with_collapsed_validation} of {iou.n} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--datasets", nargs="+", default=["gap", "sample"], choices=["gap", "sample"]
    )
    parser.add_argument("--recipes", nargs="+", default=["default", "v2"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimizer steps per run")
    parser.add_argument("--tag", default="", help="suffix of the result file name")
    parser.add_argument("--resume", action="store_true", help="skip runs already in the file")
    parser.add_argument(
        "--replan",
        action="store_true",
        help="no training: score the saved models of the runs already in the file again "
        "with today's evaluate stage (e.g. after a change of how the plan is chosen)",
    )
    parser.add_argument(
        "--recount",
        action="store_true",
        help="no training or planning: count the test slices' false objects and the "
        "distant slices' objects of the runs already in the file again, with each run's "
        "recorded plan (for runs scored before a count was added)",
    )
    parser.add_argument(
        "--table", action="store_true", help="print the result file's summary as Markdown"
    )
    args = parser.parse_args()
    if args.table:
        from mitoseg.stability import read_stability

        print(markdown_table(read_stability(RESULTS / f"stability{args.tag}.json")))
        return
    unknown = [r for r in args.recipes if r not in STABILITY_RECIPES]
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}; choose from {sorted(STABILITY_RECIPES)}")
    for dataset, recipe in itertools.product(args.datasets, args.recipes):
        stack = STABILITY_RECIPES[recipe].get("pretrain", {}).get("stack")
        if stack in PRETRAIN_FORBIDDEN.get(dataset, set()):
            parser.error(
                f"recipe {recipe} pre-trains on {stack}, the volume of {dataset}'s test slices"
            )

    name = f"stability{args.tag}"
    path = RESULTS / f"{name}.json"
    runs: list[dict[str, Any]] = []
    if (args.resume or args.replan or args.recount) and path.is_file():
        runs = json.loads(path.read_text())["runs"]
    done = {(r["dataset"], r["recipe"], r["seed"]) for r in runs}
    host = machine()
    if args.replan or args.recount:
        redo_runs(runs, args, name, host)
        return
    # seed-major order: a stopped run still has every recipe at the first seeds
    for seed in args.seeds:
        for dataset in args.datasets:
            raw, base, work = prepare_dataset(dataset)
            for recipe in args.recipes:
                if (dataset, recipe, seed) in done:
                    continue
                run = run_one(
                    recipe, seed, args.steps, raw, base, work, figure=seed == args.seeds[0]
                )
                runs.append({"dataset": dataset, **run, "git_commit": host["git_commit"]})
                print(json.dumps(runs[-1]), flush=True)
                _save(name, args.steps, host, runs)


def redo_runs(
    runs: list[dict[str, Any]], args: argparse.Namespace, name: str, host: dict[str, Any]
) -> None:
    """``--replan`` (:func:`replan`: the run scored again) or ``--recount`` (:func:`recount`:
    its object counts again) for the selected runs already in the file, saved after each."""
    what = "replanned" if args.replan else "recounted"
    for dataset in args.datasets:
        raw, base, work = prepare_dataset(dataset)
        for i, run in enumerate(runs):
            if run["dataset"] != dataset or run["recipe"] not in args.recipes:
                continue
            if run["seed"] not in args.seeds:
                continue
            if args.replan:
                again = replan(run, raw, base, work, host["git_commit"])
            else:
                counts = recount(run, raw, base, work)
                again = None if counts is None else {**run, **counts}
            if again is None:
                print(f"not {what}: {dataset}/{run['recipe']} seed {run['seed']} (no model)")
                continue
            runs[i] = again
            print(json.dumps(again), flush=True)
            _save(name, args.steps, host, runs)


def recount(run: dict[str, Any], raw: Path, base: BaseConfig, work: Path) -> dict[str, Any] | None:
    """``run``'s object counts measured again with the plan its scoring chose: the draft
    plan with the recorded ``threshold``, ``border``, ``z_average`` and ``seed_threshold``.
    The false objects on the test slices (``test_slices``, :func:`accuracy.false_objects`),
    each test slice's IoU (``test_slice_iou``) and the distant-slice figures
    (``distant_unlabelled``, :func:`accuracy._distant`), for runs scored before a count
    was added. None when the model is not in ``work`` any more.

    Raises:
        RuntimeError: the rebuilt plan's test IoU or distant foreground fraction differs
            from the recorded one (it is not the plan the run was scored with).
    """
    import keras

    from accuracy import _distant, false_objects, plan_split, slice_ious
    from mitoseg.config import EvaluateConfig
    from mitoseg.planner import draft_plan, evaluate_split

    path = work / f"train_{run_label(run['recipe'], run['seed'], run['steps'])}" / "model.keras"
    if not path.is_file():
        return None
    recipe = STABILITY_RECIPES[run["recipe"]]
    model = keras.saving.load_model(path, compile=False)
    evaluate = {**recipe.get("evaluate", {}), "engines": ["keras/fp32"]}
    plan, _ = draft_plan(model, EvaluateConfig(**evaluate), base.class_names)
    plan = plan.with_overrides(
        threshold=run["threshold"],
        border=run["border"],
        z_average=run["z_average"],
        seed_threshold=run["seed_threshold"],
    )
    patches = patches_dir(work, PatchifyConfig(**recipe.get("patchify", {})))
    data = plan_split(raw, patches, base, run.get("plan_on", "validation"))
    res = evaluate_split(model, plan, data["test_images"], data["test_masks"])
    who = f"{run['dataset']}/{run['recipe']} seed {run['seed']}"
    if round(float(res.metrics["iou"]), 4) != run["iou"]:
        raise RuntimeError(
            f"{who}: the rebuilt plan scores {res.metrics['iou']:.4f}, not {run['iou']}"
        )
    out = {
        "test_slices": false_objects(res.predictions, res.masks, plan.min_object_size),
        "test_slice_iou": slice_ious(res.rows),
    }
    distant = _distant(model, plan, None)
    recorded = run.get("distant_unlabelled")
    if distant is not None and recorded is not None:
        if distant["foreground_fraction"] != recorded["foreground_fraction"]:
            raise RuntimeError(
                f"{who}: the rebuilt plan calls {distant['foreground_fraction']} of the "
                f"distant slices mitochondria, the run recorded {recorded['foreground_fraction']}"
            )
        out["distant_unlabelled"] = distant
    return out


def _save(name: str, steps: int, host: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    save(
        name,
        StabilityReport.model_validate(
            {
                "what": WHAT,
                "steps": steps,
                "machine": host,
                "summary": summary(runs),
                "runs": runs,
            }
        ).model_dump(mode="json"),
    )


if __name__ == "__main__":
    main()
