"""DVC stage `train`: train the UNet on the patches, tracked in MLflow.

Reads ``base`` and ``train`` from the params file, ``n_classes``/``class_names`` from
``PATCHES/meta.json`` and the augmentation spec from the augment stage; writes
``OUT/model.keras`` (best epoch), ``OUT/history.csv`` and ``OUT/train.json``. A killed run
resumes from its last epoch (backups under ``--checkpoints``) when rerun with the same
configuration and data; its MLflow run is then ended as KILLED and the new run holds the
full history. ``train.init_from`` (a ``.keras`` file or a ``models:/``/``runs:/`` URI)
starts from that model's weights; the run is tagged with the model it started from, its
seed, and the spread over seeds that ``benchmarks/stability.py`` measured for its recipe
(``--stability``), so a run says how far another seed may land.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from mitoseg.augment import read_augment_spec
from mitoseg.config import ConfigError, TrainConfig, load_section
from mitoseg.io import DataError, read_json_object
from mitoseg.stability import read_stability, spread_tags
from mitoseg.train_info import TRAIN_INFO_FILE, TrainInfo


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


def _init_tags(info: dict[str, Any], digest: str) -> dict[str, str]:
    """Run tags naming the model a fine-tuning run started from."""
    tags = {"init_from": str(info["uri"]), "init_weights_digest": digest}
    for key in ("name", "version", "alias", "run_id"):
        if info.get(key) is not None:
            tags[f"init_from_{key}"] = str(info[key])
    return tags


def _budget(cfg: TrainConfig) -> str:
    """How the run is bounded, e.g. ``steps`` or ``steps+wall_clock:420s``."""
    if cfg.max_train_seconds is None:
        return "steps"
    return f"steps+wall_clock:{cfg.max_train_seconds:g}s"


def main(argv: list[str] | None = None) -> int:
    """Run the stage; returns the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=Path, required=True)
    parser.add_argument("--augment", type=Path, required=True, help="augment.json")
    parser.add_argument("--checkpoints", type=Path, required=True, help="resume backups")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--no-progress", action="store_true", help="no per-epoch lines")
    parser.add_argument(
        "--stability",
        type=Path,
        help="benchmarks/stability.py results: the recipe's measured spread over seeds is "
        "logged with the run",
    )
    args = parser.parse_args(argv)
    try:
        base = load_section("base", args.params)
        cfg = load_section("train", args.params)
        class_names = _read_meta(args.patches, base.n_classes)
        augment_cfg, _ = read_augment_spec(args.augment)
        spread = (
            spread_tags(read_stability(args.stability), cfg.preset)
            if args.stability is not None
            else {"stability.measured_at": "no stability results given"}
        )
    except (ConfigError, DataError) as exc:
        print(f"train: {exc}", file=sys.stderr)
        return 1

    from mitoseg import tracking
    from mitoseg.model.callbacks import MlflowEpochLogger
    from mitoseg.train import initial_weights, setup_determinism, train_model, weights_digest

    setup_determinism(cfg.deterministic)  # before TensorFlow starts (loading init_from)
    tracking.configure_tracking()
    init_weights, init_tags = None, {}
    if cfg.init_from is not None:
        try:
            source = tracking.load_model(cfg.init_from)
            init_weights = initial_weights(source, cfg, base.n_classes)
            init_tags = _init_tags(tracking.model_info(cfg.init_from), weights_digest(init_weights))
        except (LookupError, ValueError) as exc:
            print(f"train: {exc}", file=sys.stderr)
            return 1
    params = {
        **cfg.model_dump(mode="json"),
        "augment": augment_cfg.model_dump(mode="json"),
        "seed": base.seed,
        "n_classes": base.n_classes,
    }
    tags = {
        **tracking.lineage_tags(Path.cwd()),
        **init_tags,
        **spread,
        "train_budget": _budget(cfg),
        "seed": str(base.seed),
    }
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
                callbacks=[MlflowEpochLogger()],
                init_weights=init_weights,
            )
            tracking.log_training_outcome(
                result, args.out / "history.csv", base.n_classes, class_names
            )
            run_id, experiment_id = run.info.run_id, run.info.experiment_id
    except (DataError, ValueError) as exc:
        print(f"train: {exc}", file=sys.stderr)
        return 1
    TrainInfo(
        run_id=run_id,
        experiment_id=experiment_id,
        model_path=str(result.model_path),
        best_epoch=result.best_epoch,
        epochs_run=result.epochs_run,
        train_seconds=round(result.train_seconds, 3),
        patches_per_second=round(result.patches_per_second, 3),
        params=cfg.model_dump(mode="json"),
        n_classes=base.n_classes,
        class_names=class_names,
        resumed=result.resumed,
        stop_reason=result.stop_reason,
        run_key=result.run_key,
        init_from=cfg.init_from,
    ).write(args.out / TRAIN_INFO_FILE)
    print(
        f"train: best epoch {result.best_epoch}/{result.epochs_run} ({result.stop_reason}), "
        f"{result.patches_per_second:.1f} patches/s, model {result.model_path}, run {run_id}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
