"""Assemble the canonical raw layout from a lab's volume and its label store.

The pipeline reads the canonical layout (:mod:`mitoseg.data.layout`: ``train/`` and
``test/`` image and mask stacks plus ``dataset.json``). A lab has instead one volume
(OME-Zarr, Zarr or TIFF; local or ``s3://``) and a label store
(:mod:`mitoseg.labelstore`: ``store.json`` plus one ``z00123.tif`` mask per labelled
slice, ``ignore_value`` where a slice is not labelled). :func:`assemble_dataset` turns
the two into the canonical layout, reading only the slices that are needed:

* per split, the labelled slices of that split and ``context`` neighbours on each side
  (the 2.5D input channels and the z-averaging of the inference plan read neighbours),
  in volume order; runs of slices that overlap or touch are merged;
* the masks are the stored ones on the split's labelled slices and ``ignore_value``
  everywhere else (context slices, unlabelled pixels). A slice labelled for ``test`` that
  is a context neighbour of a ``train`` slice lends the train stack its image only.

``dataset.json`` records where every stack slice comes from (``volume_slices``), which
slices are labelled, the voxel size, and the volume's identity (:func:`volume_identity`:
its array metadata fingerprint and a digest of the storage listing, S3 ETags or file
sizes) for provenance. :func:`copy_canonical` is the other data source: an existing
canonical directory (``data/raw``) copied as it is.

Stacks are written deterministically (the same inputs give the same bytes), so a DVC
stage that reruns the assembly on every ``dvc repro`` leaves the downstream stages
untouched unless a needed voxel or label changed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mitoseg.config import BaseConfig
from mitoseg.data.layout import DATASET_FILE, IMAGES, MASKS, SPLITS, split_info
from mitoseg.io import DataError, atomic_dir, write_json, write_stack

__all__ = [
    "assemble_dataset",
    "context_slices",
    "copy_canonical",
    "slice_runs",
    "volume_identity",
]


def context_slices(labelled: Sequence[int], depth: int, context: int) -> list[int]:
    """The slices to read for ``labelled`` slices with ``context`` neighbours each side.

    Args:
        labelled: labelled slice indexes of the volume.
        depth: number of slices in the volume.
        context: neighbours on each side (``>= 0``); cut at the volume's ends.

    Returns:
        Sorted, unique volume slice indexes.

    Raises:
        ValueError: ``context < 0`` or a slice outside ``0 .. depth - 1``.
    """
    if context < 0:
        raise ValueError(f"context must be >= 0, got {context}")
    bad = [int(z) for z in labelled if not 0 <= int(z) < depth]
    if bad:
        raise ValueError(f"slices {bad} are outside the volume's 0..{depth - 1}")
    out: set[int] = set()
    for z in labelled:
        out.update(range(max(0, int(z) - context), min(depth, int(z) + context + 1)))
    return sorted(out)


def slice_runs(slices: Sequence[int]) -> list[tuple[int, int]]:
    """Half-open ``(z0, z1)`` runs of consecutive indexes in sorted unique ``slices``."""
    runs: list[tuple[int, int]] = []
    for z in slices:
        if runs and runs[-1][1] == z:
            runs[-1] = (runs[-1][0], z + 1)
        else:
            runs.append((z, z + 1))
    return runs


def volume_identity(volume: Any) -> dict[str, Any]:
    """The identity of an opened volume, for provenance (no voxel is read).

    Args:
        volume: a :class:`mitoseg.volume.store.Volume`.

    Returns:
        ``{"uri", "kind", "shape", "dtype", "chunks", "ngff_version", "fingerprint",
        "objects", "bytes", "listing_sha256", "listing"}``: ``fingerprint`` is
        :func:`mitoseg.labelstore.volume_fingerprint` (array metadata); ``listing_sha256``
        digests the sorted storage listing, each object's key and its S3 ETag
        (``listing: "etag"``) or its size for local files (``listing: "size"``), so it is
        the same for a byte-identical copy and changes when an object is rewritten
        differently (S3) or changes size (local).

    Raises:
        DataError: the storage cannot be listed (names the URI).
    """
    import fsspec

    from mitoseg.labelstore import volume_fingerprint
    from mitoseg.volume.store import is_s3, s3_storage_options

    uri = volume.uri.rstrip("/")
    try:
        if is_s3(uri):
            fs = fsspec.filesystem("s3", **s3_storage_options())
            root = uri[len("s3://") :]
        else:
            fs = fsspec.filesystem("file")
            root = str(Path(uri).resolve())
        infos = {root: fs.info(root)} if fs.isfile(root) else fs.find(root, detail=True)
    except Exception as exc:  # fsspec / botocore raise many types
        raise DataError(f"{uri}: cannot list the volume ({type(exc).__name__}: {exc})") from None
    etags = is_s3(uri)
    lines, total = [], 0
    for path in sorted(infos):
        info = infos[path]
        key = path[len(root) :].lstrip("/") or Path(path).name
        size = int(info.get("size") or 0)
        total += size
        stamp = str(info.get("ETag", "")).strip('"') if etags else str(size)
        lines.append(f"{key}\t{stamp}")
    return {
        "uri": volume.uri,
        "kind": volume.kind,
        "shape": list(volume.shape),
        "dtype": str(volume.dtype),
        "chunks": list(volume.chunks),
        "ngff_version": volume.ngff_version,
        "fingerprint": volume_fingerprint(volume),
        "objects": len(lines),
        "bytes": total,
        "listing": "etag" if etags else "size",
        "listing_sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest(),
    }


def copy_canonical(raw_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Copy a canonical raw directory (``data/raw``) to ``out_dir`` as it is.

    Args:
        raw_dir: ``dataset.json`` and ``{train,test}/{images,masks}.tif``.
        out_dir: replaced atomically by a byte-identical copy.

    Returns:
        The parsed ``dataset.json``.

    Raises:
        DataError: ``raw_dir`` or its ``dataset.json`` is missing, or not a JSON object.
    """
    from mitoseg.io import read_json_object

    raw = Path(raw_dir)
    if not (raw / DATASET_FILE).is_file():
        raise DataError(
            f"{raw / DATASET_FILE}: canonical raw data not found (fill {raw} with "
            "`mitoseg data fetch` or `dvc pull`, or set source.volume to assemble it from "
            "a volume and its label store)"
        )
    info = read_json_object(raw / DATASET_FILE, "dataset description")
    with atomic_dir(out_dir) as tmp:
        shutil.copytree(raw, tmp, dirs_exist_ok=True)
    return info


def _check_tables(manifest: Any, store_file: Path, base: BaseConfig) -> None:
    from mitoseg.labelstore import class_values

    if class_values(manifest.classes) != class_values(base.classes):
        raise DataError(
            f"{store_file}: classes {dict(manifest.classes)} differ from params "
            f"base.classes {dict(base.classes)}; the label store and the pipeline must use "
            "one class table"
        )
    if base.ignore_value != manifest.ignore_value:
        raise DataError(
            f"{store_file}: ignore_value {manifest.ignore_value} differs from params "
            f"base.ignore_value {base.ignore_value}; set base.ignore_value: "
            f"{manifest.ignore_value}"
        )


def _split_stacks(
    volume: Any, store: Path, manifest: Any, split: str, context: int
) -> tuple[np.ndarray, np.ndarray, list[int], list[int]]:
    """``(images, masks, volume_slices, labelled_slices)`` of one split."""
    from mitoseg.labelstore import iter_slices

    labelled = [e.z for e in manifest.entries if e.split == split]
    slices = context_slices(labelled, volume.shape[0], context)
    images = np.concatenate([volume.read(z0, z1) for z0, z1 in slice_runs(slices)])
    masks = np.full(images.shape, manifest.ignore_value, dtype=np.uint8)
    row = {z: i for i, z in enumerate(slices)}
    for entry, mask in iter_slices(store, split):  # type: ignore[arg-type]
        masks[row[entry.z]] = mask
    return images, masks, slices, labelled


def _check_splits(manifest: Any, store_file: Path) -> None:
    """Raise :class:`DataError` naming ``store_file`` when a split has no labelled slice."""
    for split in SPLITS:
        if not any(e.split == split for e in manifest.entries):
            raise DataError(
                f"{store_file}: no slice is labelled for split '{split}' (labelled: "
                f"{[e.z for e in manifest.entries] or 'none'}); "
                + (
                    "label at least one test slice, away from the training slices: models "
                    "are compared on it"
                    if split == "test"
                    else "label at least one training slice"
                )
            )


def _write_split(
    folder: Path,
    volume: Any,
    store: Path,
    manifest: Any,
    split: str,
    context: int,
    voxel_size_nm: Sequence[float] | None,
) -> dict[str, Any]:
    """Write one split's ``images.tif`` and ``masks.tif`` into ``folder`` (created) and
    return its ``dataset.json`` entry (see :func:`assemble_dataset`)."""
    images, masks, slices, labelled = _split_stacks(volume, store, manifest, split, context)
    folder.mkdir()
    write_stack(folder / IMAGES, images, voxel_size_nm)
    write_stack(folder / MASKS, masks, voxel_size_nm)
    return {
        **split_info(folder, images, masks),
        "volume_slices": slices,
        "labelled_slices": labelled,
        "labelled_pixels": int((masks != manifest.ignore_value).sum()),
    }


def assemble_dataset(
    volume_uri: str | None,
    store_dir: str | Path,
    out_dir: str | Path,
    base: BaseConfig,
    context: int,
    *,
    voxel_size_nm: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Write the canonical layout from a volume and its label store.

    Args:
        volume_uri: OME-Zarr / Zarr store or TIFF stack, local path or ``s3://`` URI
            (:func:`mitoseg.volume.store.open_volume`); it must be the volume the store
            labels (same shape and array metadata). None: the store's own volume
            (:func:`mitoseg.labelstore.resolve_volume_uri`).
        store_dir: the label store (``store.json`` and its ``zNNNNN.tif`` masks).
        out_dir: the canonical directory to write (replaced atomically).
        base: the class table and ``ignore_value``; both must equal the store's.
        context: neighbours read on each side of a labelled slice (2.5D channels plus
            the z-averaging radius of the inference plan).
        voxel_size_nm: ``(z, y, x)`` nm overriding the volume's metadata, or None (then
            the volume's, else the store's).

    Returns:
        The ``dataset.json`` written: ``source``, ``kind`` (``volume``), ``mask_kind``
        (``labels``), ``splits`` (per split ``n_slices, height, width, dtype,
        mask_dtype, sha256, volume_slices, labelled_slices, labelled_pixels``),
        ``voxel_size_nm``, ``ignore_value``, ``context``, ``volume``
        (:func:`volume_identity`) and ``labels`` (store path, labelled slices per split).
        ``train/images.tif`` ``(Z, Y, X)`` in the volume's dtype and ``masks.tif``
        ``(Z, Y, X)`` uint8 raw mask values, the same for ``test/``.

    Raises:
        DataError: the volume cannot be opened or read (names the URI and slices), the
            store is missing or invalid, labels another volume (shape or metadata
            differ), uses another class table or ignore value than ``base``, has no
            ``train`` or no ``test`` slice, or a listed mask file is missing or
            unreadable (names the file and slice).
        ValueError: ``context < 0``.
    """
    from mitoseg.labelstore import STORE_FILE, check_volume, read_manifest, resolve_volume_uri
    from mitoseg.volume.store import open_volume

    if context < 0:
        raise ValueError(f"assemble_dataset: context must be >= 0, got {context}")
    store = Path(store_dir)
    store_file = store / STORE_FILE
    manifest = read_manifest(store)
    _check_tables(manifest, store_file, base)
    _check_splits(manifest, store_file)
    if volume_uri is None:
        volume_uri = resolve_volume_uri(store, manifest)
    volume = open_volume(volume_uri, voxel_size_nm=voxel_size_nm)
    try:
        check_volume(store, volume)
        vs = volume.voxel_size_nm or manifest.volume.voxel_size_nm
        dataset: dict[str, Any] = {
            "source": volume_uri,
            "kind": "volume",
            "mask_kind": "labels",
            "splits": {},
            "voxel_size_nm": None if vs is None else [float(v) for v in vs],
            "ignore_value": manifest.ignore_value,
            "context": context,
            "volume": volume_identity(volume),
            "labels": {
                "store": store.as_posix(),
                "store_volume_uri": manifest.volume.uri,
                "n_entries": len(manifest.entries),
            },
        }
        with atomic_dir(out_dir) as tmp:
            for split in SPLITS:  # one split in memory at a time
                dataset["splits"][split] = _write_split(
                    tmp / split, volume, store, manifest, split, context, vs
                )
            write_json(tmp / DATASET_FILE, dataset)
    finally:
        volume.close()
    return json.loads(json.dumps(dataset))
