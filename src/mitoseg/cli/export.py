"""``mitoseg export bioimageio``: a BioImage Model Zoo package of a trained model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from mitoseg.cli.app import export_app, fail

WEIGHTS_HELP = "comma-separated weight formats (keras_v3 required)"


def parse_voxel_size(text: str | None) -> list[float] | None:
    """``"4.6"`` or ``"4.6,4.6"`` (y, x in nm) -> floats; None stays None.

    Raises:
        ValueError: not one or two comma-separated numbers.
    """
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"--voxel-size must be Y,X or one number in nm, got {text!r}") from None
    if len(values) not in (1, 2):
        raise ValueError(f"--voxel-size must be Y,X or one number in nm, got {text!r}")
    return values


def load_metadata(path: Path | None, overrides: dict[str, Any]) -> Any:
    """Package metadata from a YAML/JSON file (fields of ``ExportMetadata``), with the
    command-line values in ``overrides`` (None values ignored) replacing its fields.

    Raises:
        mitoseg.io.DataError: unreadable file or invalid fields (the file is named).
    """
    import yaml
    from pydantic import ValidationError

    from mitoseg.export.metadata import ExportMetadata
    from mitoseg.io import DataError

    data: dict[str, Any] = {}
    where = "command line"
    if path is not None:
        where = str(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise DataError(f"{path}: cannot read the package metadata ({exc})") from None
        if not isinstance(loaded, dict):
            raise DataError(f"{path}: package metadata must be a mapping of fields")
        data.update(loaded)
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return ExportMetadata.model_validate(data)
    except ValidationError as exc:
        fields = "; ".join(
            f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise DataError(f"{where}: invalid package metadata: {fields}") from None


def _default_sample() -> Path:
    from importlib import resources

    return Path(str(resources.files("mitoseg") / "sample_data" / "vnc" / "test" / "images.tif"))


def _read_inputs(
    sample: Path | None,
    voxel_size: str | None,
    metadata: Path | None,
    overrides: dict[str, Any],
) -> tuple[Path, list[float] | None, Any, Any]:
    """The sample's path and stack, the voxel size and the package metadata; a bad one
    ends the command with its message."""
    from mitoseg.io import DataError, read_stack

    sample = sample or _default_sample()
    if not sample.is_file():
        fail(f"--sample {sample}: file not found")
    try:
        voxel = parse_voxel_size(voxel_size)
        meta = load_metadata(metadata, overrides)
        stack = read_stack(sample)
    except (DataError, ValueError) as exc:
        fail(str(exc))
    return sample, voxel, meta, stack


def _summary(report: Any, sample: Path) -> str:
    """One line on the written package: weights, test tile, pixel size, output."""
    return (
        f"{report.path}: bioimage.io package, weights {', '.join(report.weight_formats)}; "
        f"test input {tuple(report.test_input_shape)} from {sample} slice {report.source_slice}; "
        f"pixel {report.voxel_size_nm[0]:g} x {report.voxel_size_nm[1]:g} nm; output: "
        + (
            f"probabilities (threshold {report.threshold:g} not applied)"
            if report.threshold is not None
            else "softmax probabilities (argmax not applied)"
        )
    )


def _test_package(out: Path) -> None:
    """Run bioimageio.core's model test on each weight format; fail when one fails."""
    import keras

    from mitoseg.export.check import check_package

    keras.config.disable_interactive_logging()  # no progress bar per test prediction
    checks = check_package(out)
    failed = False
    for check in checks:
        typer.echo(f"bioimageio.core test {check.weight_format}: {check.status}")
        for err in check.errors:
            typer.echo(f"  {err}", err=True)
        failed = failed or check.status != "passed"
    if failed:
        fail(f"{out}: bioimageio.core's model test failed")


@export_app.command("bioimageio")
def export_bioimageio_cmd(
    model: str = typer.Option(..., "--model", help=".keras file or models:/, runs:/ URI"),
    out: Path = typer.Option(..., "--out", help="package folder, or a path ending in .zip"),
    sample: Path | None = typer.Option(
        None,
        "--sample",
        help="EM stack or image the test tensors are made from (default: the bundled "
        "VNC sample's test stack)",
    ),
    slice_index: int | None = typer.Option(
        None, "--slice", help="slice of --sample (default: the middle non-blank one)"
    ),
    voxel_size: str | None = typer.Option(
        None, "--voxel-size", help="pixel size Y,X (or one value) in nm (default: the plan's)"
    ),
    max_side: int = typer.Option(512, "--max-side", help="largest side of the test tile"),
    weights: str = typer.Option(
        "keras_v3,onnx,tensorflow_saved_model_bundle", "--weights", help=WEIGHTS_HELP
    ),
    metadata: Path | None = typer.Option(
        None, "--metadata", help="YAML/JSON with name, description, authors, cite, license, ..."
    ),
    author: list[str] | None = typer.Option(
        None, "--author", help="author name (repeat for several; replaces the metadata's)"
    ),
    licence: str | None = typer.Option(None, "--licence", help="SPDX licence of the weights"),
    name: str | None = typer.Option(None, "--name", help="model name in the package"),
    test: bool = typer.Option(
        True, "--test/--no-test", help="run bioimageio.core's model test on the package"
    ),
) -> None:
    """Write a BioImage Model Zoo (bioimage.io spec 0.5) package of MODEL.

    The package's output is the foreground probability; the plan's threshold is written
    in its README and config, and applied by the user afterwards.
    """
    from mitoseg.cli.model import load_model_and_plan
    from mitoseg.export.bioimageio import export_bioimageio

    try:
        import bioimageio.core  # noqa: F401
    except ImportError:
        fail("mitoseg export bioimageio needs bioimageio.core: pip install 'mitoseg[export]'")
    authors = [{"name": a} for a in author] if author else None
    overrides = {"name": name, "license": licence, "authors": authors}
    sample, voxel, meta, stack = _read_inputs(sample, voxel_size, metadata, overrides)
    formats = [f.strip() for f in weights.split(",") if f.strip()]
    net, plan = load_model_and_plan(model)
    try:
        report = export_bioimageio(
            net,
            plan,
            stack,
            out,
            metadata=meta,
            voxel_size_nm=voxel,
            slice_index=slice_index,
            max_side=max_side,
            weight_formats=formats,
            source_uri=model,
        )
    except ValueError as exc:
        fail(str(exc))
    typer.echo(_summary(report, sample))
    if test:
        _test_package(out)
