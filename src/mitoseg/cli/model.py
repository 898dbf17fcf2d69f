"""``mitoseg predict`` and ``mitoseg evaluate``: tiled inference with a saved or registered model.

MODEL is a ``.keras`` file or an MLflow URI (``models:/mitoseg-unet@champion``,
``models:/mitoseg-unet/1``, ``runs:/<id>/model``), loaded with
:func:`mitoseg.tracking.load_model`. The foreground threshold is ``--threshold`` when given,
else the ``threshold`` metric logged on the model's run (MLflow URIs), else 0.5.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from mitoseg.cli.app import STATE, app, fail

#: Output file name of ``mitoseg predict`` for an input ``NAME.ext``.
MASK_SUFFIX = "_mask.tif"


def load_model_and_threshold(model: str) -> tuple[Any, float | None]:
    """Load MODEL and the threshold logged with it.

    Returns:
        ``(keras model, threshold or None)``; the threshold is the one logged by
        evaluation on the model's run (MLflow URIs), None for ``.keras`` files.

    Raises:
        typer.Exit: (through :func:`fail`) a model that cannot be found or loaded.
    """
    from mitoseg import tracking

    try:
        loaded = tracking.load_model(model)
    except Exception as exc:  # keras / mlflow raise many types for bad models and URIs
        fail(f"cannot load model {model}: {exc}")
    try:
        threshold = tracking.find_threshold(model)
    except Exception as exc:  # the model loaded; a missing run record only costs the threshold
        typer.echo(f"warning: {model}: no logged threshold ({exc}); using 0.5", err=True)
        threshold = None
    return loaded, None if threshold is None else float(threshold)


def model_classes(model: Any) -> int:
    """Number of classes of a Keras model: 2 for one sigmoid channel, else the channels."""
    channels = int(model.output_shape[-1])
    return 2 if channels == 1 else channels


def _check_threshold(threshold: float | None) -> None:
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        fail(f"--threshold must be in [0, 1], got {threshold}")


@app.command("predict")
def predict(
    images: list[Path] = typer.Argument(
        ..., help="TIFF stacks or 2D PNG/TIFF/JPEG images (8/16-bit, RGB converted to grey)."
    ),
    model: str = typer.Option(..., "--model", help=".keras file or models:/, runs:/ URI"),
    out: Path = typer.Option(..., "--out", help="output directory for the mask TIFFs"),
    tile_size: int = typer.Option(256, "--tile-size", help="tile side, a multiple of 16"),
    overlap: float = typer.Option(0.5, "--overlap", help="tile overlap fraction in [0, 1)"),
    batch_size: int = typer.Option(8, "--batch-size", help="tiles per model call"),
    tta: bool = typer.Option(False, "--tta", help="average the 8 flips/rotations"),
    threshold: float | None = typer.Option(
        None, "--threshold", help="foreground threshold (default: the model's, else 0.5)"
    ),
) -> None:
    """Segment images; write one mask TIFF per input as OUT/<name>_mask.tif.

    Masks keep the input's (Z,) H, W shape; binary: 0/255, multiclass: class index.
    """
    from mitoseg.inference import check_tiling, mask_to_image, segment_stack
    from mitoseg.io import DataError, read_stack, write_stack

    try:
        check_tiling(tile_size, overlap, batch_size)
    except ValueError as exc:
        fail(str(exc))
    _check_threshold(threshold)
    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        fail(f"input not found: {', '.join(missing)}")
    targets = [out / f"{p.stem}{MASK_SUFFIX}" for p in images]
    if len(set(targets)) != len(targets):
        fail("two inputs have the same file name stem; their masks would overwrite each other")
    net, logged = load_model_and_threshold(model)
    thr = threshold if threshold is not None else (logged if logged is not None else 0.5)
    n_classes = model_classes(net)
    for path, target in zip(images, targets, strict=True):
        try:
            stack = read_stack(path)
            mask = segment_stack(
                net,
                stack,
                tile_size=tile_size,
                overlap=overlap,
                batch_size=batch_size,
                tta=tta,
                threshold=thr,
                progress=STATE.progress,
            )
        except (DataError, ValueError) as exc:
            fail(str(exc))
        image = mask_to_image(mask, n_classes)
        write_stack(target, image[0] if image.shape[0] == 1 else image)
        fg = float((mask != 0).mean())
        typer.echo(f"{path} {tuple(stack.shape)} -> {target} (foreground {fg:.1%})")


@app.command("evaluate")
def evaluate(
    model: str = typer.Option(..., "--model", help=".keras file or models:/, runs:/ URI"),
    images: Path = typer.Option(..., "--images", help="image stack (TIFF) or 2D image"),
    masks: Path = typer.Option(..., "--masks", help="mask stack: 0/255 or 0/1, or label map"),
    as_json: bool = typer.Option(False, "--json", help="print the metrics as JSON"),
    threshold: float | None = typer.Option(
        None, "--threshold", help="foreground threshold (default: the model's, else 0.5)"
    ),
    params: Path | None = typer.Option(
        None, "--params", help="params.yaml with base.classes and evaluate settings"
    ),
) -> None:
    """Score MODEL on a labelled stack (whole-slice tiled inference)."""
    from mitoseg.config import BaseConfig, ConfigError, EvaluateConfig, load_section
    from mitoseg.evaluate import evaluate_stack, masks_to_indices
    from mitoseg.io import DataError, read_stack

    _check_threshold(threshold)
    for path in (images, masks):
        if not path.is_file():
            fail(f"{path}: file not found")
    try:
        base = load_section("base", params) if params else BaseConfig()
        cfg = load_section("evaluate", params) if params else EvaluateConfig()
        image_stack = read_stack(images)
        mask_stack = read_stack(masks)
        if image_stack.shape != mask_stack.shape:
            raise DataError(
                f"{masks}: mask shape {mask_stack.shape} does not match image shape "
                f"{image_stack.shape} of {images}"
            )
        truth = masks_to_indices(mask_stack, base.value_to_index(), str(masks))
    except (ConfigError, DataError) as exc:
        fail(str(exc))
    net, logged = load_model_and_threshold(model)
    if threshold is not None:
        thr = threshold
    elif logged is not None:
        thr = logged
    elif isinstance(cfg.threshold, float):
        thr = cfg.threshold
    else:
        thr = 0.5
    try:
        result = evaluate_stack(
            net,
            image_stack,
            truth,
            cfg,
            thr,
            base.n_classes,
            base.class_names,
            progress=STATE.progress,
        )
    except ValueError as exc:
        fail(str(exc))
    metrics = result.metrics
    if as_json:
        typer.echo(json.dumps(metrics, indent=2))
        return
    _print_table(metrics)


def _print_table(metrics: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"mitoseg evaluate ({metrics['n_test_slices']} slices)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("iou", "mean_iou", "dice", "accuracy", "precision", "recall"):
        table.add_row(key, f"{metrics[key]:.4f}")
    table.add_row(
        "threshold", "argmax" if metrics["threshold"] is None else f"{metrics['threshold']:g}"
    )
    obj = metrics["objects"]
    table.add_row(
        "objects (true / pred / matched)", f"{obj['n_true']} / {obj['n_pred']} / {obj['n_matched']}"
    )
    table.add_row("object f1", f"{obj['f1']:.4f}")
    for name, scores in metrics["per_class"].items():
        table.add_row(f"{name} iou", f"{scores['iou']:.4f}")
    Console().print(table)
