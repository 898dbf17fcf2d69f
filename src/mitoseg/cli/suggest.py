"""``mitoseg suggest``: rank the slices and tiles of a stack or volume for labelling.

See :mod:`mitoseg.suggest` for the score. The model runs with its inference plan (tiling,
normalisation, engine), as ``mitoseg predict`` runs it, without the plan's TTA and
z-averaging.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from mitoseg.cli.app import app, fail, options


def _parse_flips(text: str) -> list[str]:
    from mitoseg.suggest import FLIPS

    if text.strip().lower() == "none":
        return []
    flips = [f.strip() for f in text.split(",") if f.strip()]
    bad = [f for f in flips if f not in FLIPS]
    if bad or not flips or len(set(flips)) != len(flips):
        fail(f"--flips must be 'none' or distinct values of {', '.join(FLIPS)}; got {text!r}")
    return flips


def _parse_z_range(text: str | None, depth: int, source: str) -> tuple[int, int]:
    if text is None:
        return 0, depth
    start_s, sep, stop_s = text.partition(":")
    try:
        start = int(start_s) if start_s else 0
        stop = int(stop_s) if stop_s else depth
    except ValueError:
        start = stop = -1
    if not sep or not 0 <= start < stop <= depth:
        fail(f"--z-range must be START:STOP with 0 <= START < STOP <= {depth} ({source}); "
             f"got {text!r}")  # fmt: skip
    return start, stop


def _read_input(source: str, z_range: str | None) -> tuple[Any, int, Any]:
    """``((Z, H, W) stack, first slice index, voxel size nm or None)`` of a TIFF stack /
    image or a volume."""
    from mitoseg.io import DataError, read_stack, read_voxel_size
    from mitoseg.volume.store import is_volume_uri

    try:
        if is_volume_uri(source):
            from mitoseg.volume.store import open_volume

            volume = open_volume(source)
            try:
                start, stop = _parse_z_range(z_range, volume.shape[0], source)
                return volume.read(start, stop), start, volume.voxel_size_nm
            finally:
                volume.close()
        if not Path(source).is_file():
            fail(f"input not found: {source}")
        stack = read_stack(source)
        voxel_size = read_voxel_size(source)
    except (DataError, ValueError) as exc:
        fail(str(exc))
    stack = stack[None] if stack.ndim == 2 else stack
    start, stop = _parse_z_range(z_range, stack.shape[0], source)
    return stack[start:stop], start, voxel_size


@app.command("suggest")
def suggest(
    image: str = typer.Argument(
        ..., help="TIFF stack (or 2D image), or a Zarr / OME-Zarr volume (local or s3://)"
    ),
    model: str = typer.Option(..., "--model", help=".keras file or models:/, runs:/ URI"),
    out: Path = typer.Option(..., "--out", help="output directory for the ranking files"),
    tile: int = typer.Option(256, "--tile", min=1, help="side of the ranked tiles, pixels"),
    flips: str = typer.Option(
        "h,v", "--flips", help="test-time flips besides the plain pass: h, v, hv or none"
    ),
    top: int = typer.Option(
        20, "--top", min=1, help="tiles in suggestions.json and the napari layer"
    ),
    z_range: str | None = typer.Option(
        None, "--z-range", help="START:STOP slices to rank (default: all)"
    ),
    w_entropy: float = typer.Option(1.0, "--w-entropy", min=0.0, help="weight of the entropy"),
    w_flip: float = typer.Option(1.0, "--w-flip", min=0.0, help="weight of flip disagreement"),
    w_neighbour: float = typer.Option(
        1.0, "--w-neighbour", min=0.0, help="weight of disagreement with neighbouring slices"
    ),
    batch_size: int | None = typer.Option(
        None, "--batch-size", help="tiles per model call (default: plan's)"
    ),
    engine: str | None = typer.Option(
        None, "--engine", help="inference engine RUNTIME/PRECISION (default: the plan's)"
    ),
) -> None:
    """Rank slices and tiles by how unsure the model is; write OUT/suggestions.json,
    slices.csv, tiles.csv and tiles_napari.csv (a napari Shapes layer of the top tiles,
    in pixels; napari with the mitoseg plugin opens suggestions.json on the input's voxel
    size).

    Score per pixel: the weighted mean of the entropy of the probabilities, the
    disagreement between test-time flips and the disagreement with the neighbouring
    slices (each in [0, 1]); slices and tiles are ranked by their mean (docs/LAB_LOOP.md).
    Slice numbers count from the start of the input, also with --z-range.
    """
    from mitoseg.cli.model import _overrides, load_model_and_plan
    from mitoseg.inference.runtime import predictor_for_plan
    from mitoseg.io import DataError
    from mitoseg.suggest import SuggestWeights, suggest_stack, write_suggestions

    flip_list = _parse_flips(flips)
    weights = SuggestWeights(entropy=w_entropy, flip=w_flip, neighbour=w_neighbour)
    stack, first, voxel_size = _read_input(image, z_range)
    overrides = _overrides(None, None, batch_size, False, None, engine)
    net, plan = load_model_and_plan(model, **overrides, z_average=0)
    try:
        predict_batch = predictor_for_plan(net, plan)
        slices, tiles, used = suggest_stack(
            predict_batch, stack, plan, flips=flip_list, tile_size=tile, weights=weights,
            first_slice=first, progress=options().progress,
        )  # fmt: skip
    except (DataError, ValueError) as exc:
        fail(str(exc))
    paths = write_suggestions(
        out, slices, tiles, source=image, model=model,
        shape=(stack.shape[0], *stack.shape[1:]), tile_size=tile, flips=flip_list,
        weights=used, top=top, voxel_size_nm=voxel_size,
    )  # fmt: skip
    best = ", ".join(f"{s.slice} ({s.score:.3f})" for s in slices[:3])
    typer.echo(f"{image} {tuple(stack.shape)}: most unsure slices {best} -> {paths['json']}")
