"""Fine-tuning from a model trained on another volume vs training from scratch.

A lab adapts a model to its own volume from a few labelled slices (``train.init_from``).
Here the model is pre-trained on the whole VNC stack (``../shared/data/vnc``, 20 slices,
another lab, another species), then trained further on the first ``n`` slices of the
CDeep3M stack (``n`` in ``--slices``, default 2, 5 and 10; the patchify stage holds a
quarter of them, at least one, out for the plan's threshold), against the same recipe
trained from scratch on the same slices for the same ``--budget``. Every model gets the
evaluate stage's plan (:func:`mitoseg.planner.make_plan`) on its validation slices and is
scored on CDeep3M slices 15-19 (:func:`mitoseg.planner.evaluate_split`), at least five
slices away from any training slice. The pre-trained model alone (``zero_shot``) is scored
the same way.

Usage:
    python benchmarks/finetune.py --recipe default --pretrain 10 --budget 5 --slices 2 5 10
    python benchmarks/finetune.py --recipe default --steps 1500 600  # machine-independent
Writes benchmarks/results/finetune_vnc_to_cdeep3m.json. Keep the machine otherwise idle.
"""

from __future__ import annotations

import argparse
import json
import shutil
from typing import Any

from accuracy import RECIPES, _entry, _score, fetch_split, patchify, run_recipe
from common import ROOT, machine, save
from mitoseg.config import PatchifyConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="default", choices=sorted(RECIPES))
    parser.add_argument("--pretrain", type=float, default=10, help="minutes on VNC")
    parser.add_argument("--budget", type=float, default=5, help="minutes per CDeep3M run")
    parser.add_argument("--slices", type=int, nargs="+", default=[2, 5, 10])
    parser.add_argument(
        "--steps",
        type=int,
        nargs=2,
        metavar=("PRETRAIN", "RUN"),
        help="bound pre-training and each run by optimizer steps instead of minutes",
    )
    args = parser.parse_args()
    if any(not 2 <= n <= 15 for n in args.slices):
        parser.error("--slices: each n must be in 2..15 (test slices are 15-19)")
    import keras

    work = ROOT / "benchmarks" / ".work" / "finetune_vnc_to_cdeep3m"
    test = _entry("cdeep3m", (15, 20))
    raw, base, _ = fetch_split(_entry("vnc", (0, 20)), test, work / "pretrain")
    pre_budget, budget = (None, None) if args.steps else (args.pretrain, args.budget)
    pre_steps, steps = args.steps or (None, None)
    pre = run_recipe(args.recipe, pre_budget, pre_steps, [], raw, base, work / "pretrain")
    pretrained = work / "pretrain" / f"train_{args.recipe}" / "model.keras"
    rows: dict[str, Any] = {}
    for n in args.slices:
        where = work / f"cdeep3m_{n}"
        raw, base, _ = fetch_split(_entry("cdeep3m", (0, n)), test, where)
        patches = patchify(
            raw, where, base, PatchifyConfig(**RECIPES[args.recipe].get("patchify", {}))
        )
        meta = json.loads((patches / "meta.json").read_text())
        zero = _score(keras.saving.load_model(pretrained, compile=False), raw, patches, base)
        runs = {
            mode: run_recipe(
                args.recipe,
                budget,
                steps,
                [],
                raw,
                base,
                where,
                init_from=pretrained if mode == "finetune" else None,
                label=mode,
            )
            for mode in ("scratch", "finetune")
        }
        rows[str(n)] = {
            "train_slices": meta["train_slices"],
            "val_slices": meta["val_slices"],
            "zero_shot": zero,
            **{mode: {**r["curve"][-1], "epochs_run": r["epochs_run"]} for mode, r in runs.items()},
        }
        print(n, json.dumps(rows[str(n)]), flush=True)
        shutil.rmtree(where / "ckpt", ignore_errors=True)
    save(
        "finetune_vnc_to_cdeep3m",
        {
            "what": "pre-train on VNC, then fine-tune (train.init_from) or train from scratch "
            "on the first n CDeep3M slices with the same recipe and the same budget "
            "(minutes, or optimizer steps); plan chosen on the validation slices, scored "
            "on CDeep3M 15-19",
            "recipe": args.recipe,
            "pretrain_minutes": pre_budget,
            "budget_minutes": budget,
            "steps": {"pretrain": pre_steps, "run": steps},
            "pretrain": {k: pre[k] for k in ("epochs_run", "train_wall_s", "curve")},
            "rows": rows,
            "machine": machine(),
        },
    )


if __name__ == "__main__":
    main()
