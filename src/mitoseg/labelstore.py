"""The label store: the slices of a lab's volume that were labelled, with provenance.

A small directory (tracked by git or DVC; never a copy of the raw volume) that labels a
volume (OME-Zarr / Zarr / TIFF, local or ``s3://``) slice by slice::

    <store>/store.json     the manifest (:class:`StoreManifest`, schema :data:`SCHEMA`)
    <store>/z00123.tif     slice 123: (Y, X) uint8 mask in raw mask values,
                           ``ignore_value`` where the slice is not labelled

The manifest names the volume (``uri``, ``shape`` ``(Z, Y, X)``, ``voxel_size_nm``, a
fingerprint of its array metadata), the class table (raw mask value(s) per class name,
as ``base.classes`` in params.yaml; background first) and ``ignore_value``, and one
:class:`Entry` per labelled slice: its split (``train`` or ``test``), file, labelled
pixels, the bounding box of the labelled region and its :class:`Provenance` (UTC time,
author, tool, the model shown while labelling, a note) with the history of earlier
labellings of that slice.

**Re-labelling a slice** (:func:`add_slice`): ``mode="merge"`` (the default) writes the
newly labelled pixels over the stored slice and keeps the stored labels where the new
mask is unlabelled (so regions can be labelled in several sittings); ``mode="replace"``
replaces the whole slice. The previous provenance moves to the entry's ``history``.

**Test slices are the fixed yardstick**: changing a test slice (adding labels to it,
replacing it) or moving a slice between ``train`` and ``test`` raises
:class:`LabelStoreError` unless ``allow_test_change=True``.

**Several writers** (annotators in napari, ``mitoseg labels add``): every write holds
the store's lock across its whole read-modify-write, and a save is the state before or
after it even when its process is killed (:mod:`mitoseg.labelstore_lock`); a writer
waits up to ``lock_timeout_s`` (30 s) for another, then raises naming the holder. The
store is a local directory; ``s3://`` stores are refused.

Light: numpy, pydantic, tifffile and filelock; the volume is opened (lazily, metadata
only) by :func:`init_store` and :func:`check_volume`.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mitoseg.errors import LabelStoreError
from mitoseg.io import write_json, write_stack
from mitoseg.labelstore_lock import (
    LOCK_TIMEOUT_S,
    STORE_FILE,
    commit_save,
    committed_pending,
    local_root,
    store_lock,
)

__all__ = [
    "LOCK_TIMEOUT_S",
    "SCHEMA",
    "STORE_FILE",
    "BBox",
    "Entry",
    "LabelStoreError",
    "Provenance",
    "StoreManifest",
    "VolumeRef",
    "add_slice",
    "check_volume",
    "class_values",
    "init_store",
    "iter_slices",
    "list_entries",
    "make_provenance",
    "read_manifest",
    "read_slice",
    "resolve_volume_uri",
    "slice_file",
    "volume_fingerprint",
]

#: Schema id of ``store.json``.
SCHEMA = "mitoseg.labelstore/1"

Split = Literal["train", "test"]
Mode = Literal["merge", "replace"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VolumeRef(_Strict):
    """The labelled volume.

    Attributes:
        uri: ``s3://`` URI, or a local path relative to the store directory (so the store
            and a volume beside it move together; :func:`resolve_volume_uri`).
        shape: ``(Z, Y, X)``.
        voxel_size_nm: ``(z, y, x)`` nm, None when unknown.
        fingerprint: :func:`volume_fingerprint` of its array metadata, or None.
    """

    uri: str = Field(min_length=1)
    shape: tuple[int, int, int]
    voxel_size_nm: tuple[float, float, float] | None = None
    fingerprint: str | None = None

    @model_validator(mode="after")
    def _positive(self) -> VolumeRef:
        if min(self.shape) < 1:
            raise ValueError(f"volume.shape must be positive, got {self.shape}")
        return self


class BBox(_Strict):
    """Bounding box of the labelled pixels: rows ``y0 .. y1 - 1``, columns ``x0 .. x1 - 1``."""

    y0: int = Field(ge=0)
    y1: int = Field(ge=1)
    x0: int = Field(ge=0)
    x1: int = Field(ge=1)


class Provenance(_Strict):
    """Who labelled a slice, when, with what.

    Attributes:
        time: UTC time of the save.
        author: who labelled (default: the user of the environment).
        tool: ``napari``, ``cli`` or ``python``.
        model: the model URI / version shown while labelling (e.g. the prediction that
            was corrected), or None.
        note: free text, e.g. ``suggest rank 3``.
        mode: ``new`` (first labels of the slice), ``merge`` or ``replace``.
        labelled_pixels: labelled pixels of the mask given at that save.
    """

    time: datetime
    author: str = Field(min_length=1)
    tool: Literal["napari", "cli", "python"]
    model: str | None = None
    note: str | None = None
    mode: Literal["new", "merge", "replace"] = "new"
    labelled_pixels: int = Field(0, ge=0)


class Entry(_Strict):
    """One labelled slice of the store.

    Attributes:
        z: slice index in the volume.
        split: ``train`` or ``test`` (the fixed yardstick).
        file: the mask's file name in the store (``z00123.tif``).
        labelled_pixels: pixels not ``ignore_value`` in the stored mask.
        class_pixels: labelled pixels per class name.
        bbox: bounding box of the labelled pixels.
        provenance: the latest save.
        history: earlier saves of this slice, oldest first.
    """

    z: int = Field(ge=0)
    split: Split
    file: str
    labelled_pixels: int = Field(ge=1)
    class_pixels: dict[str, int]
    bbox: BBox
    provenance: Provenance
    history: list[Provenance] = Field(default_factory=list)


class StoreManifest(_Strict):
    """``store.json``.

    Attributes:
        schema_id: :data:`SCHEMA` (``schema`` in the file).
        volume: the labelled volume.
        classes: class name -> raw mask value(s), background first (``base.classes``).
        ignore_value: raw mask value of an unlabelled pixel.
        entries: one per labelled slice, by increasing ``z``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    schema_id: Literal["mitoseg.labelstore/1"] = Field(SCHEMA, alias="schema")
    volume: VolumeRef
    classes: dict[str, int | list[int]]
    ignore_value: int = Field(ge=0, le=255)
    entries: list[Entry] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> StoreManifest:
        from mitoseg.config import BaseConfig

        BaseConfig(classes=self.classes, ignore_value=self.ignore_value)  # same checks
        big = [x for vs in class_values(self.classes).values() for x in vs if x > 255]
        if big:
            raise ValueError(f"classes: mask value {big[0]} does not fit the store's uint8 masks")
        zs = [e.z for e in self.entries]
        if zs != sorted(set(zs)):
            raise ValueError("entries must be unique and sorted by z")
        depth = self.volume.shape[0]
        if zs and zs[-1] >= depth:
            raise ValueError(f"entries: slice {zs[-1]} is outside the volume's 0..{depth - 1}")
        return self

    def entry(self, z: int) -> Entry | None:
        """The entry of slice ``z``, or None."""
        return next((e for e in self.entries if e.z == z), None)


# ---------------------------------------------------------------------------- helpers


def class_values(classes: Mapping[str, int | Sequence[int]]) -> dict[str, list[int]]:
    """Class name -> its raw mask values (a single value as a one-item list)."""
    return {k: [int(v)] if isinstance(v, int) else [int(x) for x in v] for k, v in classes.items()}


def slice_file(z: int) -> str:
    """File name of slice ``z`` in a store: ``z00123.tif``."""
    return f"z{z:05d}.tif"


def volume_fingerprint(volume: Any) -> str:
    """A fingerprint of a volume's array metadata (kind, shape, dtype, chunks, NGFF
    version): ``sha256:<hex>``. It changes when the volume is rewritten differently; it
    does not read voxels.

    Args:
        volume: a :class:`mitoseg.volume.store.Volume`.
    """
    meta = {
        "kind": volume.kind,
        "shape": list(volume.shape),
        "dtype": str(volume.dtype),
        "chunks": list(volume.chunks),
        "ngff_version": volume.ngff_version,
    }
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
    return f"sha256:{digest}"


def _author() -> str:
    for var in ("MITOSEG_AUTHOR", "USER", "LOGNAME"):
        if os.environ.get(var):
            return os.environ[var]
    try:
        return getpass.getuser()
    except Exception:  # no user database entry (containers)
        return "unknown"


def make_provenance(
    tool: Literal["napari", "cli", "python"],
    model: str | None = None,
    note: str | None = None,
    author: str | None = None,
    time: datetime | None = None,
) -> Provenance:
    """A :class:`Provenance` for a save now.

    Args:
        tool: what saved the labels.
        model: model URI / version shown while labelling, or None.
        note: free text, or None.
        author: who labelled; default ``$MITOSEG_AUTHOR``, ``$USER``, ``$LOGNAME`` or the
            login name.
        time: UTC time; default now.
    """
    return Provenance(
        time=time or datetime.now(UTC),
        author=author.strip() if author and author.strip() else _author(),
        tool=tool,
        model=model or None,
        note=note or None,
    )


def _manifest_path(store: str | Path) -> Path:
    return local_root(store) / STORE_FILE


def _no_store(path: Path) -> LabelStoreError:
    return LabelStoreError(f"{path}: no label store here (create one with `mitoseg labels init`)")


def read_manifest(store: str | Path) -> StoreManifest:
    """Read ``<store>/store.json``.

    Raises:
        LabelStoreError: missing, not JSON or not a valid manifest (names the file and
            the fields).
    """
    path = _manifest_path(store)
    if not path.is_file():
        raise _no_store(path)
    try:
        data = json.loads(path.read_text())
        return StoreManifest.model_validate(data)
    except (OSError, ValueError) as exc:
        if isinstance(exc, ValidationError):
            fields = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'store'}: {e['msg']}" for e in exc.errors()
            )
            raise LabelStoreError(f"{path}: invalid label store ({fields})") from None
        raise LabelStoreError(f"{path}: cannot read the label store ({exc})") from None


def _write_manifest(store: Path, manifest: StoreManifest) -> None:
    write_json(_manifest_path(store), manifest.model_dump(mode="json", by_alias=True))


# ---------------------------------------------------------------------------- the store


def init_store(
    store: str | Path,
    volume_uri: str,
    classes: Mapping[str, int | Sequence[int]],
    ignore_value: int,
    voxel_size_nm: Sequence[float] | None = None,
    lock_timeout_s: float = LOCK_TIMEOUT_S,
) -> StoreManifest:
    """Create an empty label store for a volume (reads only the volume's metadata).

    Args:
        store: the store directory (created; must not hold a store already).
        volume_uri: OME-Zarr / Zarr store or TIFF stack, local path or ``s3://`` URI
            (opened by :func:`mitoseg.volume.store.open_volume`).
        classes: class name -> raw mask value(s), background first (values 0..255).
        ignore_value: raw mask value of an unlabelled pixel (0..255, not a class value).
        voxel_size_nm: ``(z, y, x)`` nm overriding the volume's metadata, or None.
        lock_timeout_s: seconds to wait for another writer of the store.

    Returns:
        The manifest written to ``<store>/store.json``.

    Raises:
        LabelStoreError: a store already there (also one another writer created
            meanwhile), a bad class table / ignore value, an ``s3://`` store, the lock
            held longer than ``lock_timeout_s``.
        DataError: the volume cannot be opened (names it).
    """
    from mitoseg.volume.store import is_s3, open_volume

    path = _manifest_path(store)
    if path.exists():
        raise LabelStoreError(f"{path}: a label store already exists here")
    volume = open_volume(volume_uri, voxel_size_nm=voxel_size_nm)
    uri = volume_uri.rstrip("/")
    if not is_s3(uri):
        uri = os.path.relpath(Path(uri).resolve(), Path(store).resolve())
    try:
        ref = VolumeRef(
            uri=uri,
            shape=volume.shape,
            voxel_size_nm=volume.voxel_size_nm,
            fingerprint=volume_fingerprint(volume),
        )
    finally:
        volume.close()
    try:
        manifest = StoreManifest(
            volume=ref, classes=dict(classes), ignore_value=ignore_value, entries=[]
        )
    except ValidationError as exc:
        msgs = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise LabelStoreError(f"{path}: {msgs}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    with store_lock(path.parent, _author(), lock_timeout_s) as root:
        if path.exists():
            raise LabelStoreError(f"{path}: a label store already exists here")
        _write_manifest(root, manifest)
    return manifest


def resolve_volume_uri(store: str | Path, manifest: StoreManifest | None = None) -> str:
    """Where the store's volume is: its ``s3://`` URI, or its local path (relative to the
    store directory in ``store.json``) joined to ``store``.

    Args:
        store: the store directory.
        manifest: the store's manifest when already read, else None (read here).
    """
    uri = (manifest or read_manifest(store)).volume.uri
    if uri.startswith("s3://") or Path(uri).is_absolute():
        return uri
    return os.path.normpath(Path(store) / uri)


def check_volume(store: str | Path, volume: Any) -> StoreManifest:
    """Check that an opened volume is the one the store labels (shape and fingerprint).

    Args:
        store: the store directory.
        volume: a :class:`mitoseg.volume.store.Volume`.

    Returns:
        The manifest.

    Raises:
        LabelStoreError: shape or fingerprint differ (names both).
    """
    manifest = read_manifest(store)
    path = _manifest_path(Path(store))
    if tuple(volume.shape) != manifest.volume.shape:
        raise LabelStoreError(
            f"{path}: volume.shape is {manifest.volume.shape} but {volume.uri} has "
            f"{tuple(volume.shape)}"
        )
    fp = volume_fingerprint(volume)
    if manifest.volume.fingerprint is not None and fp != manifest.volume.fingerprint:
        raise LabelStoreError(
            f"{path}: volume.fingerprint {manifest.volume.fingerprint} differs from "
            f"{volume.uri}'s {fp} (the volume's array metadata changed)"
        )
    return manifest


def _check_mask(
    manifest: StoreManifest, path: Path, z: int, mask: Any
) -> tuple[np.ndarray, np.ndarray]:
    """The mask as uint8 and its labelled map; raises naming the store, slice and field."""
    depth, h, w = manifest.volume.shape
    where = f"{path}: slice {z}"
    if not isinstance(z, int | np.integer) or not 0 <= int(z) < depth:
        raise LabelStoreError(f"{path}: z {z} is outside the volume's slices 0..{depth - 1}")
    arr = np.asarray(mask)
    if arr.ndim != 2 or arr.shape != (h, w):
        raise LabelStoreError(
            f"{where}: mask shape {arr.shape} differs from the volume's (Y, X) = {(h, w)}"
        )
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise LabelStoreError(f"{where}: mask dtype {arr.dtype} is not an integer type")
    allowed = {v for vs in class_values(manifest.classes).values() for v in vs}
    allowed.add(manifest.ignore_value)
    values = np.unique(arr)
    bad = [int(v) for v in values if int(v) not in allowed]
    if bad:
        raise LabelStoreError(
            f"{where}: mask values {bad[:5]} are not in the class table "
            f"{dict(manifest.classes)} nor the ignore_value {manifest.ignore_value}"
        )
    arr = arr.astype(np.uint8)
    lab = arr != manifest.ignore_value
    if not lab.any():
        raise LabelStoreError(
            f"{where}: the mask labels no pixel (all ignore_value {manifest.ignore_value})"
        )
    return arr, lab


def _entry(
    manifest: StoreManifest,
    z: int,
    split: Split,
    mask: np.ndarray,
    provenance: Provenance,
    history: list[Provenance],
) -> Entry:
    lab = mask != manifest.ignore_value
    rows, cols = np.flatnonzero(lab.any(axis=1)), np.flatnonzero(lab.any(axis=0))
    bbox = BBox(y0=int(rows[0]), y1=int(rows[-1]) + 1, x0=int(cols[0]), x1=int(cols[-1]) + 1)
    table = class_values(manifest.classes)
    counts = {name: int(np.isin(mask, vals).sum()) for name, vals in table.items()}
    return Entry(
        z=z,
        split=split,
        file=slice_file(z),
        labelled_pixels=int(lab.sum()),
        class_pixels=counts,
        bbox=bbox,
        provenance=provenance,
        history=history,
    )


def add_slice(
    store: str | Path,
    z: int,
    mask: Any,
    provenance: Provenance,
    split: Split = "train",
    mode: Mode = "merge",
    allow_test_change: bool = False,
    lock_timeout_s: float = LOCK_TIMEOUT_S,
) -> Entry:
    """Add the labels of one slice to the store (or re-label it), holding the store's
    lock from reading ``store.json`` to writing it (so concurrent writers each see the
    saves before theirs: two merges into one slice keep both, the later one's labels
    winning where both labelled, and the earlier one's provenance in ``history``).

    Args:
        store: the store directory.
        z: slice index in the volume.
        mask: ``(Y, X)`` integer array in raw mask values: class values of the store's
            table where labelled, ``ignore_value`` where not.
        provenance: who / when / what (:func:`make_provenance`); its ``mode`` and
            ``labelled_pixels`` are filled in here.
        split: ``train`` or ``test``.
        mode: for a slice already in the store: ``merge`` (new labelled pixels over the
            stored ones, stored labels kept where the new mask is unlabelled) or
            ``replace`` (the new mask only). The previous provenance goes to ``history``.
        allow_test_change: allow changing a test slice or moving a slice between splits.
        lock_timeout_s: seconds to wait for another writer of the store.

    Returns:
        The slice's new :class:`Entry` (the file and ``store.json`` written as one save).

    Raises:
        LabelStoreError: no store; ``z`` out of range; wrong mask shape or dtype; values
            not in the class table; nothing labelled; a split conflict; a bad ``mode`` or
            ``split``; the lock held by another writer longer than ``lock_timeout_s``.
            The message names the store, the slice and the field.
    """
    path = _manifest_path(store)
    if not path.is_file():
        raise _no_store(path)
    if split not in ("train", "test"):
        raise LabelStoreError(f"{path}: slice {z}: split must be 'train' or 'test', got {split!r}")
    if mode not in ("merge", "replace"):
        raise LabelStoreError(f"{path}: slice {z}: mode must be 'merge' or 'replace', got {mode!r}")
    with store_lock(path.parent, provenance.author, lock_timeout_s) as root:
        return _add_locked(root, z, mask, provenance, split, mode, allow_test_change)


def _add_locked(
    root: Path,
    z: int,
    mask: Any,
    provenance: Provenance,
    split: Split,
    mode: Mode,
    allow_test_change: bool,
) -> Entry:
    """:func:`add_slice`'s read-modify-write, with the store's lock held."""
    manifest = read_manifest(root)
    path = _manifest_path(root)
    arr, lab = _check_mask(manifest, path, z, mask)
    z = int(z)
    old = manifest.entry(z)
    history: list[Provenance] = []
    used_mode: Literal["new", "merge", "replace"] = "new"
    if old is not None:
        if not allow_test_change and (old.split == "test" or split != old.split):
            what = (
                "is a test slice (the fixed yardstick); changing it"
                if old.split == "test"
                else f"is in split '{old.split}'; moving it to '{split}'"
            )
            raise LabelStoreError(
                f"{path}: slice {z}: split: the slice {what} needs allow_test_change "
                "(--allow-test-change)"
            )
        history = [*old.history, old.provenance]
        used_mode = mode
        if mode == "merge":
            stored = read_slice(root, z)
            arr = np.where(lab, arr, stored).astype(np.uint8)
    prov = provenance.model_copy(update={"mode": used_mode, "labelled_pixels": int(lab.sum())})
    entry = _entry(manifest, z, split, arr, prov, history)
    vs = manifest.volume.voxel_size_nm
    entries = sorted([e for e in manifest.entries if e.z != z] + [entry], key=lambda e: e.z)
    new = manifest.model_copy(update={"entries": entries})
    commit_save(
        root,
        entry.file,
        lambda target: write_stack(target, arr, vs),
        new.model_dump(mode="json", by_alias=True),
    )
    return entry


def list_entries(store: str | Path, split: Split | None = None) -> list[Entry]:
    """The store's entries by increasing ``z`` (only those of ``split`` when given)."""
    entries = read_manifest(store).entries
    return [e for e in entries if split is None or e.split == split]


def _read_file(root: Path, manifest: StoreManifest, entry: Entry) -> np.ndarray:
    import tifffile

    path = root / entry.file
    pending = committed_pending(root)  # a save whose mask is not renamed into place yet
    if pending is not None and pending[0] == entry.file and pending[1].is_file():
        path = pending[1]
    if not path.is_file():
        raise LabelStoreError(f"{path}: slice {entry.z}: file is listed in store.json but missing")
    try:
        arr = tifffile.imread(path)
    except Exception as exc:  # tifffile raises many types for corrupt files
        raise LabelStoreError(f"{path}: slice {entry.z}: cannot read the mask ({exc})") from None
    shape = manifest.volume.shape[1:]
    if arr.shape != shape or arr.dtype != np.uint8:
        raise LabelStoreError(
            f"{path}: slice {entry.z}: mask is {arr.dtype} {arr.shape}, expected uint8 {shape}"
        )
    return arr


def read_slice(store: str | Path, z: int) -> np.ndarray:
    """The stored mask of slice ``z``.

    Returns:
        ``(Y, X)`` uint8 raw mask values (``ignore_value`` where not labelled).

    Raises:
        LabelStoreError: no such entry, or a missing / unreadable / wrong-shaped file.
    """
    root = local_root(store)
    manifest = read_manifest(root)
    entry = manifest.entry(int(z))
    if entry is None:
        labelled = [e.z for e in manifest.entries]
        raise LabelStoreError(
            f"{_manifest_path(root)}: slice {z} is not labelled (labelled: {labelled or 'none'})"
        )
    return _read_file(root, manifest, entry)


def iter_slices(
    store: str | Path, split: Split | None = None
) -> Iterator[tuple[Entry, np.ndarray]]:
    """The labelled slices, by increasing ``z``: ``(entry, (Y, X) uint8 mask)``.

    Args:
        store: the store directory.
        split: only ``train`` or ``test`` slices, or None for all.
    """
    root = local_root(store)
    manifest = read_manifest(root)
    for entry in manifest.entries:
        if split is None or entry.split == split:
            yield entry, _read_file(root, manifest, entry)
