"""The lab loop, measured: which slices to label next, at equal labels (issue 20, item 5).

CDeep3M (``../shared/data/cdeep3m``, 20 labelled slices) with the gap split of
``benchmarks/stability.py``: the **pool** a lab labels from is slices 0-9, the **test**
slices 15-19 are fixed and never chosen, slices 10-14 are never trained on. Every arm
starts from the same 2 labelled slices of the pool (evenly spaced: 2 and 7), then runs
``--rounds`` rounds, each adding ``--k`` slices chosen by one strategy
(:mod:`mitoseg.active`):

* ``suggest``: the pool's unlabelled slices ranked by ``mitoseg suggest``'s slice score
  (:func:`mitoseg.suggest.suggest_stack`, flips h and v, with the current model and its
  plan) - the top ``k``;
* ``random``: drawn at random (seeded by the seed and the round);
* ``even``: evenly spaced over the pool (the slice farthest from the labelled ones);
* ``partial``: as many labelled pixels as ``even`` at each round, spread as square
  regions (``--partial-tile``) over every slice of the pool in a seeded random order.

Unlabelled pixels carry the ignore label (raw 254): they weigh nothing in training and
unlabelled pool slices stay in the stack as 2.5D context. Round 0 trains from scratch for
``--steps-first`` optimizer steps (shared by ``suggest``, ``random`` and ``even``: trained
once per seed); each later round fine-tunes from the round before (``train.init_from``)
for ``--steps-per-round`` steps, the same training seed every round. Each model gets the
evaluate stage's plan (:func:`mitoseg.planner.make_plan`, Keras FP32) chosen on the
**validation slices** ``--val-slices`` (default 10 and 11, inside the gap: labelled,
never trained on, the same for every arm and round, so the labels the strategies compare
are training labels only; none: the default plan, threshold 0.5) and is scored on the
test slices (IoU, Dice, precision, recall, object F1).

Usage:
    python benchmarks/active_learning.py --seeds 0 1 2 --rounds 4 --k 2 \\
        --steps-first 600 --steps-per-round 300
    python benchmarks/active_learning.py --table
Writes ``benchmarks/results/active_learning<tag>.json`` (``--out``) after every arm;
``--resume`` skips the (strategy, seed) arms already in it. Keep the machine otherwise idle.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common import RESULTS, ROOT, SHARED, machine, save
from mitoseg.active import (
    STRATEGIES,
    ActiveLearningReport,
    ArmResult,
    RoundResult,
    RoundSeconds,
    even_picks,
    random_picks,
    read_active_learning,
    region_mask,
    region_order,
    regions_for_pixels,
    summarise_arms,
    top_k,
)
from mitoseg.config import AugmentConfig, BaseConfig, EvaluateConfig, PatchifyConfig, TrainConfig

POOL = list(range(0, 10))
TEST = list(range(15, 20))
IGNORE_VALUE = 254
BASE = BaseConfig(seed=42, ignore_value=IGNORE_VALUE)
STEPS_PER_EPOCH = 40
FLIPS = ("h", "v")
WHAT = (
    "active learning on the gap split: pool slices 0-9, fixed test slices 15-19; every "
    "arm starts from the same evenly spaced slices, each round adds k pool slices chosen "
    "by its strategy (partial: the pixels of even's slices as square regions over every "
    "pool slice), fine-tunes from the round before at fixed optimizer steps (unlabelled "
    "pixels: ignore label) and is scored on the test slices"
)


@dataclass(frozen=True)
class Setup:
    """What every arm shares: the stack, the slices, the recipe and the knobs."""

    images: np.ndarray  # (Z, H, W) raw intensities, cropped
    masks: np.ndarray  # (Z, H, W) raw mask values (0/255), cropped
    val: list[int]
    cfg: TrainConfig
    rounds: int
    k: int
    start: int
    steps_first: int
    steps_per_round: int
    partial_tile: int
    patch_size: int
    work: Path

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])


def load_stack(image: Path, mask: Path, crop: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The labelled stack, each slice cut to its central ``crop x crop`` pixels."""
    from mitoseg.io import read_stack

    for p in (image, mask):
        if not p.is_file():
            raise SystemExit(f"{p}: not found (this benchmark needs ../shared/data)")
    images, masks = read_stack(image), read_stack(mask)
    if images.shape != masks.shape or images.shape[0] < 20:
        raise SystemExit(
            f"{mask}: shape {masks.shape} must equal {image} {images.shape} with >= 20 slices"
        )
    if crop is not None:
        h, w = images.shape[1:]
        if not 32 <= crop <= min(h, w):
            raise SystemExit(f"--crop {crop}: must be in 32..{min(h, w)}")
        top, left = (h - crop) // 2, (w - crop) // 2
        images = images[:, top : top + crop, left : left + crop]
        masks = masks[:, top : top + crop, left : left + crop]
    return np.ascontiguousarray(images), np.ascontiguousarray(masks)


def round_config(cfg: TrainConfig, steps: int, init_from: Path | None) -> TrainConfig:
    """``cfg`` bounded to about ``steps`` optimizer steps: the fewest epochs of at most
    40 steps, of equal length (60 -> 2 x 30; 100 -> 3 x 33 = 99; the steps run are
    recorded)."""
    epochs = math.ceil(steps / STEPS_PER_EPOCH)
    return cfg.model_copy(
        update={
            "epochs": epochs,
            "steps_per_epoch": max(1, round(steps / epochs)),
            "init_from": None if init_from is None else str(init_from),
        }
    )


def train_round(
    setup: Setup, label: np.ndarray, seed: int, steps: int, init_from: Path | None, where: Path
) -> tuple[Path, float, int]:
    """Train on the pool with the pixels outside ``label`` unlabelled.

    Args:
        setup: the shared setup.
        label: ``(len(POOL), H, W)`` bool, True where a pool pixel is labelled.
        seed: the training seed.
        steps: optimizer steps.
        init_from: the previous round's ``model.keras`` (None: from scratch).
        where: the round's working directory (replaced).

    Returns:
        ``(model path, training seconds, steps run)``.
    """
    import keras

    from mitoseg.data.layout import split_paths
    from mitoseg.data.patches import make_patch_dataset
    from mitoseg.io import write_stack
    from mitoseg.train import initial_weights, train_model

    if where.exists():
        shutil.rmtree(where)
    img_path, mask_path = split_paths(where / "raw", "train")
    write_stack(img_path, setup.images[POOL])
    write_stack(mask_path, np.where(label, setup.masks[POOL], IGNORE_VALUE).astype(np.uint8))
    p = setup.patch_size
    patchify = PatchifyConfig(patch_size=p, step=p, val_fraction=0.0)
    make_patch_dataset(where / "raw", where / "patches", BASE, patchify, BASE.seed)
    cfg = round_config(setup.cfg, steps, init_from)
    init = None
    if init_from is not None:
        init = initial_weights(keras.saving.load_model(init_from, compile=False), cfg, 2)
    t0 = time.perf_counter()
    res = train_model(
        where / "patches", AugmentConfig(), cfg, BASE.n_classes, seed, where / "train",
        where / "ckpt", progress=False, init_weights=init,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    for tmp in ("raw", "patches", "ckpt"):
        shutil.rmtree(where / tmp, ignore_errors=True)
    return res.model_path, seconds, res.epochs_run * (cfg.steps_per_epoch or 1)


def score(setup: Setup, model_path: Path) -> tuple[dict[str, Any], Any]:
    """The plan chosen on the validation slices, then the test slices scored with it.

    Always on the fixed validation slices (``evaluate.plan_on: validation``), not on each
    arm's own labelled slices: every arm's plan is then chosen on the same data, and the
    results stay comparable with ``active_learning_r4.json``.

    Returns:
        ``(metrics, plan)``: test ``test_iou, dice, precision, recall, object_f1`` and the
        plan's choices under ``plan``; the :class:`~mitoseg.inference.plan.InferencePlan`.
    """
    import keras

    from mitoseg.evaluate import masks_to_indices
    from mitoseg.planner import evaluate_split, make_plan

    model = keras.saving.load_model(model_path, compile=False)
    v2i = BASE.value_to_index()
    val = setup.val
    plan, _ = make_plan(
        model,
        EvaluateConfig(engines=["keras/fp32"], plan_on="validation"),
        BASE.class_names,
        setup.images[val] if val else None,
        masks_to_indices(setup.masks[val], v2i, "validation") if val else None,
    )
    m = evaluate_split(
        model, plan, setup.images[TEST], masks_to_indices(setup.masks[TEST], v2i, "test")
    ).metrics
    out: dict[str, Any] = {k: round(float(m[k]), 4) for k in ("dice", "precision", "recall")}
    out["test_iou"] = round(float(m["iou"]), 4)
    out["object_f1"] = round(float(m["objects"]["f1"]), 4)
    out["plan"] = {
        "threshold": plan.threshold,
        "threshold_source": plan.threshold_source,
        "border": plan.border,
        "z_average": plan.z_average,
        "seed_threshold": plan.seed_threshold,
    }
    return out, plan


def suggest_scores(setup: Setup, model_path: Path, plan: Any) -> dict[int, float]:
    """``mitoseg suggest``'s score of every pool slice (the pool as one stack)."""
    import keras

    from mitoseg.suggest import suggest_stack

    model = keras.saving.load_model(model_path, compile=False)
    slices, _, _ = suggest_stack(
        model, setup.images[POOL], plan, flips=FLIPS, tile_size=max(setup.shape)
    )
    return {POOL[s.slice]: s.score for s in slices}


def _round(
    setup: Setup, r: int, label: np.ndarray, added: list[int], seed: int, prev: Path | None,
    where: Path, select_s: float, extra: dict[str, Any],
) -> tuple[RoundResult, Path, Any]:  # fmt: skip
    """Train and score one round; returns its result, model and plan."""
    steps = setup.steps_first if prev is None else setup.steps_per_round
    model, train_s, steps_run = train_round(setup, label, seed, steps, prev, where)
    t0 = time.perf_counter()
    metrics, plan = score(setup, model)
    score_s = time.perf_counter() - t0
    result = RoundResult(
        round=r,
        added=sorted(added),
        labelled_slices=[z for i, z in enumerate(POOL) if label[i].any()],
        labelled_pixels=int(label.sum()),
        steps=steps_run,
        init="scratch" if prev is None else "previous",
        seconds=RoundSeconds(
            select=round(select_s, 1),
            train=round(train_s, 1),
            score=round(score_s, 1),
            total=round(select_s + train_s + score_s, 1),
        ),
        **metrics,
        **extra,
    )
    plan.write(where / "plan.json")
    print(json.dumps({"round": r, **result.model_dump(mode="json")}), flush=True)
    return result, model, plan


def shared_start(setup: Setup, seed: int) -> tuple[RoundResult, Path, Any]:
    """Round 0 of the whole-slice strategies: trained once per seed, cached in the work
    directory (whose name is a digest of the settings)."""
    from mitoseg.inference.plan import InferencePlan
    from mitoseg.io import write_json

    where = setup.work / f"start_s{seed}"
    done = where / "round.json"
    if done.is_file():
        result = RoundResult.model_validate_json(done.read_text())
        return result, where / "train" / "model.keras", InferencePlan.read(where / "plan.json")
    start = even_picks(POOL, [], setup.start)
    label = np.zeros((len(POOL), *setup.shape), dtype=bool)
    label[[POOL.index(z) for z in start]] = True
    out = _round(setup, 0, label, start, seed, None, where, 0.0, {})
    write_json(done, out[0].model_dump(mode="json"))
    return out


def run_arm(setup: Setup, strategy: str, seed: int, commit: str) -> ArmResult:
    """One strategy with one seed through every round."""
    h, w = setup.shape
    arm_dir = setup.work / f"{strategy}_s{seed}"
    label = np.zeros((len(POOL), h, w), dtype=bool)
    rounds: list[RoundResult] = []
    order = region_order(POOL, (h, w), setup.partial_tile, (seed, 2))
    prev: Path | None = None
    plan: Any = None
    for r in range(setup.rounds + 1):
        n_slices = setup.start + r * setup.k
        labelled = [z for i, z in enumerate(POOL) if label[i].all()]
        extra: dict[str, Any] = {}
        t0 = time.perf_counter()
        if strategy == "partial":
            before = label.sum(axis=(1, 2))
            regions = regions_for_pixels(order, n_slices * h * w)
            label = region_mask(regions, POOL, (h, w))
            added = [z for i, z in enumerate(POOL) if label[i].sum() > before[i]]
        elif r == 0:
            result, prev, plan = shared_start(setup, seed)
            label[[POOL.index(z) for z in result.labelled_slices]] = True
            rounds.append(result)
            continue
        else:
            if strategy == "suggest":
                scores = suggest_scores(setup, prev, plan)  # type: ignore[arg-type]
                added = top_k(scores, labelled, setup.k)
                extra["suggest_scores"] = scores
            elif strategy == "random":
                added = random_picks(POOL, labelled, setup.k, (seed, r))
            else:
                added = even_picks(POOL, labelled, setup.k)
            label[[POOL.index(z) for z in added]] = True
        select_s = time.perf_counter() - t0
        result, model, plan = _round(
            setup, r, label, added, seed, prev, arm_dir / f"round{r}", select_s, extra
        )
        if prev is not None and prev.is_relative_to(arm_dir):  # keep one model per arm
            shutil.rmtree(prev.parent.parent)
        prev = model
        rounds.append(result)
    return ArmResult(
        strategy=strategy,  # type: ignore[arg-type]
        seed=seed,
        shared_start=strategy != "partial",
        git_commit=commit,
        rounds=rounds,
    )


def markdown_table(report: ActiveLearningReport) -> str:
    """Test IoU and object F1 per round (rows) and strategy (columns), mean +- sd over
    seeds, with the labelled pixels of each round (as a share of the pool's pixels)."""
    rows: dict[int, dict[str, Any]] = {}
    for s in report.summary:
        rows.setdefault(s.round, {})[s.strategy] = s
    strategies = [s for s in STRATEGIES if any(s in row for row in rows.values())]
    pool_px = len(report.data["pool"]) * report.data["shape"][0] * report.data["shape"][1]

    def cell(row: Any, metric: str) -> str:
        spread = getattr(row, metric)
        sd = "n/a" if spread.sd is None else f"{spread.sd:.3f}"
        return f"{spread.mean:.3f} +- {sd}"

    out = []
    for metric, title in (("test_iou", "test IoU"), ("object_f1", "object F1")):
        out += [
            f"{title} (mean +- sd over seeds)",
            "",
            "| round | labelled slices | labelled pixels | " + " | ".join(strategies) + " |",
            "|---|---|---|" + "---|" * len(strategies),
        ]
        for rnd, row in sorted(rows.items()):
            ref = next((row[s] for s in strategies if s in row and s != "partial"), None)
            ref = ref or row["partial"]
            share = ref.labelled_pixels.mean / pool_px
            out.append(
                f"| {rnd} | {ref.labelled_slices.mean:g} | {share:.0%} | "
                + " | ".join(cell(row[s], metric) if s in row else "" for s in strategies)
                + " |"
            )
        out.append("")
    out.append(
        "labelled slices: whole slices (partial: the same pixels as square regions over "
        f"the pool's slices); labelled pixels: share of the pool's; seeds "
        f"{sorted({a.seed for a in report.arms})}; commit {report.machine.get('git_commit')}"
    )
    return "\n".join(out)


def _check_resume(path: Path, data: dict[str, Any], settings: dict[str, Any]) -> list[ArmResult]:
    """The arms of an earlier run with the same data and settings."""
    old = read_active_learning(path)
    for name, now, then in (("data", data, old.data), ("settings", settings, old.settings)):
        now = json.loads(json.dumps(now))
        diff = sorted(k for k in {*now, *then} if now.get(k) != then.get(k))
        if diff:
            raise SystemExit(
                f"--resume: {path} was measured with other {name} ({', '.join(diff)}); "
                "use another --tag or drop --resume"
            )
    return list(old.arms)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=4, help="rounds after the start")
    parser.add_argument("--k", type=int, default=2, help="slices added per round")
    parser.add_argument("--start", type=int, default=2, help="labelled slices at round 0")
    parser.add_argument("--steps-first", type=int, default=600, help="steps of round 0")
    parser.add_argument(
        "--steps-per-round", type=int, default=300, help="steps of each later round"
    )
    parser.add_argument("--crop", type=int, help="cut every slice to its central CROP x CROP")
    parser.add_argument("--partial-tile", type=int, default=128, help="side of a partial region")
    parser.add_argument(
        "--val-slices", nargs="*", type=int, default=[10, 11],
        help="slices the plan is chosen on (none: threshold 0.5)",
    )  # fmt: skip
    parser.add_argument(
        "--train", default="{}", help="JSON overrides of the default training preset"
    )
    parser.add_argument("--image", type=Path, default=SHARED / "cdeep3m/cdeep3m_train_raw.tif")
    parser.add_argument("--mask", type=Path, default=SHARED / "cdeep3m/cdeep3m_train_mito.tif")
    parser.add_argument("--tag", default="", help="suffix of the result file name")
    parser.add_argument("--out", type=Path, help="result file (default: benchmarks/results/)")
    parser.add_argument("--work", type=Path, help="working directory (default: benchmarks/.work)")
    parser.add_argument("--resume", action="store_true", help="skip arms already in the file")
    parser.add_argument("--table", action="store_true", help="print the file as Markdown")
    args = parser.parse_args(argv)
    out = args.out or RESULTS / f"active_learning{args.tag}.json"
    if args.table:
        print(markdown_table(read_active_learning(out)))
        return
    if args.start < 1 or args.k < 1 or args.rounds < 0:
        parser.error("--start and --k must be >= 1, --rounds >= 0")
    if args.start + args.rounds * args.k > len(POOL):
        parser.error(
            f"--start {args.start} + --rounds {args.rounds} x --k {args.k} labels more than "
            f"the pool's {len(POOL)} slices"
        )
    if min(args.steps_first, args.steps_per_round) < 1:
        parser.error("--steps-first and --steps-per-round must be >= 1")
    if args.partial_tile < 1:
        parser.error(f"--partial-tile must be >= 1, got {args.partial_tile}")
    bad = [z for z in args.val_slices if z in POOL or z in TEST or not 0 <= z < 20]
    if bad:
        parser.error(f"--val-slices {bad}: must be in 10..14 (not the pool 0-9 or test 15-19)")

    from mitoseg.config import resolve_train_config
    from mitoseg.train import setup_determinism

    try:
        cfg = resolve_train_config(json.loads(args.train))
    except (ValueError, TypeError) as exc:
        parser.error(f"--train: {exc}")
    images, masks = load_stack(args.image, args.mask, args.crop)
    shape = [int(s) for s in images.shape[1:]]
    data = {
        "image": str(args.image.resolve()),
        "mask": str(args.mask.resolve()),
        "crop": args.crop,
        "shape": shape,
        "pool": POOL,
        "validation": args.val_slices,
        "test": TEST,
        "never_trained": [z for z in range(POOL[-1] + 1, TEST[0])],
        "ignore_value": IGNORE_VALUE,
    }
    settings = {
        "rounds": args.rounds,
        "k": args.k,
        "start": args.start,
        "start_slices": even_picks(POOL, [], args.start),
        "steps_first": args.steps_first,
        "steps_per_round": args.steps_per_round,
        "patch_size": min(256, *shape),
        "train_crop_size": cfg.crop_size,
        "partial_tile": args.partial_tile,
        "suggest": {"flips": list(FLIPS), "weights": "entropy, flip, neighbour: 1 each"},
        "train": cfg.model_dump(mode="json", exclude={"init_from", "epochs", "steps_per_epoch"}),
    }
    digest = hashlib.sha1(json.dumps([data, settings], sort_keys=True).encode()).hexdigest()[:10]
    work = (args.work or ROOT / "benchmarks" / ".work" / "active_learning") / digest
    arms: list[ArmResult] = []
    if args.resume and out.is_file():
        arms = _check_resume(out, data, settings)
    done = {(a.strategy, a.seed) for a in arms}
    todo = [(st, seed) for seed in args.seeds for st in args.strategies if (st, seed) not in done]
    if not todo:
        print(f"nothing to run: every arm asked for is in {out}")
        return
    setup_determinism(cfg.deterministic)  # before TensorFlow starts
    setup = Setup(
        images, masks, args.val_slices, cfg, args.rounds, args.k, args.start, args.steps_first,
        args.steps_per_round, args.partial_tile, settings["patch_size"], work,
    )  # fmt: skip
    host = machine()
    scoring = (
        f"plan chosen on validation slices {args.val_slices} (labelled, never trained on, "
        "the same for every arm and round): the evaluate stage's make_plan, Keras FP32"
        if args.val_slices
        else "no validation slices: the default plan (threshold 0.5, no z-averaging choice)"
    )
    for strategy, seed in todo:  # seed-major: a stopped run has every strategy at seed 1
        arms.append(run_arm(setup, strategy, seed, host["git_commit"]))
        report = ActiveLearningReport(
            what=WHAT,
            scoring=scoring,
            data=data,
            settings=settings,
            machine=host,
            summary=summarise_arms(arms),
            arms=arms,
        )
        _save(out, report)


def _save(path: Path, report: ActiveLearningReport) -> None:
    """Write the report atomically (``save`` for the default location)."""
    if path.parent == RESULTS:
        save(path.stem, report.model_dump(mode="json"))
    else:
        from mitoseg.io import write_json

        write_json(path, report.model_dump(mode="json"))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
