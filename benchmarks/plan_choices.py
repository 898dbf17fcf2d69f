"""Where the seed spread comes from: the models of ``stability.py`` planned again, and ensembled.

``benchmarks/stability.py`` trains each recipe with several seeds and scores each model
with the evaluate stage's full plan, chosen on the validation block (threshold,
z-averaging, hysteresis). Each of those choices is fitted to a block of 2-4 consecutive
slices. This benchmark takes the same trained models (nothing is trained again) and
scores them on the same test slices:

* ``plan``: the evaluate stage's plan chosen on the validation block
  (``evaluate.plan_on: validation``), as ``stability.py`` made it for every run in
  ``stability.json`` so far (a check: it should repeat their IoU);
* ``no_hysteresis``: the same, with ``evaluate.seed_threshold: null``;
* ``threshold_only``: only the threshold chosen on validation (no z-averaging, no
  hysteresis);
* ``plan_labelled``, ``no_hysteresis_labelled``: ``plan`` and ``no_hysteresis`` chosen on
  the whole training stack (``evaluate.plan_on: labelled``: the validation block and the
  training slices, engines still timed on the validation block);
* ``best_test_threshold``: an upper bound, not a figure any plan can reach: the threshold
  chosen on the **test** slices themselves (no z-averaging, no hysteresis). It says how
  much of a seed's result is the threshold and how much the network;
* seed ensembles: the mean probabilities of several seeds' models (one Keras model,
  :func:`ensemble_model`), planned with the full plan and without hysteresis. An
  ensemble of ``k`` seeds costs ``k`` trainings; the report gives that cost.

Usage:
    python benchmarks/plan_choices.py --datasets gap sample --recipes default v2 \\
        --ensemble 3
Reads ``benchmarks/results/stability.json`` (``--stability`` names another) and the models
under ``benchmarks/.work/stability_<dataset>/train_<label>/model.keras``
(:func:`stability.run_label`); writes
``benchmarks/results/stability_plans<tag>.json`` (``--resume`` adds to it).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from accuracy import false_objects, patches_dir, plan_split
from common import RESULTS, machine, save
from mitoseg.config import BaseConfig, EvaluateConfig, PatchifyConfig
from mitoseg.stability import read_stability
from stability import prepare_dataset, run_label, summarise

#: evaluate-stage overrides of each variant (Keras FP32 always: the engine is not the question)
VARIANTS: dict[str, dict[str, Any]] = {
    "plan": {"plan_on": "validation"},
    "no_hysteresis": {"plan_on": "validation", "seed_threshold": None},
    "threshold_only": {"plan_on": "validation", "seed_threshold": None, "z_average": 0},
    "plan_labelled": {"plan_on": "labelled"},
    "no_hysteresis_labelled": {"plan_on": "labelled", "seed_threshold": None},
}
ENSEMBLE_VARIANTS = ("plan", "no_hysteresis")
PLAN_ON = ("validation", "labelled")


def ensemble_model(models: list[Any]) -> Any:
    """One Keras model whose output is the mean of ``models``' outputs.

    Args:
        models: Keras models of one architecture, ``(N, H, W, C_in) -> (N, H, W, C)``.

    Returns:
        A functional ``keras.Model`` with the same input and output shapes.
    """
    import keras

    inputs = keras.Input(shape=models[0].input_shape[1:])
    outputs = keras.layers.Average()([m(inputs) for m in models])
    return keras.Model(inputs, outputs, name=f"ensemble_of_{len(models)}")


def ensemble_sets(seeds: list[int], k: int) -> list[tuple[int, ...]]:
    """The seed sets ensembled: every window of ``k`` consecutive seeds, wrapping round
    (each seed in ``k`` of them), then all seeds together.

    >>> ensemble_sets([0, 1, 2, 3, 4], 3)
    [(0, 1, 2), (1, 2, 3), (2, 3, 4), (3, 4, 0), (4, 0, 1), (0, 1, 2, 3, 4)]
    """
    n = len(seeds)
    windows = [tuple(seeds[(i + j) % n] for j in range(k)) for i in range(n)] if n > k else []
    return [*windows, tuple(seeds)]


def _score(
    model: Any, data: dict[str, dict[str, Any]], base: BaseConfig, overrides: dict[str, Any]
) -> dict:
    """Plan ``model`` with ``overrides`` (on the slices their ``plan_on`` names) and score
    the test slices."""
    from mitoseg.planner import evaluate_split, make_plan

    cfg = EvaluateConfig(**{**overrides, "engines": ["keras/fp32"]})
    split = data[cfg.plan_on]
    plan, _ = make_plan(
        model,
        cfg,
        base.class_names,
        split["val_images"],
        split["val_masks"],
        engine_slices=split["engine_slices"],
    )
    res = evaluate_split(model, plan, split["test_images"], split["test_masks"])
    m = res.metrics
    return {
        "iou": round(float(m["iou"]), 4),
        "precision": round(float(m["precision"]), 4),
        "recall": round(float(m["recall"]), 4),
        "object_f1": round(float(m["objects"]["f1"]), 4),
        "threshold": plan.threshold,
        "z_average": plan.z_average,
        "seed_threshold": plan.seed_threshold,
        "test_slices": false_objects(res.predictions, res.masks, plan.min_object_size),
    }


def _best_test_threshold(model: Any, data: dict[str, dict[str, Any]], base: BaseConfig) -> dict:
    """The upper bound: the threshold chosen on the test slices (no z-averaging or
    hysteresis)."""
    from mitoseg.evaluate import choose_threshold
    from mitoseg.planner import draft_plan

    cfg = EvaluateConfig(engines=["keras/fp32"], seed_threshold=None, z_average=0)
    plan, _ = draft_plan(model, cfg, base.class_names)
    test = data["validation"]
    choice = choose_threshold(model, test["test_images"], test["test_masks"], plan)
    return {"iou": round(choice.iou, 4), "threshold": choice.threshold}


def load_split(dataset: str) -> tuple[dict[str, dict[str, Any]], BaseConfig, Path]:
    """The planning and test slices of ``dataset`` as ``stability.py`` split them, for
    each ``evaluate.plan_on`` (:func:`accuracy.plan_split`), its class table and its
    work folder."""
    raw, base, work = prepare_dataset(dataset)
    patches = patches_dir(work, PatchifyConfig())  # every stability recipe's (default) split
    data = {on: plan_split(raw, patches, base, on) for on in PLAN_ON}
    return data, base, work


def markdown_table(report: dict[str, Any]) -> str:
    """The summary as a Markdown table (for docs/ACCURACY.md): test IoU mean +- sd."""

    def cell(spread: dict[str, Any] | None) -> str:
        if not spread:
            return "-"
        sd = "" if spread["sd"] is None else f" +- {spread['sd']:.3f}"
        return f"{spread['mean']:.3f}{sd}"

    lines = [
        "| dataset / recipe | plan, chosen on the validation block | the same on the whole "
        "training stack | no hysteresis | no hysteresis, whole stack | threshold only "
        "| threshold alone, chosen on the test slices (bound of the previous column) "
        "| ensembles of 3 seeds (plan) "
        "| all seeds ensembled (plan) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, row in sorted(report["summary"].items()):
        sizes = sorted(int(k.rsplit("_", 1)[1]) for k in row if k.startswith("ensemble_of_"))
        small = row.get(f"ensemble_of_{sizes[0]}", {}) if len(sizes) > 1 else {}
        whole = row.get(f"ensemble_of_{sizes[-1]}", {}) if sizes else {}
        lines.append(
            f"| {key} | {cell(row['plan'])} | {cell(row.get('plan_labelled'))} "
            f"| {cell(row['no_hysteresis'])} | {cell(row.get('no_hysteresis_labelled'))} "
            f"| {cell(row['threshold_only'])} | {cell(row['best_test_threshold'])} "
            f"| {cell(small.get('plan'))} | {cell(whole.get('plan'))} |"
        )
    lines += [
        "",
        "| dataset / recipe | object F1: plan | no hysteresis | threshold only "
        "| false objects per test slice: plan | no hysteresis | threshold only "
        "| of them long (elongation >= 3): plan | no hysteresis |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(report["summary"]):
        runs = [r for r in report["runs"] if f"{r['dataset']}/{r['recipe']}" == key]

        def mean(variant: str, what: str, runs: list[dict[str, Any]] = runs) -> str:
            values = [
                r[variant][what] if what == "object_f1" else r[variant]["test_slices"][what]
                for r in runs
            ]
            return f"{statistics.fmean(values):.{3 if what == 'object_f1' else 1}f}"

        variants = ("plan", "no_hysteresis", "threshold_only")
        lines.append(
            f"| {key} | "
            + " | ".join(
                [mean(v, "object_f1") for v in variants]
                + [mean(v, "false_objects") for v in variants]
                + [mean(v, "long_false_objects") for v in variants[:2]]
            )
            + " |"
        )
    return "\n".join(lines)


def _planned(rows: list[dict[str, Any]], dataset: str, recipe: str, seed: int) -> bool:
    """Whether ``rows`` already hold every variant of this run (``--resume``: a seed added
    to the stability file since is planned, the others are not planned again)."""
    row = next(
        (r for r in rows if (r["dataset"], r["recipe"], r["seed"]) == (dataset, recipe, seed)),
        None,
    )
    return row is not None and all(name in row for name in [*VARIANTS, "best_test_threshold"])


def main() -> None:
    import keras

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--datasets", nargs="+", default=["gap", "sample"], choices=["gap", "sample"]
    )
    parser.add_argument("--recipes", nargs="+", default=["default"])
    parser.add_argument(
        "--ensemble", type=int, default=3, help="seeds per ensemble (0: no ensembles)"
    )
    parser.add_argument("--tag", default="", help="suffix of the result file name")
    parser.add_argument(
        "--stability",
        default="stability.json",
        help="the stability.py result file whose models are planned again "
        "(e.g. stability_4000.json for its --steps 4000 --tag _4000 runs)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="keep the dataset/recipe pairs already in the file"
    )
    parser.add_argument(
        "--table", action="store_true", help="print the result file's summary as Markdown"
    )
    args = parser.parse_args()
    if args.table:
        print(markdown_table(json.loads((RESULTS / f"stability_plans{args.tag}.json").read_text())))
        return
    report = read_stability(RESULTS / args.stability)
    host = machine()
    rows: list[dict[str, Any]] = []
    ensembles: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    path = RESULTS / f"stability_plans{args.tag}.json"
    if args.resume and path.is_file():
        done = json.loads(path.read_text())
        rows, ensembles, summary = done["runs"], done["ensembles"], done["summary"]
    for dataset in args.datasets:
        data, base, work = load_split(dataset)
        for recipe in args.recipes:
            runs = sorted(
                (r for r in report.runs if r["dataset"] == dataset and r["recipe"] == recipe),
                key=lambda r: r["seed"],
            )
            if all(_planned(rows, dataset, recipe, r["seed"]) for r in runs):
                continue  # --resume: every seed of the stability file is in this one
            models: dict[int, Any] = {}
            for run in runs:
                path = (
                    work / f"train_{run_label(recipe, run['seed'], run['steps'])}" / "model.keras"
                )
                if not path.is_file():
                    print(f"skipped {dataset}/{recipe} seed {run['seed']}: {path} not found")
                    continue
                model = keras.saving.load_model(path, compile=False)
                model.name = f"{recipe}_seed_{run['seed']}"  # unique inside an ensemble
                models[run["seed"]] = model
                row = next(
                    (
                        r
                        for r in rows
                        if (r["dataset"], r["recipe"], r["seed"]) == (dataset, recipe, run["seed"])
                    ),
                    None,
                )
                if row is None:
                    row = {
                        "dataset": dataset,
                        "recipe": recipe,
                        "seed": run["seed"],
                        "stability_json_iou": run["iou"],
                    }
                    rows.append(row)
                for name, overrides in VARIANTS.items():  # --resume: only what is missing
                    if name not in row:
                        row[name] = _score(model, data, base, overrides)
                if "best_test_threshold" not in row:
                    row["best_test_threshold"] = _best_test_threshold(model, data, base)
                print(json.dumps(row), flush=True)
            mine = [r for r in rows if r["dataset"] == dataset and r["recipe"] == recipe]
            if not mine:
                continue
            key = f"{dataset}/{recipe}"
            summary[key] = {
                "seeds": [r["seed"] for r in mine],
                **{
                    name: summarise([r[name]["iou"] for r in mine])
                    for name in [*VARIANTS, "best_test_threshold"]
                },
                **{
                    f"plan_{what}_per_slice": summarise(
                        [r["plan"]["test_slices"][what] for r in mine]
                    )
                    for what in ("false_objects", "long_false_objects")
                },
                "no_hysteresis_minus_plan": summarise(
                    [r["no_hysteresis"]["iou"] - r["plan"]["iou"] for r in mine]
                ),
            }
            train_s = {r["seed"]: r["train_wall_s"] for r in runs}
            k = args.ensemble
            if k < 2 or len(models) < k:
                continue
            for members in ensemble_sets(sorted(models), k):
                if any(
                    (e["dataset"], e["recipe"], e["seeds"]) == (dataset, recipe, list(members))
                    for e in ensembles
                ):
                    continue  # --resume: already in the file
                ens = ensemble_model([models[s] for s in members])
                row = {
                    "dataset": dataset,
                    "recipe": recipe,
                    "seeds": list(members),
                    "train_wall_s_sum": round(sum(train_s[s] for s in members), 1),
                    "members_plan_iou_mean": round(
                        statistics.fmean(
                            next(r["plan"]["iou"] for r in mine if r["seed"] == s) for s in members
                        ),
                        4,
                    ),
                    **{name: _score(ens, data, base, VARIANTS[name]) for name in ENSEMBLE_VARIANTS},
                }
                ensembles.append(row)
                print(json.dumps(row), flush=True)
            mine_e = [e for e in ensembles if e["dataset"] == dataset and e["recipe"] == recipe]
            for size in sorted({len(e["seeds"]) for e in mine_e}):
                summary[key][f"ensemble_of_{size}"] = {
                    name: summarise([e[name]["iou"] for e in mine_e if len(e["seeds"]) == size])
                    for name in ENSEMBLE_VARIANTS
                }
        save(
            f"stability_plans{args.tag}",
            {
                "what": __doc__.split("\n\n")[0],
                "variants": VARIANTS,
                "stability_file": args.stability,
                "machine": host,
                "summary": summary,
                "runs": rows,
                "ensembles": ensembles,
            },
        )


if __name__ == "__main__":
    main()
