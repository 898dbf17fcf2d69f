"""Self-supervised pre-training on a volume's unlabelled slices, then fine-tuning.

A lab annotates a few slices of a volume and has all the others raw. Here the default
recipe's UNet is first pre-trained to fill in masked squares of unlabelled CDeep3M
slices (:func:`mitoseg.pretrain.pretrain_model`): slices 0-14 of the training stack
(their labels unused) and the five slices of ``cdeep3m_test_raw.tif``; never the test
slices 15-19. It is then trained on the gap split (train 0-9, of which the patchify stage
holds a block out for the plan, skip 10-14, test 15-19) with ``train.init_from``, against
the same recipe from scratch for the same number of optimizer steps; both get the
evaluate stage's plan on the validation slices (:func:`mitoseg.planner.make_plan`) and
are scored on slices 15-19 (:func:`mitoseg.planner.evaluate_split`). Step-bounded and
deterministic, so the comparison does not depend on the machine's load; the seconds of
pre-training are reported beside, for accuracy per CPU-second.

Usage:
    python benchmarks/selfsupervised.py --pretrain-steps 1500 --steps 1500
Writes benchmarks/results/selfsupervised_cdeep3m_gap.json.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from accuracy import SHARED, prepare, run_recipe
from common import ROOT, machine, save
from mitoseg.config import AugmentConfig, resolve_train_config

UNLABELLED = (
    ("cdeep3m/cdeep3m_train_raw.tif", range(0, 15)),
    ("cdeep3m/cdeep3m_test_raw.tif", None),
)


def unlabelled_slices() -> tuple[np.ndarray, list[str]]:
    """``(N, H, W) uint8`` network intensities of the unlabelled slices, and their names."""
    from mitoseg.data.patches import network_inputs
    from mitoseg.io import read_stack

    out, names = [], []
    for rel, which in UNLABELLED:
        path = SHARED / rel
        if not path.is_file():
            raise SystemExit(f"{path}: not found (this benchmark needs ../shared/data)")
        stack = read_stack(path)
        stack = stack if stack.ndim == 3 else stack[None]
        slices = list(which if which is not None else range(stack.shape[0]))
        out.append(network_inputs(stack, slices))
        names += [f"{path.name}[{z}]" for z in slices]
    return np.concatenate(out), names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--steps", type=int, default=1500, help="steps of each segmentation run")
    parser.add_argument("--square", type=int, default=16, help="side of the masked squares")
    parser.add_argument("--mask-ratio", type=float, default=0.5)
    parser.add_argument("--modes", nargs="+", default=["scratch", "ssl"],
                        choices=["scratch", "ssl"])  # fmt: skip
    args = parser.parse_args()
    from mitoseg.pretrain import pretrain_model

    work = ROOT / "benchmarks" / ".work" / "selfsupervised_cdeep3m_gap"
    raw, base, split = prepare("cdeep3m", "gap", work)
    cfg = resolve_train_config({})
    slices, names = unlabelled_slices()
    per_epoch = 50
    pre = pretrain_model(
        slices, cfg.model, epochs=max(1, round(args.pretrain_steps / per_epoch)),
        steps_per_epoch=per_epoch, batch_size=cfg.batch_size, crop_size=cfg.crop_size,
        square=args.square, mask_ratio=args.mask_ratio, augment=AugmentConfig(), seed=base.seed,
    )  # fmt: skip
    pretrained = work / "pretrained.keras"
    pre.model.save(pretrained)
    rows: dict[str, Any] = {}
    for mode in args.modes:
        run = run_recipe(
            "default", None, args.steps, [], raw, base, work,
            init_from=pretrained if mode == "ssl" else None, label=mode,
        )  # fmt: skip
        rows[mode] = {**run["curve"][-1], "epochs_run": run["epochs_run"],
                      "train_wall_s": run["train_wall_s"]}  # fmt: skip
        print(mode, rows[mode], flush=True)
        save(
            "selfsupervised_cdeep3m_gap",
            {
                "what": "the default recipe pre-trained by masked-square reconstruction on "
                "unlabelled CDeep3M slices (ssl), then trained on the gap split with "
                "train.init_from, against the same recipe from scratch, both for the same "
                "optimizer steps; plan chosen on the validation slices, scored on 15-19",
                "split": split,
                "unlabelled": names,
                "pretrain": {
                    "steps": pre.steps,
                    "seconds": pre.seconds,
                    "square": args.square,
                    "mask_ratio": args.mask_ratio,
                    "losses": [round(v, 5) for v in pre.losses],
                },
                "steps": args.steps,
                "rows": rows,
                "machine": machine(),
            },
        )


if __name__ == "__main__":
    main()
