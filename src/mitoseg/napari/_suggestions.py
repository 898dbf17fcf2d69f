"""``mitoseg suggest``'s ranking as a napari Shapes layer (no napari or Qt import).

:func:`read_suggestions` turns ``suggestions.json`` (:class:`mitoseg.suggest.SuggestReport`)
into one ``shapes`` layer data tuple: the report's top tiles as rectangles on their slices,
labelled with their rank, edges coloured from yellow (most unsure) to blue, on the input's
voxel size (so it overlays the image opened by the mitoseg reader). The ranked slices are
in the layer's ``metadata["slices"]``; the mitoseg reader opens such a file
(:func:`mitoseg.napari._reader.get_reader`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mitoseg.io import DataError

__all__ = ["SUGGESTIONS_FILE", "load_report", "read_suggestions"]

#: File name of the ranking written by ``mitoseg suggest``.
SUGGESTIONS_FILE = "suggestions.json"


def load_report(path: str | Path) -> Any:
    """``suggestions.json`` as a :class:`mitoseg.suggest.SuggestReport`.

    Raises:
        DataError: unreadable file or not a suggestions report (names the file).
    """
    from pydantic import ValidationError

    from mitoseg.suggest import SuggestReport

    p = Path(path)
    try:
        return SuggestReport.model_validate(json.loads(p.read_text()))
    except (OSError, ValueError, ValidationError) as exc:
        raise DataError(f"{p}: not a mitoseg suggestions report ({exc})") from None


def read_suggestions(path: str | Path) -> list[tuple[Any, dict[str, Any], str]]:
    """``suggestions.json`` -> ``[(rectangles, kwargs, "shapes")]``.

    Args:
        path: a file written by :func:`mitoseg.suggest.write_suggestions`.

    Returns:
        One layer data tuple: ``data`` a list of ``(4, 3)`` float ``(z, y, x)`` pixel
        corners (one per top tile, best first), kwargs with ``shape_type`` rectangle,
        ``features`` (``rank``, ``slice``, ``score``), a rank ``text``, ``edge_color``,
        ``scale`` (the voxel size in nm, 1 when unknown) and ``metadata`` (``source``,
        ``model``, ``slices``: the ranked slices).

    Raises:
        DataError: unreadable file or not a suggestions report (names the file).
    """
    from mitoseg.suggest import tile_corners

    report = load_report(path)
    tiles = report.tiles
    data = [tile_corners(t).astype(np.float64) for t in tiles]
    # yellow (rank 1) .. blue (last)
    t = np.linspace(0.0, 1.0, len(tiles)) if len(tiles) > 1 else np.zeros(len(tiles))
    colours = np.stack([1 - t, 1 - 0.5 * t, t, np.ones_like(t)], axis=1) if len(tiles) else []
    vs = report.voxel_size_nm
    kwargs: dict[str, Any] = {
        "name": f"suggestions ({Path(report.source).name})",
        "shape_type": "rectangle",
        "features": {
            "rank": [t.rank for t in tiles],
            "slice": [t.slice for t in tiles],
            "score": [t.score for t in tiles],
        },
        "text": {"string": "{rank}", "color": "yellow", "anchor": "upper_left"},
        "edge_color": colours,
        "edge_width": 2,
        "face_color": "transparent",
        "scale": tuple(float(v) for v in vs) if vs is not None else (1.0, 1.0, 1.0),
        "metadata": {
            "source": report.source,
            "model": report.model,
            "slices": [s.model_dump() for s in report.slices],
            "voxel_size_nm": None if vs is None else list(vs),
        },
    }
    if vs is not None:
        kwargs["units"] = ("nm",) * 3
    return [(data, kwargs, "shapes")]
