"""Reference profile of the training slices, for drift monitoring of the served model.

The validate stage writes one row of statistics per slice (``slices.csv``,
:func:`mitoseg.data.validate.slice_table`). :func:`build_profile` keeps the rows of the
training split and turns them into a :class:`ReferenceProfile`: the per-slice values of
each drift feature, scaled so that they do not depend on the image dtype. The evaluate
stage writes it as ``reference_profile.json`` beside ``model.keras`` and the inference
plan, logs it with the MLflow model, and ``mitoseg serve`` / ``mitoseg bento build``
copy it into the BentoML model (:mod:`mitoseg.serving.monitoring` compares the requests
with it).

Features (one value per slice):

* ``intensity_mean``: mean raw intensity / the dtype's range (255 for uint8, 65535 for
  uint16, 1 for float images, :func:`mitoseg.inference.normalize.dtype_range`);
* ``intensity_std``: standard deviation of the raw intensities / the dtype's range;
* ``foreground_fraction``: fraction of pixels in a non-background class (the ground
  truth here; the model's prediction at serving time).

Pure pandas + numpy + pydantic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mitoseg.inference.normalize import dtype_range
from mitoseg.io import DataError, read_json_object, write_json

__all__ = ["FEATURES", "PROFILE_FILE", "PROFILE_VERSION", "ReferenceProfile", "build_profile"]

#: File name of the profile beside ``model.keras``, in MLflow model artifacts and in the
#: BentoML model directory.
PROFILE_FILE = "reference_profile.json"
#: Schema version written into every profile.
PROFILE_VERSION = 1
#: Drift features, in the order they are reported.
FEATURES: tuple[str, ...] = ("intensity_mean", "intensity_std", "foreground_fraction")
Feature = Literal["intensity_mean", "intensity_std", "foreground_fraction"]

_COLUMNS = ("split", "dtype", "finite", "mean", "std", "foreground_fraction")


class ReferenceProfile(BaseModel):
    """Per-slice feature values of the training data.

    Attributes:
        version: schema version (:data:`PROFILE_VERSION`).
        source: where the statistics came from (the ``slices.csv`` path).
        split: the split the rows were taken from.
        n_slices: slices in the profile.
        dtypes: image dtypes of those slices.
        features: feature name -> per-slice values, ascending (NaN-free; a feature with
            no values, e.g. ``foreground_fraction`` without masks, is left out).
        foreground_range: ``[min, max]`` of the per-slice foreground fraction, or None.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = PROFILE_VERSION
    source: str
    split: str
    n_slices: int = Field(ge=1)
    dtypes: list[str]
    features: dict[Feature, list[float]]
    foreground_range: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _check(self) -> ReferenceProfile:
        if not self.features:
            raise ValueError("features: at least one feature with values is needed")
        for name, values in self.features.items():
            if not values or not all(np.isfinite(values)):
                raise ValueError(f"features.{name}: needs finite values")
        lo_hi = self.foreground_range
        if lo_hi is not None and not 0 <= lo_hi[0] <= lo_hi[1] <= 1:
            raise ValueError(f"foreground_range: expected 0 <= low <= high <= 1, got {lo_hi}")
        return self

    def values(self, feature: str) -> np.ndarray:
        """``(N,)`` float64 reference values of ``feature`` (empty when absent)."""
        return np.asarray(self.features.get(feature, []), dtype=np.float64)  # type: ignore[call-overload]

    def write(self, path: str | Path) -> Path:
        """Write the profile as JSON, atomically; returns ``path``."""
        write_json(path, self.model_dump(mode="json"))
        return Path(path)

    @classmethod
    def read(cls, path: str | Path) -> ReferenceProfile:
        """Read and validate a profile file.

        Raises:
            DataError: missing, unreadable or invalid file (the message names it).
        """
        path = Path(path)
        data = read_json_object(path, "reference profile")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            msg = str(err["msg"]).removeprefix("Value error, ")
            where = f"{where}: " if where else ""
            raise DataError(f"{path}: reference profile {where}{msg}") from None


def _range_of(name: str, where: str) -> float:
    try:
        return dtype_range(np.dtype(name))
    except TypeError:
        raise DataError(f"{where}: unknown image dtype {name!r}") from None


def build_profile(slices_csv: str | Path, split: str = "train") -> ReferenceProfile:
    """The reference profile of one split of a validate-stage ``slices.csv``.

    Args:
        slices_csv: the validate stage's per-slice table (columns ``split, dtype, finite,
            mean, std, foreground_fraction``, one row per slice).
        split: which rows to keep.

    Returns:
        The profile; slices with non-finite pixels are left out.

    Raises:
        DataError: missing or unreadable file, missing columns, or no finite slice of
            ``split`` (the message names the file).
    """
    import pandas as pd

    path = Path(slices_csv)
    try:
        table = pd.read_csv(path)
    except FileNotFoundError:
        raise DataError(f"{path}: slice statistics not found (run the validate stage)") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the slice statistics ({exc})") from None
    missing = [c for c in _COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"{path}: missing columns {missing}")
    rows = table[(table["split"] == split) & table["finite"].astype(bool)]
    if rows.empty:
        raise DataError(f"{path}: no slice of split {split!r} with finite values")
    scale = np.array([_range_of(str(d), str(path)) for d in rows["dtype"]])
    fg = rows["foreground_fraction"].to_numpy(dtype=np.float64)
    fg = fg[np.isfinite(fg)]
    features: dict[str, list[float]] = {
        "intensity_mean": sorted((rows["mean"].to_numpy(np.float64) / scale).tolist()),
        "intensity_std": sorted((rows["std"].to_numpy(np.float64) / scale).tolist()),
    }
    if fg.size:
        features["foreground_fraction"] = sorted(fg.tolist())
    return ReferenceProfile(
        source=str(path),
        split=split,
        n_slices=len(rows),
        dtypes=sorted({str(d) for d in rows["dtype"]}),
        features=features,  # type: ignore[arg-type]
        foreground_range=(float(fg.min()), float(fg.max())) if fg.size else None,
    )
