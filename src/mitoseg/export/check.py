"""Check a written BioImage Model Zoo package with bioimage.io's own model test.

``bioimageio.core`` is imported inside :func:`check_package` only.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["PackageCheck", "check_package"]


class PackageCheck(BaseModel):
    """Outcome of ``bioimageio.core``'s model test for one weight format.

    Attributes:
        weight_format: the weights tested.
        status: ``passed``, ``valid-format`` (format valid, inference failed) or
            ``failed``.
        errors: ``"<test name>: <message>"`` for each failed sub-test.
    """

    model_config = ConfigDict(extra="forbid")

    weight_format: str
    status: str
    errors: list[str] = Field(default_factory=list)


def check_package(
    package: str | Path, weight_formats: Sequence[str] | None = None
) -> list[PackageCheck]:
    """Run ``bioimageio.core.test_model`` on a package, once per weight format.

    The test validates ``rdf.yaml``, runs each weight format on the test input through
    the package's own pre-processing and compares with the test output (the spec's
    default tolerance, 1e-3 absolute and relative), and tries further input sizes. It
    runs in a temporary working directory (the TensorFlow backend unzips weights into
    the current directory).

    Args:
        package: ``rdf.yaml``, its folder, or the ``.zip``.
        weight_formats: formats to test (default: every format in the package).

    Returns:
        One :class:`PackageCheck` per format.

    Raises:
        ValueError: the package does not load as a bioimage.io model description.
    """
    import os

    # bioimageio.core's Keras backend defaults to torch and writes KERAS_BACKEND into the
    # environment at import; mitoseg's Keras runs on TensorFlow.
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    from bioimageio.core import test_model
    from bioimageio.spec import load_description
    from bioimageio.spec.model import v0_5

    package = Path(package)
    source = package / "rdf.yaml" if package.is_dir() else package
    descr = load_description(source)
    if not isinstance(descr, v0_5.ModelDescr):
        raise ValueError(f"{source}: not a valid bioimage.io model 0.5 description")
    if weight_formats is None:
        weight_formats = [f for f, entry in descr.weights if entry is not None]
    results = []
    cwd = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="mitoseg-bioimageio-test-") as work:
        os.chdir(work)
        try:
            for fmt in weight_formats:
                summary = test_model(str(source.resolve()), weight_format=fmt)
                errors = [
                    f"{d.name}: " + "; ".join(e.msg or e.type for e in d.errors)
                    for d in summary.details
                    if d.status == "failed"
                ]
                results.append(
                    PackageCheck(weight_format=fmt, status=str(summary.status), errors=errors)
                )
        finally:
            os.chdir(cwd)
    return results
