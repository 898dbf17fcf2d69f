"""``mitoseg pretrain``: self-supervised pre-training on a volume's unlabelled slices.

The model it writes is a start for ``train.init_from`` (:mod:`mitoseg.pretrain`): same
architecture as the ``train`` section of the params file, so the segmentation run
fine-tunes it on the few labelled slices.
"""

from __future__ import annotations

from pathlib import Path

import typer

from mitoseg.cli.app import STATE, app, fail

#: Optimizer steps per logged epoch of pre-training.
STEPS_PER_EPOCH = 50


def read_unlabelled(paths: list[Path]) -> tuple[object, int]:
    """``(N, H, W) uint8`` network intensities of every slice of ``paths``, and ``N``.

    Raises:
        mitoseg.io.DataError: a file that cannot be read, or slices whose size differs
            from the first file's (the file is named).
    """
    import numpy as np

    from mitoseg.data.patches import to_uint8
    from mitoseg.io import DataError, read_stack

    slices: list[np.ndarray] = []
    shape: tuple[int, ...] | None = None
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path}: file not found")
        stack = read_stack(path)
        stack = stack if stack.ndim == 3 else stack[None]
        if shape is None:
            shape = tuple(stack.shape[1:])
        elif tuple(stack.shape[1:]) != shape:
            raise DataError(
                f"{path}: slices are {stack.shape[1]} x {stack.shape[2]}, those of "
                f"{paths[0]} {shape[0]} x {shape[1]}; pre-train on slices of one size"
            )
        slices.extend(to_uint8(s) for s in stack)
    return np.stack(slices), len(slices)


@app.command("pretrain")
def pretrain(
    images: list[Path] = typer.Argument(
        ..., help="TIFF stacks or images of unlabelled slices (e.g. the rest of the volume)"
    ),
    out: Path = typer.Option(..., "--out", help="the pre-trained model (.keras)"),
    steps: int = typer.Option(1500, "--steps", min=1, help="optimizer steps"),
    params: Path = typer.Option(
        Path("params.yaml"),
        "--params",
        help="params file whose train section gives the architecture, batch and crop size "
        "(its defaults when the file does not exist)",
    ),
    square: int = typer.Option(16, "--square", min=1, help="side of the masked squares"),
    mask_ratio: float = typer.Option(0.5, "--mask-ratio", help="share of squares masked"),
    seed: int = typer.Option(42, "--seed", help="seeds the weights and the crops"),
) -> None:
    """Pre-train the segmentation UNet on IMAGES by filling in masked squares.

    Then set ``train.init_from: OUT`` in params.yaml (with the same ``train.model``) and
    train on the labelled slices.
    """
    from mitoseg.config import AugmentConfig, ConfigError, load_section, resolve_train_config
    from mitoseg.io import DataError, atomic_path

    if out.suffix != ".keras":
        fail(f"--out {out}: must end in .keras")
    try:
        cfg = load_section("train", params) if params.exists() else resolve_train_config({})
        augment = load_section("augment", params) if params.exists() else AugmentConfig()
        slices, n = read_unlabelled(images)
    except (ConfigError, DataError) as exc:
        fail(str(exc))
    from mitoseg.pretrain import pretrain_model

    per_epoch = min(STEPS_PER_EPOCH, steps)
    try:
        result = pretrain_model(
            slices, cfg.model, epochs=-(-steps // per_epoch), steps_per_epoch=per_epoch,
            batch_size=cfg.batch_size, crop_size=cfg.crop_size or slices.shape[1],
            square=square, mask_ratio=mask_ratio, augment=augment, seed=seed,
            progress=STATE.progress,
        )  # fmt: skip
    except ValueError as exc:
        fail(str(exc))
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, suffix=".keras") as tmp:
        result.model.save(tmp)
    typer.echo(
        f"{out}: pre-trained {result.steps} steps on {n} slices in {result.seconds:.0f} s "
        f"(masked MSE {result.losses[0]:.4f} -> {result.losses[-1]:.4f}); fine-tune it "
        f"with train.init_from: {out}"
    )
