"""DVC stage ``patchify``: cut the validated TRAIN split into train/val patches.

Refuses to run unless ``--report`` (the validate stage's ``report.json``) records a
successful validation made with the current ``base.classes``.
"""

from __future__ import annotations

import argparse
import sys

from mitoseg.config import ConfigError, load_section
from mitoseg.data.patches import make_patch_dataset
from mitoseg.data.validate_report import require_valid_report
from mitoseg.io import DataError


def main(argv: list[str] | None = None) -> int:
    """Run the stage; returns the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", required=True, help="canonical raw data directory")
    parser.add_argument("--report", required=True, help="validate stage report.json")
    parser.add_argument("--out", required=True, help="output directory (artifacts/patches)")
    parser.add_argument("--params", default="params.yaml", help="params file")
    args = parser.parse_args(argv)
    try:
        base = load_section("base", args.params)
        cfg = load_section("patchify", args.params)
        require_valid_report(args.report, base)
        meta = make_patch_dataset(args.raw, args.out, base, cfg, base.seed)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"patches written to {args.out}: {meta['n_train_patches']} train "
        f"({len(meta['train_slices'])} slices), {meta['n_val_patches']} val "
        f"({len(meta['val_slices'])} slices), {meta['patch_size']}px step {meta['step']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
