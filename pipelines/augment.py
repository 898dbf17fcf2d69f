"""DVC stage `augment`: resolve the augmentation spec and render a preview.

Writes ``OUT/augment.json`` (``{"seed", "augment": {...}}``, the spec the train stage
applies on the fly) and ``OUT/preview.png`` (training patches before/after augmentation),
and prints the measured cost of one augmentation.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from mitoseg.augment import augment_spec, measure_augment_cost, select_preview, write_preview
from mitoseg.config import ConfigError, load_section
from mitoseg.io import DataError, write_json


def main(argv: list[str] | None = None) -> int:
    """Run the stage; returns the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=Path, required=True, help="patchify stage output")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    try:
        base = load_section("base", args.params)
        cfg = load_section("augment", args.params)
        images_path = args.patches / "train_images.npy"
        masks_path = args.patches / "train_masks.npy"
        for path in (images_path, masks_path):
            if not path.is_file():
                raise DataError(f"{path}: file not found (run the patchify stage first)")
        images = np.load(images_path, mmap_mode="r")
        masks = np.load(masks_path, mmap_mode="r")
        if len(images) == 0 or images.shape != masks.shape:
            raise DataError(
                f"{images_path}: need a non-empty (N, P, P) array matching {masks_path.name}, "
                f"got {images.shape} and {masks.shape}"
            )
        n_classes = None
        meta_path = args.patches / "meta.json"
        if meta_path.is_file():
            n_classes = int(json.loads(meta_path.read_text())["n_classes"])
        idx = select_preview(masks, cfg.preview_samples, base.seed)
        sel_images, sel_masks = np.asarray(images[idx]), np.asarray(masks[idx])
        write_json(args.out / "augment.json", augment_spec(cfg, base.seed))
        write_preview(sel_images, sel_masks, cfg, base.seed, args.out / "preview.png", n_classes)
        ms = measure_augment_cost(sel_images, sel_masks, cfg, base.seed)
    except (ConfigError, DataError) as exc:
        print(f"augment: {exc}", file=sys.stderr)
        return 1
    print(
        f"augment: wrote {args.out / 'augment.json'} and {args.out / 'preview.png'}; "
        f"{ms:.2f} ms per {images.shape[1]}x{images.shape[2]} sample"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
