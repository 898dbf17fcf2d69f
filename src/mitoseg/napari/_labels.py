"""Painted napari labels into the label store, and the suggestions as a list (no napari
or Qt import; the widget is :mod:`mitoseg.napari._store_widget`).

In the painting layer, **0 is unpainted** (unlabelled) and value ``k`` (1, 2, ...) is the
``k``-th class of the store's class table (``1`` = the background class, ``2`` = the
next, ...), written to the store as that class's raw mask value (its first value when
the table lists several). A model's prediction (class indexes ``0 .. C-1``, as the
Segment widget's mask layer holds them) becomes a painting layer by adding 1
(:func:`labels_from_prediction`), so a slice can be corrected instead of painted from
nothing.

:func:`save_labels` writes every slice of the layer that holds a painted pixel (or the
slices asked for) into the store with :func:`mitoseg.labelstore.add_slice` (merge mode),
with the provenance ``tool="napari"`` and the model that made the prediction when the
layer came from one (``metadata["model"]``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mitoseg.labelstore import (
    Entry,
    LabelStoreError,
    StoreManifest,
    add_slice,
    class_values,
    make_provenance,
    read_manifest,
)

__all__ = [
    "CLASS_COLORS",
    "Suggestion",
    "label_colormap",
    "labels_from_prediction",
    "painted_masks",
    "painting_array",
    "save_labels",
    "suggestion_items",
]

#: Colours (RGBA, 0..1) of the painting values 1, 2, ...: background blue, then magenta
#: (as the Segment widget's mask), then the rest.
CLASS_COLORS = (
    (0.0, 0.4, 1.0, 1.0),
    (1.0, 0.0, 1.0, 1.0),
    (1.0, 0.6, 0.0, 1.0),
    (0.0, 0.9, 0.3, 1.0),
    (0.9, 0.9, 0.9, 1.0),
)


def painting_array(shape: tuple[int, int, int]) -> Any:
    """An empty ``(Z, Y, X)`` uint8 painting for a volume of ``shape``: an in-memory Zarr
    array in ``(1, 512, 512)`` chunks, so only the painted chunks take memory (a
    volume-sized numpy array would not fit for a large volume)."""
    import zarr
    from zarr.storage import MemoryStore

    chunks = (1, min(512, shape[1]), min(512, shape[2]))
    return zarr.create_array(
        store=MemoryStore(), shape=shape, chunks=chunks, dtype="uint8", fill_value=0
    )


def label_colormap(n_classes: int) -> dict[int | None, Any]:
    """``{painting value: RGBA}`` for a Labels layer of ``n_classes`` classes (0 and
    anything unknown transparent); colours cycle after five classes."""
    colors: dict[int | None, Any] = {0: "transparent", None: "transparent"}
    for k in range(n_classes):
        colors[k + 1] = CLASS_COLORS[k % len(CLASS_COLORS)]
    return colors


def labels_from_prediction(classes: Any) -> np.ndarray:
    """A prediction's class indexes ``0 .. C-1`` as painting values ``1 .. C``.

    Args:
        classes: uint8 class indexes of any shape (the Segment widget's mask layer).

    Returns:
        uint8 array of the same shape, ``classes + 1``.
    """
    arr = np.asarray(classes)
    if arr.size and int(arr.max()) >= 254:
        raise ValueError(f"prediction class index {int(arr.max())} is too large for a painting")
    return (arr.astype(np.uint8) + 1).astype(np.uint8)


def painted_masks(
    data: Any, manifest: StoreManifest, where: str, slices: Iterable[int] | None = None
) -> dict[int, np.ndarray]:
    """The painted slices of a labels layer as store masks.

    Args:
        data: ``(Z, Y, X)`` integer painting (0 = unpainted, ``k`` = class ``k - 1``),
            on the store's volume grid: a numpy array or any array indexed slice by slice
            (the widget's in-memory Zarr array: only painted chunks take memory).
        manifest: the store's manifest (class table, ignore value, volume shape).
        where: the layer's name, for messages.
        slices: only these slices (each must hold a painted pixel); None: every slice
            with a painted pixel.

    Returns:
        ``{z: (Y, X) uint8 raw mask values, ignore_value where unpainted}``, by z.

    Raises:
        LabelStoreError: the layer's shape is not the volume's, a value beyond the class
            table, or a slice asked for without a painted pixel.
    """
    shape = manifest.volume.shape
    got = tuple(int(n) for n in getattr(data, "shape", np.shape(data)))
    if got != shape:
        raise LabelStoreError(
            f"labels layer {where!r}: shape {got} differs from the store's volume "
            f"(Z, Y, X) = {shape}"
        )
    dtype = np.dtype(getattr(data, "dtype", np.asarray(data).dtype))
    if not np.issubdtype(dtype, np.integer):
        raise LabelStoreError(f"labels layer {where!r}: dtype {dtype} is not an integer type")
    raw = [vals[0] for vals in class_values(manifest.classes).values()]
    lut = np.full(len(raw) + 1, manifest.ignore_value, np.uint8)
    lut[1:] = raw
    asked = slices is not None
    zs = sorted({int(z) for z in slices}) if slices is not None else range(shape[0])
    out: dict[int, np.ndarray] = {}
    for z in zs:
        plane = np.asarray(data[z]) if 0 <= z < shape[0] else np.zeros(0, np.uint8)
        if not plane.any():
            if asked:
                raise LabelStoreError(f"labels layer {where!r}: slice {z} has no painted pixel")
            continue
        low, top = int(plane.min()), int(plane.max())
        if top > len(raw) or low < 0:
            names = ", ".join(f"{k + 1} = {n}" for k, n in enumerate(manifest.classes))
            raise LabelStoreError(
                f"labels layer {where!r}: slice {z}: value {top if top > len(raw) else low} "
                f"is not a class of the store ({names}; 0 = unpainted)"
            )
        out[z] = lut[plane]
    return out


def save_labels(
    store: str | Path,
    data: Any,
    name: str,
    metadata: dict[str, Any] | None = None,
    split: str = "train",
    note: str | None = None,
    author: str | None = None,
    slices: Iterable[int] | None = None,
    allow_test_change: bool = False,
) -> list[Entry]:
    """Write the painted slices of a labels layer into the store (merge mode).

    Args:
        store: the label store directory.
        data: ``(Z, Y, X)`` painting on the volume's grid (see :func:`painted_masks`).
        name: the layer's name (messages).
        metadata: the layer's metadata: ``model`` (the model that made the prediction
            the painting started from) goes to the provenance. A layer of class indexes
            (a prediction, ``class_names``, or a mask the reader opened, ``source``) is
            refused unless it is a painting (``mitoseg_store``).
        split: ``train`` or ``test``.
        note: free text for the provenance.
        author: who painted (default: from the environment).
        slices: only these slices; None: every painted slice.
        allow_test_change: allow changing test slices / moving slices between splits.

    Returns:
        The new entries, by z.

    Raises:
        LabelStoreError: as :func:`painted_masks` and :func:`mitoseg.labelstore.add_slice`;
            nothing painted; a layer of class indexes. Slices before the failing one are saved.
    """
    meta = metadata or {}
    if "mitoseg_store" not in meta and ("class_names" in meta or "source" in meta):
        what = "a prediction" if "class_names" in meta else f"opened from {meta['source']}"
        raise LabelStoreError(
            f"labels layer {name!r} is {what}: class indexes (0 = background), not a "
            "painting (0 = unpainted); start a painting from it with New labels layer"
        )
    manifest = read_manifest(store)
    masks = painted_masks(data, manifest, name, slices)
    if not masks:
        raise LabelStoreError(f"labels layer {name!r}: nothing is painted (0 = unpainted)")
    model = meta.get("model")
    prov = make_provenance("napari", model=str(model) if model else None, note=note, author=author)
    return [
        add_slice(store, z, m, prov, split=split, allow_test_change=allow_test_change)  # type: ignore[arg-type]
        for z, m in masks.items()
    ]  # fmt: skip


@dataclass(frozen=True)
class Suggestion:
    """One line of the widget's suggestion list.

    Attributes:
        text: what the list shows.
        z: the slice to jump to.
        box: ``(top, left, height, width)`` pixels of a tile, or None for a whole slice.
    """

    text: str
    z: int
    box: tuple[int, int, int, int] | None = None


def suggestion_items(path: str | Path) -> list[Suggestion]:
    """The top tiles, then the ranked slices, of ``suggestions.json``.

    Raises:
        DataError: unreadable file or not a suggestions report (names the file).
    """
    from mitoseg.napari._suggestions import load_report

    report = load_report(path)
    items = [
        Suggestion(
            f"tile {t.rank}: slice {t.slice}, y {t.top}, x {t.left} ({t.score:.3f})",
            t.slice,
            (t.top, t.left, t.height, t.width),
        )
        for t in report.tiles
    ]
    items += [
        Suggestion(f"slice {s.slice} (rank {s.rank}, {s.score:.3f})", s.slice)
        for s in report.slices
    ]
    return items
