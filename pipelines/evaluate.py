"""DVC stage ``evaluate``: whole-slice test metrics of the trained model.

Chooses the foreground threshold on the validation *slices* (``meta.json["val_slices"]`` of
``<raw>/train``) when ``evaluate.threshold`` is ``auto``, segments ``<raw>/test`` with tiled
inference, writes ``metrics.json``, ``per_slice.csv`` and ``figures/`` to ``--out`` and
logs the metrics and figures into the training run (``run_id`` from ``--train-info``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from mitoseg.config import load_section
from mitoseg.data.layout import read_split, split_paths
from mitoseg.evaluate import (
    choose_threshold,
    evaluate_stack,
    masks_to_indices,
    write_outputs,
)
from mitoseg.io import DataError, read_json_object


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the stage; returns the metrics written to ``metrics.json``."""
    from mitoseg import tracking

    base = load_section("base", args.params)
    cfg = load_section("evaluate", args.params)
    train_info = read_json_object(args.train_info, "train info")
    meta = read_json_object(args.patches / "meta.json", "patch metadata")
    if "run_id" not in train_info:
        raise DataError(f"{args.train_info}: missing 'run_id'")
    if "val_slices" not in meta:
        raise DataError(f"{args.patches / 'meta.json'}: missing 'val_slices'")
    lut = base.value_to_index()
    model = tracking.load_model(str(args.model))
    progress = not args.no_progress

    threshold_source = "params"
    threshold_scores: dict[str, float] = {}
    if cfg.threshold == "auto" and base.is_binary and meta["val_slices"]:
        images, masks = read_split(args.raw, "train")
        val = [int(i) for i in meta["val_slices"]]
        bad = [i for i in val if not 0 <= i < images.shape[0]]
        if bad:
            raise DataError(
                f"{args.patches / 'meta.json'}: val_slices {bad} out of range for "
                f"{images.shape[0]} training slices"
            )
        threshold, scores = choose_threshold(
            model,
            images[val],
            masks_to_indices(masks[val], lut, str(split_paths(args.raw, "train")[1])),
            cfg.threshold_grid,
            tile_size=cfg.tile_size,
            overlap=cfg.overlap,
            batch_size=cfg.batch_size,
            tta=cfg.tta,
            progress=progress,
        )
        threshold_source = "validation"
        threshold_scores = {f"{g:g}": s for g, s in scores.items()}
    elif cfg.threshold == "auto":
        threshold = 0.5
        threshold_source = "default" if base.is_binary else "argmax"
    else:
        threshold = float(cfg.threshold)

    test_images, test_masks = read_split(args.raw, "test")
    assert test_masks is not None
    masks_idx = masks_to_indices(test_masks, lut, str(split_paths(args.raw, "test")[1]))
    result = evaluate_stack(
        model,
        test_images,
        masks_idx,
        cfg,
        threshold,
        base.n_classes,
        base.class_names,
        progress=progress,
    )
    result.metrics["threshold_source"] = threshold_source
    result.metrics["threshold_scores"] = threshold_scores
    paths = write_outputs(result, args.out, cfg.figure_slices)
    tracking.log_evaluation(
        train_info["run_id"],
        result.metrics,
        [paths["metrics"], paths["per_slice"], *paths["figures"]],
    )
    return result.metrics


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments of dvc.yaml's ``evaluate`` command and run the stage."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", type=Path, required=True, help="trained .keras model")
    p.add_argument("--train-info", type=Path, required=True, help="train.json (run_id)")
    p.add_argument("--raw", type=Path, required=True, help="canonical raw data directory")
    p.add_argument("--patches", type=Path, required=True, help="patch dir with meta.json")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = p.parse_args(argv)
    try:
        metrics = run(args)
    except (DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"test iou={metrics['iou']:.4f} dice={metrics['dice']:.4f} "
        f"mean_iou={metrics['mean_iou']:.4f} threshold={metrics['threshold']} "
        f"({metrics['n_test_slices']} slices) -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
