"""OME-Zarr (NGFF 0.4 / 0.5) metadata: the one reader and writer, through ome-zarr-py.

Every place that reads or writes NGFF metadata goes through here: the volume jobs' input
(:func:`mitoseg.volume.store.open_volume`), their output (:mod:`mitoseg.volume.ngff`)
and the napari reader (:mod:`mitoseg.napari._reader`).

Library: ``ome-zarr`` (ome-zarr-py 0.17.0, pinned for the volume extra). Its format
classes check a store's version, axes and ``coordinateTransformations`` as the spec
says (:class:`ome_zarr.axes.Axes`,
:meth:`ome_zarr.format.FormatV04.validate_coordinate_transformations`), and its writer
(:func:`ome_zarr.writer.write_multiscales_metadata`,
:func:`ome_zarr.writer.write_label_metadata`) puts the attributes where each version
wants them (``multiscales[].version`` on Zarr v2, ``attributes.ome`` on Zarr v3). It
works with the pinned zarr 3.0.x and numpy 1.26. ``ome-zarr-models`` (pydantic models of
the spec) was the other candidate but has no release for these pins: 0.1.x needs
zarr < 3, 1.x needs zarr >= 3.1.1 (numpy 2; patchify pins numpy < 2), 1.7 also
pydantic < 2.13. ome-zarr-py's high-level reader (``Reader`` / ``Multiscales``) is not
used: it opens every level as a Dask array and reopens ``s3://`` stores without our
endpoint options; we read the group with zarr and validate its metadata with ome-zarr.

What ome-zarr does not do, the physical size, is decided here once:

* the scale of level 0 is the first dataset's ``scale`` times the multiscale's own;
* an axis unit is converted to nm with :data:`mitoseg.io._UNIT_NM` (the one unit table);
  a unit it does not hold is an error naming the axis (no size in nm can be derived);
* an axis with a scale but no unit (allowed by NGFF) keeps its scale unchanged
  (:class:`PhysicalScale`, carried to the outputs as it is) and is reported by a
  warning on the ``mitoseg.volume`` logger naming the axes; the voxel size in nm is then
  unknown (None).

This module imports zarr and ome-zarr only inside functions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from mitoseg.io import _UNIT_NM, DataError, check_voxel_size

__all__ = [
    "SPATIAL",
    "Multiscale",
    "PhysicalScale",
    "ome_attrs",
    "read_multiscale",
    "unit_nm",
    "write_image_metadata",
    "write_labels_metadata",
]

log = logging.getLogger("mitoseg.volume")

#: The spatial axes of a volume, in order.
SPATIAL = ("z", "y", "x")
#: The NGFF unit written for sizes in nm.
NANOMETER = "nanometer"


def unit_nm(unit: str) -> float | None:
    """Nanometres per ``unit`` (NGFF / UDUNITS-2 name or a TIFF alias), None if unknown."""
    return _UNIT_NM.get(str(unit).strip().lower())


class PhysicalScale(BaseModel):
    """The ``z, y, x`` size of level 0: nm (unit ``nanometer``) for an axis with a unit,
    the scale as the input gave it for an axis without one (unit None)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scale: tuple[float, float, float] = Field(description="z, y, x scale of level 0")
    units: tuple[str | None, str | None, str | None] = Field(
        description="z, y, x NGFF unit names; None for an axis without a unit"
    )

    @classmethod
    def from_voxel_size_nm(cls, voxel_size_nm: Any) -> PhysicalScale:
        """A ``(z, y, x)`` voxel size in nm (checked) as a scale in nanometres."""
        vs = check_voxel_size(voxel_size_nm)
        return cls(scale=vs, units=(NANOMETER,) * 3)

    @property
    def unitless(self) -> list[str]:
        """Names of the axes without a unit."""
        return [a for a, u in zip(SPATIAL, self.units, strict=True) if u is None]

    @property
    def voxel_size_nm(self) -> tuple[float, float, float] | None:
        """``(z, y, x)`` nm, or None when an axis has no unit."""
        if self.unitless:
            return None
        return self.scale


@dataclass(frozen=True)
class Multiscale:
    """The first multiscale of an NGFF image group, validated by ome-zarr.

    Attributes:
        where: the group's location and role, for messages (``OUT.zarr: labels/mask``).
        version: NGFF version (``0.4``, ``0.5``; older ones as they declare).
        axes: the axes as dicts (``name``, ``type``, optional ``unit``).
        paths: the datasets' paths, level 0 first.
        scale: level 0 scale per axis (dataset scale x the multiscale's own); None
            without ``scale`` transformations (NGFF < 0.4).
        group: the open zarr group.
    """

    where: str
    version: str
    axes: tuple[dict[str, Any], ...]
    paths: tuple[str, ...]
    scale: tuple[float, ...] | None
    group: Any

    @property
    def names(self) -> list[str]:
        """The axis names."""
        return [str(a.get("name", "")) for a in self.axes]

    def sizes(self, spatial: list[int]) -> tuple[list[float], list[str | None]] | None:
        """Level 0 size of the axes ``spatial`` (indexes): nm where the axis has a unit,
        the scale as it is where it has none; with the units (``nanometer`` / None).
        None for a store without ``scale`` transformations. Axes without a unit are
        reported on the ``mitoseg.volume`` logger.

        Raises:
            DataError: an axis with a unit not in :data:`mitoseg.io._UNIT_NM`, or a
                scale that is not positive.
        """
        if self.scale is None:
            return None
        names = self.names
        sizes: list[float] = []
        units: list[str | None] = []
        for i in spatial:
            unit = self.axes[i].get("unit")
            factor = 1.0 if unit is None else unit_nm(unit)
            if factor is None:
                raise DataError(
                    f"{self.where} axis {names[i]!r} has unknown unit {unit!r} "
                    f"(known: {', '.join(sorted(_UNIT_NM))})"
                )
            size = float(self.scale[i]) * factor
            if not (np.isfinite(size) and size > 0):
                raise DataError(f"{self.where} axis {names[i]!r}: scale {size} is not positive")
            sizes.append(size)
            units.append(None if unit is None else NANOMETER)
        missing = [names[i] for i, u in zip(spatial, units, strict=True) if u is None]
        if missing:
            log.warning(
                "%s: axes %s have a scale but no unit; the scale is kept as it is and the "
                "voxel size in nm is unknown", self.where, ", ".join(missing),
            )  # fmt: skip
        return sizes, units

    def physical(self) -> PhysicalScale | None:
        """The physical scale of the ``z, y, x`` axes (by name; see :meth:`sizes`)."""
        found = self.sizes([self.names.index(a) for a in SPATIAL])
        if found is None:
            return None
        return PhysicalScale(scale=tuple(found[0]), units=tuple(found[1]))  # type: ignore[arg-type]


def ome_attrs(group: Any) -> dict[str, Any]:
    """The OME attributes of a zarr group: ``attributes.ome`` (Zarr v3) or all of them
    (v2); with ``version`` (0.5) kept at the top as in the file."""
    attrs = dict(group.attrs)
    ome = attrs.get("ome")
    return dict(ome) if isinstance(ome, dict) else attrs


def _level0_scale(ms: dict[str, Any], n: int) -> tuple[float, ...] | None:
    """Scale of level 0: the first dataset's ``scale`` times the multiscale-wide one."""
    scale, found = np.ones(n), False
    for transforms in (ms["datasets"][0].get("coordinateTransformations"),
                       ms.get("coordinateTransformations")):  # fmt: skip
        for t in transforms or []:
            if t.get("type") == "scale" and "scale" in t:
                scale, found = scale * np.asarray(t["scale"], dtype=np.float64), True
    return tuple(float(s) for s in scale) if found else None


def read_multiscale(group: Any, where: str) -> Multiscale | None:
    """The first multiscale of a zarr group, checked with ome-zarr's format rules.

    Args:
        group: an open zarr group.
        where: the location named in messages (e.g. ``vol.zarr: labels/mask``).

    Returns:
        :class:`Multiscale`, or None when the group has no ``multiscales`` metadata.

    Raises:
        DataError: an unknown version, invalid axes or ``coordinateTransformations``,
            or no datasets (the message names ``where``).
    """
    from ome_zarr.axes import Axes
    from ome_zarr.format import format_from_version

    attrs = ome_attrs(group)
    multiscales = attrs.get("multiscales")
    if not multiscales:
        return None
    ms = multiscales[0]
    datasets = ms.get("datasets") or []
    if not datasets or not all(isinstance(d, dict) and d.get("path") for d in datasets):
        raise DataError(f"{where}: OME-Zarr multiscales has no datasets")
    version = str(attrs.get("version") or ms.get("version") or "0.4")
    try:
        fmt = format_from_version(version)
        axes = ms.get("axes")
        ndim = len(axes) if axes else group[str(datasets[0]["path"])].ndim
        if axes is None:  # NGFF < 0.3: always t, c, z, y, x
            axes = ["t", "c", "z", "y", "x"][-ndim:]
        checked = Axes(axes, fmt=fmt).to_list()  # names and types as the spec allows
        if version not in ("0.1", "0.2", "0.3"):
            transforms = [d.get("coordinateTransformations") for d in datasets]
            fmt.validate_coordinate_transformations(
                ndim, len(datasets), [t for t in transforms if t is not None]
            )
    except (ValueError, KeyError, TypeError, AssertionError) as exc:
        raise DataError(f"{where}: invalid OME-Zarr metadata ({exc})") from None
    return Multiscale(
        where=where,
        version=version,
        axes=tuple(a if isinstance(a, dict) else {"name": a} for a in checked),
        paths=tuple(str(d["path"]) for d in datasets),
        scale=_level0_scale(ms, ndim),
        group=group,
    )


def _format(ngff: str) -> Any:
    from ome_zarr.format import FormatV04, FormatV05

    return {"0.4": FormatV04, "0.5": FormatV05}[ngff]()


def write_image_metadata(
    group: Any,
    *,
    name: str,
    levels: int,
    scale: PhysicalScale | None,
    label: bool,
    channels: bool,
    ngff: str,
) -> None:
    """Write the ``multiscales`` of a pyramid of ``levels`` levels (y, x halved per level)
    into ``group`` with ome-zarr's writer.

    Args:
        group: the zarr group holding arrays ``0 .. levels-1``.
        name: the multiscale's name.
        levels: number of pyramid levels.
        scale: the physical scale of level 0 (None: scale 1, no unit).
        label: a label pyramid (every second voxel: no translation, ``type`` nearest)
            or an image one (2 x 2 means: the half-pixel translation, ``type`` mean).
        channels: a leading ``c`` axis.
        ngff: ``0.4`` or ``0.5``.
    """
    from ome_zarr.writer import add_metadata, get_metadata, write_multiscales_metadata

    z, y, x = scale.scale if scale is not None else (1.0, 1.0, 1.0)
    lead = [1.0] if channels else []
    datasets = []
    for level in range(levels):
        f = 2.0**level
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": [*lead, z, y * f, x * f]}]
        if level and not label:
            shift = [0.0 for _ in lead] + [0.0, (f - 1) / 2 * y, (f - 1) / 2 * x]
            transforms.append({"type": "translation", "translation": shift})
        datasets.append({"path": str(level), "coordinateTransformations": transforms})
    units = scale.units if scale is not None else (None, None, None)
    axes = ([{"name": "c", "type": "channel"}] if channels else []) + [
        {"name": a, "type": "space", **({"unit": u} if u is not None else {})}
        for a, u in zip(SPATIAL, units, strict=True)
    ]
    fmt = _format(ngff)
    write_multiscales_metadata(group, datasets, fmt=fmt, axes=axes, name=name)
    # ome-zarr's writer has no argument for the downscaling ``type``: added to its output
    multiscales = get_metadata(group)["multiscales"]
    multiscales[0]["type"] = "nearest" if label else "mean"
    add_metadata(group, {"multiscales": multiscales}, fmt=fmt)


def write_labels_metadata(labels: Any, name: str, ngff: str) -> None:
    """Register ``labels/<name>`` (its multiscale written) as an image label of the image
    two levels up, with ome-zarr's writer."""
    from ome_zarr.writer import add_metadata, write_label_metadata

    fmt = _format(ngff)
    write_label_metadata(labels, name, fmt=fmt, source={"image": "../../"})
    if ngff == "0.5":  # every ``ome`` attribute of NGFF 0.5 carries the version
        add_metadata(labels, {"version": "0.5"}, fmt=fmt)
