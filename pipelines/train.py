"""DVC stage `train`: train the UNet on the patches, tracked in MLflow.

Reads ``base`` and ``train`` from the params file, ``n_classes``/``class_names`` from
``PATCHES/meta.json`` and the augmentation spec from the augment stage; writes
``OUT/model.keras`` (best epoch), ``OUT/history.csv`` and ``OUT/train.json``. A killed run
resumes from its last epoch (backups under ``--checkpoints``) when rerun with the same
configuration and data.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mitoseg.augment import read_augment_spec
from mitoseg.config import ConfigError, load_section
from mitoseg.io import DataError, read_json_object, write_json


def _read_meta(patches: Path, n_classes: int) -> list[str]:
    meta_path = patches / "meta.json"
    meta = read_json_object(meta_path, "patch metadata")
    try:
        meta_classes, names = int(meta["n_classes"]), list(meta["class_names"])
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{meta_path}: invalid patch metadata ({exc!r})") from None
    if meta_classes != n_classes:
        raise DataError(
            f"{meta_path}: n_classes {meta_classes} differs from base.classes ({n_classes}); "
            "rerun the patchify stage"
        )
    return names


def main(argv: list[str] | None = None) -> int:
    """Run the stage; returns the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=Path, required=True)
    parser.add_argument("--augment", type=Path, required=True, help="augment.json")
    parser.add_argument("--checkpoints", type=Path, required=True, help="resume backups")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--no-progress", action="store_true", help="no per-epoch lines")
    args = parser.parse_args(argv)
    try:
        base = load_section("base", args.params)
        cfg = load_section("train", args.params)
        class_names = _read_meta(args.patches, base.n_classes)
        augment_cfg, _ = read_augment_spec(args.augment)
    except (ConfigError, DataError) as exc:
        print(f"train: {exc}", file=sys.stderr)
        return 1

    from mitoseg import tracking
    from mitoseg.train import train_model

    tracking.configure_tracking()
    params = {
        **cfg.model_dump(mode="json"),
        "augment": augment_cfg.model_dump(mode="json"),
        "seed": base.seed,
        "n_classes": base.n_classes,
    }
    tags = tracking.lineage_tags(Path.cwd())
    run_name = f"{cfg.preset}-{cfg.model.variant}-d{cfg.model.depth}-f{cfg.model.base_filters}"
    try:
        with tracking.start_training_run(params, tags, run_name) as run:
            result = train_model(
                args.patches,
                augment_cfg,
                cfg,
                base.n_classes,
                base.seed,
                args.out,
                args.checkpoints,
                progress=not args.no_progress,
                callbacks=[tracking.make_epoch_logger()],
            )
            tracking.log_training_outcome(
                result, args.out / "history.csv", base.n_classes, class_names
            )
            run_id, experiment_id = run.info.run_id, run.info.experiment_id
    except (DataError, ValueError) as exc:
        print(f"train: {exc}", file=sys.stderr)
        return 1
    write_json(
        args.out / "train.json",
        {
            "run_id": run_id,
            "experiment_id": experiment_id,
            "model_path": str(result.model_path),
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            "train_seconds": round(result.train_seconds, 3),
            "patches_per_second": round(result.patches_per_second, 3),
            "params": cfg.model_dump(mode="json"),
            "n_classes": base.n_classes,
            "class_names": class_names,
            "resumed": result.resumed,
            "stop_reason": result.stop_reason,
        },
    )
    print(
        f"train: best epoch {result.best_epoch}/{result.epochs_run} ({result.stop_reason}), "
        f"{result.patches_per_second:.1f} patches/s, model {result.model_path}, run {run_id}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
