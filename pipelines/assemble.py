"""DVC stage ``assemble``: the training data in the canonical layout, from its source.

``source.volume: null`` (the default): ``--raw`` (``data/raw``, tracked by ``data.dvc``)
is copied to ``--out`` as it is. A volume location (OME-Zarr / Zarr / TIFF, local or
``s3://``), or ``store`` for the volume the label store names: ``--out`` is assembled from
that volume and the label store ``--labels``
(:func:`mitoseg.data.assemble.assemble_dataset`), reading only the labelled slices and
their neighbours (``source.context``). Either way ``--out`` is replaced atomically and the
same inputs give the same bytes, so this stage may rerun on every ``dvc repro``
(``always_changed``) without rerunning the stages after it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mitoseg.config import ConfigError, load_section
from mitoseg.data.assemble import assemble_dataset, copy_canonical
from mitoseg.io import DataError


def main(argv: list[str] | None = None) -> int:
    """Run the stage; returns the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", type=Path, required=True, help="canonical raw data directory")
    parser.add_argument("--labels", type=Path, required=True, help="the label store directory")
    parser.add_argument("--out", type=Path, required=True, help="canonical directory to write")
    parser.add_argument("--params", default="params.yaml", help="params file")
    args = parser.parse_args(argv)
    try:
        source = load_section("source", args.params)
        if source.volume is None:
            copy_canonical(args.raw, args.out)
            print(f"source: canonical {args.raw} -> {args.out}")
            return 0
        base = load_section("base", args.params)
        context = source.resolve_context(
            load_section("patchify", args.params).z_context,
            load_section("evaluate", args.params).z_average,
        )
        info = assemble_dataset(
            None if source.volume == "store" else source.volume,
            args.labels,
            args.out,
            base,
            context,
            voxel_size_nm=source.voxel_size_nm,
        )
    except (ConfigError, DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    counts = ", ".join(
        f"{split}: {len(s['labelled_slices'])} labelled of {s['n_slices']} slices"
        for split, s in info["splits"].items()
    )
    print(f"source: {info['source']} + {args.labels} ({counts}, context {context}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
