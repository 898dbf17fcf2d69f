"""``mitoseg predict`` and ``mitoseg evaluate``: tiled inference with a saved or registered model.

MODEL is a ``.keras`` file or an MLflow URI (``models:/mitoseg-unet@champion``,
``models:/mitoseg-unet/1``, ``runs:/<id>/model``), loaded with its inference plan by
:func:`mitoseg.tracking.load_model_and_plan`. The plan decides tiling, normalisation,
threshold and engine; the flags override single fields of it, nothing else decides.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from mitoseg.cli.app import app, fail, options

#: Output file name of ``mitoseg predict`` for an input ``NAME.ext``.
MASK_SUFFIX = "_mask.tif"


def load_model_and_plan(model: str, **overrides: Any) -> tuple[Any, Any]:
    """Load MODEL and its inference plan, with command-line overrides applied.

    Returns:
        ``(keras model, InferencePlan)``. A model without a stored plan runs with the
        default plan derived from the network (a warning says so).

    Raises:
        typer.Exit: (through :func:`fail`) a model or plan that cannot be loaded, or an
            override the plan rejects.
    """
    from mitoseg import tracking

    try:
        net, plan = tracking.load_model_and_plan(model)
    except Exception as exc:  # keras / mlflow raise many types for bad models and URIs
        fail(f"cannot load model {model}: {exc}")
    if plan.source == "default":
        typer.echo(
            f"warning: {model} has no inference plan; using defaults derived from the network "
            f"(threshold {plan.threshold})",
            err=True,
        )
    if overrides.pop("no_hysteresis", False):
        plan = plan.model_copy(update={"seed_threshold": None})  # always a valid plan
    try:
        plan = plan.with_overrides(**overrides)
    except ValueError as exc:
        fail(str(exc))
    return net, plan


def _overrides(
    tile_size: int | None,
    halo: int | None,
    batch_size: int | None,
    tta: bool | None,
    threshold: float | None,
    engine: str | None,
    no_hysteresis: bool = False,
) -> dict[str, Any]:
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        fail(f"--threshold must be in [0, 1], got {threshold}")
    runtime = precision = None
    if engine is not None:
        runtime, _, precision = engine.partition("/")
        if not precision:
            fail(f"--engine must be RUNTIME/PRECISION, e.g. keras/fp32, got {engine!r}")
    out = {
        "tile_size": tile_size,
        "halo": halo,
        "batch_size": batch_size,
        "tta": tta,
        "threshold": threshold,
        "runtime": runtime,
        "precision": precision,
    }
    if threshold is not None:
        out["threshold_source"] = "params"
    if no_hysteresis:
        out["no_hysteresis"] = True
    return out


_TILE_OPT = typer.Option(None, "--tile-size", help="largest tile side (default: the plan's)")
_HALO_OPT = typer.Option(None, "--halo", help="context pixels per tile side (default: plan's)")
_BATCH_OPT = typer.Option(None, "--batch-size", help="tiles per model call (default: plan's)")
_TTA_OPT = typer.Option(None, "--tta/--no-tta", help="average the 8 flips/rotations")
_THRESHOLD_OPT = typer.Option(
    None, "--threshold", help="foreground threshold (default: the plan's, chosen on validation)"
)
_NO_HYSTERESIS_OPT = typer.Option(
    False,
    "--no-hysteresis",
    help="threshold alone: drop the plan's seed threshold (hysteresis)",
)
_ENGINE_OPT = typer.Option(
    None, "--engine", help="inference engine RUNTIME/PRECISION (default: the plan's)"
)


def _parse_voxel_size(text: str | None) -> tuple[float, float, float] | None:
    if text is None:
        return None
    from mitoseg.io import check_voxel_size

    try:
        return check_voxel_size([v for v in text.split(",")], "--voxel-size")
    except ValueError as exc:
        fail(str(exc))


def _is_volume(uri: str) -> bool:
    from mitoseg.volume.store import is_volume_uri

    return is_volume_uri(uri)


@app.command("predict")
def predict(
    images: list[str] = typer.Argument(
        ...,
        help="TIFF stacks or 2D PNG/TIFF/JPEG images (8/16-bit, RGB converted to grey), or "
        "one Zarr / OME-Zarr volume (local or s3://) for blockwise prediction on Dask.",
    ),
    model: str = typer.Option(..., "--model", help=".keras file or models:/, runs:/ URI"),
    out: str = typer.Option(
        ..., "--out", help="output directory for the mask TIFFs, or an OUT.zarr volume"
    ),
    tile_size: int | None = _TILE_OPT,
    halo: int | None = _HALO_OPT,
    batch_size: int | None = _BATCH_OPT,
    tta: bool | None = _TTA_OPT,
    threshold: float | None = _THRESHOLD_OPT,
    engine: str | None = _ENGINE_OPT,
    no_hysteresis: bool = _NO_HYSTERESIS_OPT,
    voxel_size: str | None = typer.Option(
        None,
        "--voxel-size",
        help="Z,Y,X voxel size in nm (default: from the input's TIFF/ImageJ/OME metadata, "
        "else the model's training data's, from its inference plan)",
    ),
    instances: bool = typer.Option(
        False,
        "--instances",
        help="TIFF input: also write <name>_instances.tif (uint32, one id per "
        "mitochondrion, 3D connected components) and <name>_objects.csv",
    ),
    workers: int = typer.Option(2, "--workers", min=1, help="volume: LocalCluster workers"),
    scheduler: str | None = typer.Option(
        None, "--scheduler", help="volume: attach to a running Dask scheduler tcp://HOST:PORT"
    ),
    block_z: int | None = typer.Option(
        None,
        "--block-z",
        min=1,
        help="volume: slices per block (default: from the plan, at least 8 and enough that "
        "z-averaging's halo costs at most 10 % of a block's predictions)",
    ),
    block_yx: int | None = typer.Option(
        None,
        "--block-yx",
        min=1,
        help="volume: also cut slices into YX tiles of this side (slices too large for one "
        "worker); same result as whole slices",
    ),
    probabilities: bool = typer.Option(
        False, "--probabilities", help="volume: also store uint8 probabilities"
    ),
    force: bool = typer.Option(False, "--force", help="volume: replace an existing output"),
    ngff: str = typer.Option(
        "0.5", "--ngff", help="volume: output OME-Zarr version, 0.5 (Zarr v3) or 0.4 (Zarr v2)"
    ),
) -> None:
    """Segment images with the model's inference plan; write OUT/<name>_mask.tif each.

    Masks keep the input's (Z,) H, W shape; binary: 0/255, multiclass: class index. The
    input's voxel size (or --voxel-size; else the plan's, that of the model's training
    data) is written into every output TIFF. A Zarr /
    OME-Zarr input, or an --out ending in .zarr, runs blockwise on Dask (see
    :mod:`mitoseg.volume`): OME-Zarr image + pyramid, labels/mask, labels/instances and
    objects.csv; resumable after a kill.
    """
    overrides = _overrides(tile_size, halo, batch_size, tta, threshold, engine, no_hysteresis)
    vs = _parse_voxel_size(voxel_size)
    if any(_is_volume(p) for p in images) or out.rstrip("/").endswith(".zarr"):
        if len(images) != 1:
            fail("a volume job takes exactly one input")
        _predict_volume(
            images[0], out, model, overrides, vs, workers, scheduler, block_z,
            probabilities, force, ngff, block_yx,
        )  # fmt: skip
        return
    _predict_files([Path(p) for p in images], model, Path(out), overrides, vs, instances)


def _predict_volume(
    source: str,
    target: str,
    model: str,
    overrides: dict[str, Any],
    voxel_size: tuple[float, float, float] | None,
    workers: int,
    scheduler: str | None,
    block_z: int | None,
    probabilities: bool,
    force: bool,
    ngff: str,
    block_yx: int | None = None,
) -> None:
    from mitoseg.io import DataError

    try:
        from mitoseg.volume.job import run_volume_job
        from mitoseg.volume.store import open_volume
    except ImportError as exc:
        fail(
            f"volume prediction needs zarr, ome-zarr and dask.distributed ({exc.name} is "
            "missing): pip install 'mitoseg[volume]'"
        )

    try:  # bad input is reported before the model is loaded
        vol = open_volume(source, voxel_size)
        own = vol.voxel_size_nm
        vol.close()
    except (DataError, ValueError) as exc:
        fail(str(exc))
    net, plan = load_model_and_plan(model, **overrides)
    if own is None:  # the input says nothing: the training data's, from the plan
        voxel_size = _plan_voxel_size(plan, source)
    try:
        summary = run_volume_job(
            source,
            target,
            net,
            plan,
            workers=workers,
            scheduler=scheduler,
            block_z=block_z,
            block_yx=block_yx,
            probabilities=probabilities,
            force=force,
            voxel_size_nm=voxel_size,
            ngff_version=ngff,
            progress=options().progress,
        )
    except (DataError, ValueError, FileExistsError) as exc:
        fail(str(exc))
    typer.echo(
        f"{source} {tuple(summary['shape'])} -> {target}: {summary['blocks']} blocks "
        f"({summary['skipped']} already done), {summary['objects']} objects, "
        f"foreground {summary['foreground']:.1%}"
    )


def _predict_files(
    images: list[Path],
    model: str,
    out: Path,
    overrides: dict[str, Any],
    voxel_size: tuple[float, float, float] | None,
    instances: bool,
) -> None:
    from mitoseg.inference.predict import mask_to_image, segment_stack
    from mitoseg.inference.runtime import predictor_for_plan
    from mitoseg.io import DataError, read_stack, read_voxel_size, write_stack

    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        fail(f"input not found: {', '.join(missing)}")
    targets = [out / f"{p.stem}{MASK_SUFFIX}" for p in images]
    if len(set(targets)) != len(targets):
        fail("two inputs have the same file name stem; their masks would overwrite each other")
    net, plan = load_model_and_plan(model, **overrides)
    try:
        predict_batch = predictor_for_plan(net, plan)
    except ValueError as exc:
        fail(str(exc))
    for path, target in zip(images, targets, strict=True):
        try:
            stack = read_stack(path)
            vs = voxel_size if voxel_size is not None else read_voxel_size(path)
            vs = vs if vs is not None else _plan_voxel_size(plan, str(path))
            mask = segment_stack(predict_batch, stack, plan, progress=options().progress)
        except (DataError, ValueError) as exc:
            fail(str(exc))
        image = mask_to_image(mask, plan.n_classes)
        squeeze = image.shape[0] == 1
        write_stack(target, image[0] if squeeze else image, vs)
        fg = float((mask != 0).mean())
        extra = ""
        if instances:
            extra = _write_instances(path, stack, mask, plan, out, vs, squeeze)
        typer.echo(f"{path} {tuple(stack.shape)} -> {target} (foreground {fg:.1%}){extra}")


def _plan_voxel_size(plan: Any, where: str) -> tuple[float, float, float] | None:
    """The plan's (training data's) voxel size for an input without one, said on stderr."""
    if plan.voxel_size_nm is None:
        return None
    z, y, x = (float(v) for v in plan.voxel_size_nm)
    typer.echo(
        f"{where}: no voxel size in the input; using the model's training data's "
        f"{z:g},{y:g},{x:g} nm (Z,Y,X; --voxel-size to set it)",
        err=True,
    )
    return z, y, x


def _write_instances(
    path: Path,
    stack: Any,
    mask: Any,
    plan: Any,
    out: Path,
    voxel_size: tuple[float, float, float] | None,
    squeeze: bool,
) -> str:
    """Instance labels + object table of one predicted stack; returns a note for the log."""
    from mitoseg.inference.objects import instance_labels, measure_objects, write_object_table
    from mitoseg.io import write_stack

    k = plan.foreground_class
    if k is None:
        fail(
            "--instances needs a binary model or a class named 'mitochondria' "
            f"(classes: {', '.join(plan.class_names)})"
        )
    labels, n = instance_labels(mask == k)
    target = out / f"{path.stem}_instances.tif"
    write_stack(target, labels[0] if squeeze else labels, voxel_size)
    table = write_object_table(
        out / f"{path.stem}_objects.csv", measure_objects(labels, stack, voxel_size)
    )
    return f", {n} objects -> {target}, {table}"


@app.command("evaluate")
def evaluate(
    model: str = typer.Option(..., "--model", help=".keras file or models:/, runs:/ URI"),
    images: Path = typer.Option(..., "--images", help="image stack (TIFF) or 2D image"),
    masks: Path = typer.Option(..., "--masks", help="mask stack: 0/255 or 0/1, or label map"),
    as_json: bool = typer.Option(False, "--json", help="print the metrics as JSON"),
    tile_size: int | None = _TILE_OPT,
    halo: int | None = _HALO_OPT,
    batch_size: int | None = _BATCH_OPT,
    tta: bool | None = _TTA_OPT,
    threshold: float | None = _THRESHOLD_OPT,
    engine: str | None = _ENGINE_OPT,
    no_hysteresis: bool = _NO_HYSTERESIS_OPT,
    params: Path | None = typer.Option(
        None, "--params", help="params.yaml whose base.classes maps the mask values"
    ),
) -> None:
    """Score MODEL on a labelled stack with its inference plan (whole-slice inference)."""
    from mitoseg.config import BaseConfig, ConfigError, load_section
    from mitoseg.io import DataError, read_stack
    from mitoseg.planner import evaluate_split

    overrides = _overrides(tile_size, halo, batch_size, tta, threshold, engine, no_hysteresis)
    for path in (images, masks):
        if not path.is_file():
            fail(f"{path}: file not found")
    try:
        base = load_section("base", params) if params else BaseConfig()
        image_stack = read_stack(images)
        mask_stack = read_stack(masks)
        if image_stack.shape != mask_stack.shape:
            raise DataError(
                f"{masks}: mask shape {mask_stack.shape} does not match image shape "
                f"{image_stack.shape} of {images}"
            )
        from mitoseg.evaluate import masks_to_indices

        truth = masks_to_indices(mask_stack, base.value_to_index(), str(masks))
    except (ConfigError, DataError) as exc:
        fail(str(exc))
    net, plan = load_model_and_plan(model, **overrides)
    if plan.n_classes != base.n_classes:
        fail(
            f"the model's plan has {plan.n_classes} classes ({', '.join(plan.class_names)}) "
            f"but the class table has {base.n_classes} ({', '.join(base.class_names)})"
        )
    try:
        result = evaluate_split(net, plan, image_stack, truth, progress=options().progress)
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
