"""``mitoseg labels init|add|list``: the label store (:mod:`mitoseg.labelstore`).

``init`` reads only the volume's metadata; ``add`` takes a 2D mask TIFF in raw mask
values (class values of the store, ``ignore_value`` where not labelled); ``list`` prints
one row per labelled slice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from mitoseg.cli.app import fail, labels_app

_STORE_OPT = typer.Option(..., "--store", help="label store directory (holds store.json)")
_LOCK_OPT = typer.Option(
    30.0, "--lock-timeout", help="seconds to wait while another writer holds the store's lock"
)


def _base(params: Path | None) -> Any:
    from mitoseg.config import BaseConfig, load_section

    if params is None and not Path("params.yaml").is_file():
        return BaseConfig()
    return load_section("base", params if params is not None else Path("params.yaml"))


@labels_app.command("init")
def init(
    volume: str = typer.Argument(
        ..., help="the volume labelled: OME-Zarr / Zarr store or TIFF stack, local or s3://"
    ),
    store: Path = _STORE_OPT,
    params: Path | None = typer.Option(
        None,
        "--params",
        help="params file whose base.classes is the class table "
        "[default: ./params.yaml if present, else built-in defaults]",
    ),
    ignore_value: int | None = typer.Option(
        None,
        "--ignore-value",
        help="raw mask value of an unlabelled pixel [default: base.ignore_value, else 254]",
    ),
    lock_timeout: float = _LOCK_OPT,
) -> None:
    """Create an empty label store for VOLUME (reads only its metadata; the store never
    holds voxels of the volume)."""
    from mitoseg.config import ConfigError
    from mitoseg.io import DataError
    from mitoseg.labelstore import init_store

    try:
        base = _base(params)
        value = ignore_value if ignore_value is not None else base.ignore_value
        manifest = init_store(
            store, volume, base.classes, 254 if value is None else value,
            lock_timeout_s=lock_timeout,
        )  # fmt: skip
    except (ConfigError, DataError) as exc:
        fail(str(exc))
        return
    z, y, x = manifest.volume.shape
    typer.echo(
        f"label store {store} for {volume} ({z} x {y} x {x}): classes "
        f"{dict(manifest.classes)}, ignore_value {manifest.ignore_value}"
    )


@labels_app.command("add")
def add(
    store: Path = _STORE_OPT,
    z: int = typer.Option(..., "--z", help="slice index in the volume"),
    mask: Path = typer.Option(
        ..., "--mask", help="(Y, X) TIFF in raw mask values, ignore_value where unlabelled"
    ),
    split: str = typer.Option("train", "--split", help="train or test"),
    note: str | None = typer.Option(None, "--note", help="free text, e.g. 'suggest rank 3'"),
    model: str | None = typer.Option(
        None, "--model", help="model URI / version shown while labelling"
    ),
    author: str | None = typer.Option(
        None, "--author", help="who labelled [default: $MITOSEG_AUTHOR, $USER]"
    ),
    replace: bool = typer.Option(
        False, "--replace", help="replace a labelled slice instead of merging into it"
    ),
    allow_test_change: bool = typer.Option(
        False, "--allow-test-change", help="allow changing a test slice or a slice's split"
    ),
    lock_timeout: float = _LOCK_OPT,
) -> None:
    """Add the labels of slice Z (or merge them into its stored labels) with provenance."""
    import numpy as np

    from mitoseg.io import DataError, read_image
    from mitoseg.labelstore import add_slice, make_provenance

    if split not in ("train", "test"):
        fail(f"--split must be train or test, got {split!r}")
    try:
        arr = np.asarray(read_image(mask))
        prov = make_provenance("cli", model=model, note=note, author=author)
        entry = add_slice(
            store, z, arr, prov, split=split, mode="replace" if replace else "merge",  # type: ignore[arg-type]
            allow_test_change=allow_test_change, lock_timeout_s=lock_timeout,
        )  # fmt: skip
    except DataError as exc:
        fail(str(exc))
        return
    typer.echo(
        f"slice {entry.z} ({entry.split}, {entry.provenance.mode}): "
        f"{entry.labelled_pixels} labelled pixels -> {store / entry.file}"
    )


@labels_app.command("list")
def list_command(store: Path = _STORE_OPT) -> None:
    """One row per labelled slice: z, split, labelled pixels, author, time (UTC), model."""
    from mitoseg.io import DataError
    from mitoseg.labelstore import read_manifest, resolve_volume_uri

    try:
        manifest = read_manifest(store)
    except DataError as exc:
        fail(str(exc))
        return
    rows = [("z", "split", "labelled", "author", "time (UTC)", "model")]
    for e in manifest.entries:
        p = e.provenance
        when = p.time.strftime("%Y-%m-%d %H:%M:%S")
        rows.append((str(e.z), e.split, str(e.labelled_pixels), p.author, when, p.model or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    n, uri = sum(e.labelled_pixels for e in manifest.entries), resolve_volume_uri(store, manifest)
    typer.echo(f"{len(manifest.entries)} labelled slices, {n} labelled pixels ({uri})")
