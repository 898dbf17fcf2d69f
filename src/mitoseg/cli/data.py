"""``mitoseg data ...`` commands: fetch raw data into the canonical layout."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from mitoseg.cli.app import data_app, fail, options


class MaskKind(str, Enum):
    """Mask kinds accepted by ``--mask-kind``."""

    binary = "binary"
    labels = "labels"


def _parse_checksums(values: list[str]) -> dict[str, str]:
    """Parse repeated ``NAME=HEX`` options into ``{NAME: hex}``.

    Raises:
        ValueError: an entry without ``=`` or with a value that is not 64 hex digits.
    """
    sums: dict[str, str] = {}
    for item in values:
        name, sep, digest = item.partition("=")
        digest = digest.strip().lower()
        if not sep or not name.strip():
            raise ValueError(f"--sha256 {item!r}: expected NAME=HEX, e.g. training.tif=<64 hex>")
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"--sha256 {item!r}: the checksum must be 64 hex digits")
        sums[name.strip()] = digest
    return sums


@data_app.command("fetch")
def fetch_command(
    source: str = typer.Option(
        ...,
        "--source",
        help="sample | epfl | manifest:NAME | s3://bucket/prefix | manifest .yaml | folder "
        "(EPFL files, train/images.tif, or train/images/ slice folders).",
    ),
    out: Path = typer.Option(..., "--out", help="Output folder, e.g. data/raw."),
    mask_kind: MaskKind = typer.Option(
        MaskKind.binary,
        "--mask-kind",
        help="binary: masks 0/1 or 0/255 stored as 0/255; labels: label maps kept as-is.",
    ),
    force: bool = typer.Option(
        False, "--force", help="Replace OUT when it exists with different data."
    ),
    base_url: str | None = typer.Option(
        None,
        "--base-url",
        envvar="MITOSEG_EPFL_BASE_URL",
        help="Base URL of the EPFL files (for --source epfl).",
    ),
    sha256: list[str] = typer.Option(
        [],
        "--sha256",
        help="Expected checksum NAME=HEX of an input file (repeatable), "
        "e.g. training.tif=<64 hex>.",
    ),
    cache_dir: Path | None = typer.Option(
        None,
        "--cache-dir",
        envvar="MITOSEG_CACHE_DIR",
        help="Download cache (partial downloads resume from here).",
    ),
) -> None:
    """Fetch raw EM data into OUT/{train,test}/{images,masks}.tif + OUT/dataset.json."""
    from mitoseg.data.fetch import fetch
    from mitoseg.io import DataError

    try:
        checksums = _parse_checksums(sha256)
        summary = fetch(
            source,
            out,
            mask_kind=mask_kind.value,
            progress=options().progress,
            force=force,
            base_url=base_url,
            checksums=checksums,
            cache_dir=cache_dir,
        )
    except (DataError, ValueError) as exc:
        fail(str(exc))
        return
    verb = (
        "unchanged (identical data already there)"
        if summary["status"] == "unchanged"
        else ("written")
    )
    typer.echo(f"{summary['out']}: {verb}; source {summary['source']} ({summary['kind']})")
    for split, meta in summary["splits"].items():
        masks = meta["mask_dtype"] or "no masks"
        typer.echo(
            f"  {split}: {meta['n_slices']} slices {meta['height']}x{meta['width']} "
            f"{meta['dtype']}, masks {masks} ({summary['mask_kind']})"
        )
