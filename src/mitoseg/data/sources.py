"""Local input formats of ``mitoseg data fetch`` and how they become split stacks.

Every source is reduced to a list of :class:`StackRef` (one image stack, its optional
mask stack and an optional Z range) per split; :func:`load_split` reads, checks and
concatenates them into ``(Z, H, W)`` arrays.

Supported local layouts:

- **EPFL folder**: ``training.tif``, ``training_groundtruth.tif``, ``testing.tif``,
  ``testing_groundtruth.tif`` (the Lucchi CA1 hippocampus release).
- **Canonical folder**: ``{train,test}/{images,masks}.tif`` (``test/masks.tif`` optional).
- **Slice folders**: ``{train,test}/images/*.png|tif`` with ``{train,test}/masks/`` holding
  files of the same stem (``test/masks/`` optional).
- **Manifest** (``*.yaml``): see :func:`parse_manifest`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mitoseg.data.layout import IMAGES, MASKS, SPLITS
from mitoseg.io import DataError, read_image, read_stack

__all__ = [
    "EPFL_FILES",
    "MASK_KINDS",
    "SLICE_SUFFIXES",
    "StackRef",
    "canonical_refs",
    "detect_folder",
    "epfl_refs",
    "load_split",
    "normalize_mask",
    "parse_manifest",
    "slice_folder_refs",
]

#: ``mask_kind`` values: ``binary`` (0/255 uint8) or ``labels`` (raw label values).
MASK_KINDS = ("binary", "labels")
#: EPFL file names per split: ``split -> (images file, ground-truth file)``.
EPFL_FILES: dict[str, tuple[str, str]] = {
    "train": ("training.tif", "training_groundtruth.tif"),
    "test": ("testing.tif", "testing_groundtruth.tif"),
}
#: File suffixes accepted in slice folders.
SLICE_SUFFIXES = (".png", ".tif", ".tiff")
_IMAGE_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16))
_MANIFEST_KEYS = {"root", "license", "description", "train", "test"}
_ENTRY_KEYS = {"image", "mask", "slices"}


@dataclass(frozen=True)
class StackRef:
    """One input stack of a split.

    Attributes:
        image: where the image stack is: a local path, ``http(s)://`` or ``s3://`` URL.
        mask: the mask stack (same forms), or ``None`` for unlabelled data.
        slices: optional half-open Z range ``(start, stop)`` taken from both stacks.
        slices_2d: for slice folders, the 2D files of the stack (``image`` is then the
            folder); ``mask`` is the mask folder and ``mask_files`` its files.
    """

    image: str
    mask: str | None = None
    slices: tuple[int, int] | None = None
    slices_2d: tuple[Path, ...] | None = None
    mask_files: tuple[Path, ...] | None = None


def normalize_mask(mask: np.ndarray, mask_kind: str, name: str) -> np.ndarray:
    """Bring a mask stack to the canonical form.

    Args:
        mask: ``(Z, H, W)`` integer or bool mask.
        mask_kind: ``"binary"``: values must be 0/1 or 0/255 (or all zero) and become
            ``uint8`` 0/255; ``"labels"``: ``uint8``/``uint16`` label values kept as-is.
        name: file or URL named in error messages.

    Returns:
        ``(Z, H, W)`` ``uint8`` 0/255 (binary) or the input label map (labels).

    Raises:
        DataError: non-binary values in binary mode, or a label dtype other than
            uint8/uint16.
    """
    if mask_kind not in MASK_KINDS:
        raise ValueError(f"mask_kind must be one of {MASK_KINDS}, got {mask_kind!r}")
    if mask_kind == "labels":
        if mask.dtype == np.bool_:
            return mask.astype(np.uint8)
        if mask.dtype not in _IMAGE_DTYPES:
            raise DataError(
                f"{name}: unsupported label dtype {mask.dtype}; expected uint8 or uint16"
            )
        return mask
    values = {int(v) for v in np.unique(mask)}
    if values <= {0, 255}:
        return mask.astype(np.uint8, copy=False)
    if values <= {0, 1}:
        return (mask.astype(np.uint8) * 255).astype(np.uint8)
    shown = ", ".join(str(v) for v in sorted(values)[:8])
    more = ", ..." if len(values) > 8 else ""
    raise DataError(
        f"{name}: mask is not binary (values {shown}{more}); expected 0/1 or 0/255, "
        "or use mask kind 'labels'"
    )


def _check_image(images: np.ndarray, name: str) -> np.ndarray:
    if images.dtype not in _IMAGE_DTYPES:
        raise DataError(f"{name}: unsupported image dtype {images.dtype}; expected uint8 or uint16")
    return images


def load_split(
    split: str,
    refs: list[StackRef],
    mask_kind: str,
    resolve: Callable[[str], tuple[Path, str]],
) -> tuple[np.ndarray, np.ndarray | None]:
    """Read, check and concatenate the stacks of one split along Z.

    Args:
        split: split name (for messages).
        refs: the split's stacks, in order.
        mask_kind: ``"binary"`` or ``"labels"`` (see :func:`normalize_mask`).
        resolve: maps a :class:`StackRef` location to ``(local file, display name)``
            (downloads remote files).

    Returns:
        ``images (Z, H, W) uint8|uint16`` and ``masks (Z, H, W)`` (``uint8`` 0/255 for
        binary) or ``None`` when no stack of the split has a mask.

    Raises:
        DataError: unreadable/truncated file, unsupported dtype, mask/image shape
            mismatch, stacks of different (H, W) or dtype, some but not all stacks with
            masks, empty Z range, or a non-binary mask in binary mode. Messages name the
            offending file.
    """
    if not refs:
        raise DataError(f"split {split!r}: no image stacks given")
    with_mask = [r.mask is not None for r in refs]
    if any(with_mask) and not all(with_mask):
        missing = refs[with_mask.index(False)].image
        raise DataError(f"{missing}: no mask given, but other {split} stacks have masks")
    images: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    first_name = ""
    for ref in refs:
        img, img_name, msk, msk_name = _read_ref(ref, resolve)
        img = _check_image(img, img_name)
        if ref.slices is not None:
            start, stop = ref.slices
            if not 0 <= start < stop <= img.shape[0]:
                raise DataError(
                    f"{img_name}: slices [{start}, {stop}) out of range for a stack of "
                    f"{img.shape[0]} slices"
                )
            img = img[start:stop]
            msk = msk[start:stop] if msk is not None else None
        if msk is not None:
            if msk.shape != img.shape:
                raise DataError(
                    f"{msk_name}: mask shape {msk.shape} does not match image {img_name} "
                    f"shape {img.shape}"
                )
            masks.append(normalize_mask(msk, mask_kind, msk_name))
        if images:
            if img.shape[1:] != images[0].shape[1:]:
                raise DataError(
                    f"{img_name}: slice size {img.shape[1:]} differs from {first_name} "
                    f"{images[0].shape[1:]}; stacks of one split must share (H, W)"
                )
            if img.dtype != images[0].dtype:
                raise DataError(
                    f"{img_name}: dtype {img.dtype} differs from {first_name} "
                    f"{images[0].dtype}; stacks of one split must share the dtype"
                )
        else:
            first_name = img_name
        images.append(img)
    out_images = np.concatenate(images) if len(images) > 1 else images[0]
    if not masks:
        return out_images, None
    if len({m.dtype for m in masks}) > 1:
        raise DataError(
            f"split {split!r}: label stacks mix dtypes {sorted({str(m.dtype) for m in masks})}"
        )
    out_masks = np.concatenate(masks) if len(masks) > 1 else masks[0]
    return out_images, out_masks


def _read_ref(
    ref: StackRef, resolve: Callable[[str], tuple[Path, str]]
) -> tuple[np.ndarray, str, np.ndarray | None, str]:
    if ref.slices_2d is not None:
        img = _read_slices(ref.slices_2d)
        msk = _read_slices(ref.mask_files) if ref.mask_files is not None else None
        return img, ref.image, msk, ref.mask or ""
    img_path, img_name = resolve(ref.image)
    img = _read_named(img_path, img_name)
    if ref.mask is None:
        return img, img_name, None, ""
    msk_path, msk_name = resolve(ref.mask)
    return img, img_name, _read_named(msk_path, msk_name), msk_name


def _read_named(path: Path, name: str) -> np.ndarray:
    try:
        return read_stack(path)
    except DataError as exc:
        msg = str(exc)
        if name != str(path) and msg.startswith(str(path)):
            msg = name + msg[len(str(path)) :]
        raise DataError(msg) from None


def _read_slices(files: tuple[Path, ...]) -> np.ndarray:
    slices: list[np.ndarray] = []
    for f in files:
        img = read_image(f)
        if slices and (img.shape != slices[0].shape or img.dtype != slices[0].dtype):
            raise DataError(
                f"{f}: slice {img.shape} {img.dtype} differs from {files[0]} "
                f"{slices[0].shape} {slices[0].dtype}"
            )
        slices.append(img)
    return np.stack(slices)


# ---------------------------------------------------------------- folder layouts


def epfl_refs(folder: Path) -> dict[str, list[StackRef]]:
    """Refs of an EPFL-layout folder.

    Raises:
        DataError: one of the four EPFL files is missing (named).
    """
    refs: dict[str, list[StackRef]] = {}
    for split, (img, gt) in EPFL_FILES.items():
        for name in (img, gt):
            if not (folder / name).is_file():
                raise DataError(f"{folder / name}: file not found (EPFL layout)")
        refs[split] = [StackRef(str(folder / img), str(folder / gt))]
    return refs


def canonical_refs(folder: Path) -> dict[str, list[StackRef]]:
    """Refs of a canonical-layout folder (``test/masks.tif`` optional).

    Raises:
        DataError: a required stack is missing (named).
    """
    refs: dict[str, list[StackRef]] = {}
    for split in SPLITS:
        img, msk = folder / split / IMAGES, folder / split / MASKS
        if not img.is_file():
            raise DataError(f"{img}: file not found (canonical layout)")
        if not msk.is_file() and split == "train":
            raise DataError(f"{msk}: file not found (canonical layout)")
        refs[split] = [StackRef(str(img), str(msk) if msk.is_file() else None)]
    return refs


def _natural_key(path: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.stem)]


def _slice_files(folder: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for f in sorted(folder.iterdir(), key=_natural_key):
        if f.name.startswith(".") or not f.is_file():
            continue
        if f.suffix.lower() not in SLICE_SUFFIXES:
            raise DataError(
                f"{f}: unsupported slice file type; expected one of {', '.join(SLICE_SUFFIXES)}"
            )
        if f.stem in files:
            raise DataError(f"{f}: two slices share the name {f.stem!r} (also {files[f.stem]})")
        files[f.stem] = f
    return files


def slice_folder_refs(folder: Path) -> dict[str, list[StackRef]]:
    """Refs of ``{train,test}/{images,masks}/*`` 2D slice folders, paired by file stem.

    Slices are ordered by natural sort of the stem (``s2`` before ``s10``).

    Raises:
        DataError: missing ``images`` folder (or ``train/masks``), an empty folder, a file
            without partner (named), or an unsupported file type.
    """
    refs: dict[str, list[StackRef]] = {}
    for split in SPLITS:
        img_dir, msk_dir = folder / split / "images", folder / split / "masks"
        if not img_dir.is_dir():
            raise DataError(f"{img_dir}: folder not found (slice-folder layout)")
        images = _slice_files(img_dir)
        if not images:
            raise DataError(f"{img_dir}: no image slices found")
        if not msk_dir.is_dir():
            if split == "train":
                raise DataError(f"{msk_dir}: folder not found (slice-folder layout)")
            refs[split] = [StackRef(str(img_dir), None, slices_2d=tuple(images.values()))]
            continue
        masks = _slice_files(msk_dir)
        for stem, f in images.items():
            if stem not in masks:
                raise DataError(f"{f}: no mask with the same name in {msk_dir}")
        for stem, f in masks.items():
            if stem not in images:
                raise DataError(f"{f}: no image with the same name in {img_dir}")
        refs[split] = [
            StackRef(
                str(img_dir),
                str(msk_dir),
                slices_2d=tuple(images.values()),
                mask_files=tuple(masks[s] for s in images),
            )
        ]
    return refs


def detect_folder(folder: Path) -> tuple[str, dict[str, list[StackRef]]]:
    """Recognise the layout of a local folder.

    Returns:
        ``(kind, refs)`` with kind ``"epfl-folder"``, ``"canonical-folder"`` or
        ``"slice-folders"``.

    Raises:
        DataError: the folder matches none of the layouts.
    """
    if (folder / EPFL_FILES["train"][0]).is_file():
        return "epfl-folder", epfl_refs(folder)
    if (folder / "train" / IMAGES).is_file():
        return "canonical-folder", canonical_refs(folder)
    if (folder / "train" / "images").is_dir():
        return "slice-folders", slice_folder_refs(folder)
    raise DataError(
        f"{folder}: unrecognised folder layout; expected the EPFL files (training.tif, "
        "training_groundtruth.tif, testing.tif, testing_groundtruth.tif), "
        "train/images.tif + train/masks.tif, or train/images/ + train/masks/ slice folders"
    )


# ---------------------------------------------------------------- manifests


def parse_manifest(path: Path) -> tuple[dict[str, list[StackRef]], str | None]:
    """Parse a YAML manifest of image/mask stack pairs per split.

    Format::

        root: ../shared/data          # optional, see below
        license: CC BY-NC-SA 3.0      # optional, copied to dataset.json
        train:
          - {image: vnc/raw.tif, mask: vnc/mito.tif, slices: [0, 15]}
        test:
          - {image: https://host/test.tif, mask: s3://bucket/test_mask.tif}
          - {image: more_test.tif}    # no mask: an unlabelled test split

    Locations are local paths, ``http(s)://`` URLs or ``s3://`` URLs. Relative local paths
    are resolved against ``root`` when given, else against the manifest's folder. A
    relative ``root`` is resolved against the current working directory (run from the
    repository root), and ``~``/``$VARS`` in it are expanded; this lets a manifest
    bundled inside the package point at data beside the repository. ``slices`` is a
    half-open Z range taken from both stacks. Stacks of one split are concatenated
    along Z and must share (H, W) and dtype; within a split either every stack has a
    mask or none does (``train`` needs masks).

    Returns:
        ``(refs per split, license or None)``.

    Raises:
        DataError: missing/unreadable manifest, invalid YAML, unknown keys, missing
            ``train``/``test``, an entry without ``image``, a bad ``slices`` value, or a
            train entry without ``mask``. Messages name the manifest and the entry.
    """
    from mitoseg.io import read_mapping

    doc = read_mapping(
        path, "manifest", fmt="yaml", expected="a manifest mapping with 'train' and 'test' lists"
    )
    unknown = sorted(set(doc) - _MANIFEST_KEYS)
    if unknown:
        raise DataError(
            f"{path}: unknown manifest key(s) {unknown}; allowed: {sorted(_MANIFEST_KEYS)}"
        )
    if doc.get("root") is not None:
        base = Path(os.path.expandvars(str(doc["root"]))).expanduser()
        base = base if base.is_absolute() else Path.cwd() / base
    else:
        base = path.parent
    license_ = doc.get("license")
    refs: dict[str, list[StackRef]] = {}
    for split in SPLITS:
        entries = doc.get(split)
        if not isinstance(entries, list) or not entries:
            raise DataError(f"{path}: '{split}' must be a non-empty list of {{image, mask}}")
        refs[split] = [_manifest_entry(path, split, i, e, base) for i, e in enumerate(entries)]
    return refs, (str(license_) if license_ is not None else None)


def _manifest_entry(path: Path, split: str, i: int, entry: Any, base: Path) -> StackRef:
    where = f"{path}: {split}[{i}]"
    if not isinstance(entry, dict):
        raise DataError(f"{where}: entry must be a mapping with 'image' and 'mask'")
    unknown = sorted(set(entry) - _ENTRY_KEYS)
    if unknown:
        raise DataError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(_ENTRY_KEYS)}")
    if not entry.get("image"):
        raise DataError(f"{where}: 'image' is required")
    if entry.get("mask") is None and split == "train":
        raise DataError(f"{where}: 'mask' is required for train stacks")
    slices = entry.get("slices")
    if slices is not None:
        ok = (
            isinstance(slices, list)
            and len(slices) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) for s in slices)
            and 0 <= slices[0] < slices[1]
        )
        if not ok:
            raise DataError(f"{where}: 'slices' must be [start, stop] with 0 <= start < stop")
        slices = (slices[0], slices[1])

    def loc(value: Any) -> str:
        text = str(value)
        if text.startswith(("http://", "https://", "s3://")):
            return text
        p = Path(os.path.expanduser(text))
        return str(p if p.is_absolute() else base / p)

    mask = entry.get("mask")
    return StackRef(loc(entry["image"]), loc(mask) if mask is not None else None, slices)
