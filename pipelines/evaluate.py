"""DVC stage ``evaluate``: decide the model's inference plan, then score the test slices.

The plan (:func:`mitoseg.planner.make_plan`: tile halo from the measured receptive field,
threshold, z-averaging and hysteresis chosen on the slices ``evaluate.plan_on`` names:
the validation block ``meta.json["val_slices"]`` of ``<raw>/train`` or the whole training
stack; the fastest engine that holds IoU on the validation block) is written to ``--plan``
(beside ``model.keras``) and attached to the MLflow run and its logged model. The test
split ``<raw>/test`` is then segmented with exactly that plan; ``metrics.json`` (with
``test_data_id``, the fingerprint of those test images and labels),
``per_slice.csv``, ``plan_report.json`` (how the plan was decided: receptive field,
threshold curve, border and engine trials, and the training-stack slices the choices and
the engine timing saw) and ``figures/`` go to ``--out`` and into the
training run
(``run_id`` from ``--train-info``). The reference profile of the training slices
(:func:`mitoseg.data.profile.build_profile` over the validate stage's ``--slices``) is
written to ``--profile`` (beside the plan) and attached to the run and its logged model
the same way, for drift monitoring of the served model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from mitoseg.config import load_section
from mitoseg.data.layout import DATASET_FILE, read_split, split_paths
from mitoseg.data.patches import network_inputs
from mitoseg.data.profile import build_profile
from mitoseg.evaluate import masks_to_indices, write_outputs
from mitoseg.io import DataError, read_json_object, write_json
from mitoseg.train_info import TrainInfo


def _voxel_size(raw: Path) -> list[float] | None:
    meta = read_json_object(raw / DATASET_FILE, "dataset description")
    value = meta.get("voxel_size_nm")
    return [float(v) for v in value] if isinstance(value, list) and len(value) == 3 else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the stage; returns the metrics written to ``metrics.json``."""
    from mitoseg import tracking
    from mitoseg.model.analysis import z_context_of
    from mitoseg.planner import evaluate_split, make_plan, planning_slices

    base = load_section("base", args.params)
    cfg = load_section("evaluate", args.params)
    run_id = TrainInfo.read(args.train_info).run_id
    meta = read_json_object(args.patches / "meta.json", "patch metadata")
    if "val_slices" not in meta:
        raise DataError(f"{args.patches / 'meta.json'}: missing 'val_slices'")
    lut = base.value_to_index()
    model = tracking.load_model(str(args.model))
    progress = not args.no_progress

    images, masks = read_split(args.raw, "train")
    val = [int(i) for i in meta["val_slices"]]
    bad = [i for i in val if not 0 <= i < images.shape[0]]
    if bad:
        raise DataError(
            f"{args.patches / 'meta.json'}: val_slices {bad} out of range for "
            f"{images.shape[0]} training slices"
        )
    train_idx = [i for i in range(images.shape[0]) if i not in set(val)]
    # int8 calibration: up to 4 training slices as the network sees them (uint8 x 255)
    calibration = network_inputs(images, train_idx[:4], z_context_of(model)) if train_idx else None
    chosen_on, engine_slices = planning_slices(images.shape[0], val, cfg.plan_on)
    plan_masks = (
        masks_to_indices(masks[chosen_on], lut, str(split_paths(args.raw, "train")[1]))
        if chosen_on and masks is not None
        else None
    )
    plan, report = make_plan(
        model,
        cfg,
        base.class_names,
        images[chosen_on] if chosen_on else None,
        plan_masks,
        voxel_size_nm=_voxel_size(args.raw),
        calibration_images=calibration,
        engine_slices=engine_slices,
        progress=progress,
    )
    plan.write(args.plan)
    build_profile(args.slices, split="train").write(args.profile)

    test_images, test_masks = read_split(args.raw, "test")
    assert test_masks is not None
    masks_idx = masks_to_indices(test_masks, lut, str(split_paths(args.raw, "test")[1]))
    result = evaluate_split(model, plan, test_images, masks_idx, progress=progress)
    result.metrics["threshold_source"] = plan.threshold_source
    # the fingerprint of the test images and labels these numbers are on (register compares
    # a champion's number only on the same test data)
    result.metrics["test_data_id"] = tracking.compute_test_data_id(args.raw)
    result.metrics["validation"] = dict(plan.validation)
    if plan.calibration is not None:
        result.metrics["validation_calibration"] = plan.calibration.model_dump()
    paths = write_outputs(
        result,
        args.out,
        cfg.figure_slices,
        min_object_size=plan.min_object_size,
        voxel_size=_voxel_size(args.raw),
    )
    report_path = args.out / "plan_report.json"
    report.plan_on = cfg.plan_on
    report.chosen_on_slices = chosen_on
    report.engines_timed_on_slices = [chosen_on[i] for i in engine_slices]
    write_json(report_path, report.to_json())
    tracking.log_evaluation(
        run_id,
        result.metrics,
        [paths["metrics"], paths["per_slice"], paths["objects"], report_path, *paths["figures"]],
    )
    tracking.log_inference_plan(run_id, args.plan)
    tracking.log_model_file(run_id, args.profile)
    return result.metrics


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments of dvc.yaml's ``evaluate`` command and run the stage."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", type=Path, required=True, help="trained .keras model")
    p.add_argument("--train-info", type=Path, required=True, help="train.json (run_id)")
    p.add_argument("--raw", type=Path, required=True, help="canonical raw data directory")
    p.add_argument("--patches", type=Path, required=True, help="patch dir with meta.json")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument(
        "--plan", type=Path, required=True, help="inference plan to write (beside model.keras)"
    )
    p.add_argument("--slices", type=Path, required=True, help="slices.csv of the validate stage")
    p.add_argument(
        "--profile", type=Path, required=True, help="reference profile to write (beside the plan)"
    )
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
        f"engine={metrics['engine']} ({metrics['n_test_slices']} slices) -> {args.out}, "
        f"plan {args.plan}, reference profile {args.profile}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
