"""Patch extraction (the ``patchify`` stage) with an exact inverse.

Slices are cut into ``P x P`` patches on a regular grid with step ``S`` using the
``patchify`` package. A slice whose size is not covered by the grid is *padded* (bottom
and right, with ``pad_mode``) up to the smallest size ``P + k*S`` that covers it; the
padding is recorded in a :class:`PatchGrid` and :func:`unpatchify_slice` crops it back,
so ``unpatchify_slice(*patchify_slice(x, ...)) == x`` exactly, overlapping steps included.

:func:`make_patch_dataset` builds ``artifacts/patches`` from the TRAIN split, holding out
whole *slices* (not patches: neighbouring patches of one slice leak into each other) for
validation. Test slices are never patchified: evaluation works on whole slices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from patchify import patchify, unpatchify

from mitoseg.checks import check_array
from mitoseg.config import BaseConfig, PatchifyConfig
from mitoseg.data.layout import read_split, split_paths
from mitoseg.inference.normalize import normalize_slice
from mitoseg.inference.plan import context_window
from mitoseg.io import DataError, atomic_dir, write_json
from mitoseg.labels import IGNORE_INDEX, has_labels, labelled
from mitoseg.progress import progress_iter

__all__ = [
    "PatchGrid",
    "make_patch_dataset",
    "map_mask_to_classes",
    "network_inputs",
    "patch_grid",
    "patchify_slice",
    "patchify_stack",
    "split_slices",
    "to_uint8",
    "unpatchify_slice",
    "unpatchify_stack",
]

PadMode = Literal["reflect", "constant", "edge"]
_PAD_MODES: tuple[str, ...] = ("reflect", "constant", "edge")


@dataclass(frozen=True)
class PatchGrid:
    """Geometry of a patch grid over one slice.

    Attributes:
        patch_size: patch side ``P`` in pixels.
        step: grid step ``S`` (``S < P`` overlaps, ``S == P`` tiles).
        slice_shape: ``(H, W)`` of the original slice.
        padded_shape: ``(Hp, Wp)`` after padding, ``Hp = P + (rows - 1) * S >= H``.
        padding: ``((0, Hp - H), (0, Wp - W))``: pixels added bottom and right.
        grid: ``(rows, cols)`` number of patches along each axis.
        pad_mode: numpy pad mode used (``reflect``, ``constant`` (zeros) or ``edge``).
    """

    patch_size: int
    step: int
    slice_shape: tuple[int, int]
    padded_shape: tuple[int, int]
    padding: tuple[tuple[int, int], tuple[int, int]]
    grid: tuple[int, int]
    pad_mode: str

    @property
    def patches_per_slice(self) -> int:
        """``rows * cols``."""
        return self.grid[0] * self.grid[1]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (tuples become lists)."""
        d = asdict(self)
        return {k: ([list(x) for x in v] if k == "padding" else v) for k, v in d.items()}


def _covering(size: int, patch_size: int, step: int) -> tuple[int, int]:
    """``(n, padded)``: fewest grid positions ``n`` with ``P + (n-1)*S >= size``."""
    n = 1 + max(0, math.ceil((size - patch_size) / step))
    return n, patch_size + (n - 1) * step


def patch_grid(
    slice_shape: tuple[int, int], patch_size: int, step: int, pad_mode: str = "reflect"
) -> PatchGrid:
    """Compute the patch grid that covers a ``(H, W)`` slice.

    Raises:
        ValueError: non-positive sizes, ``step > patch_size`` (pixels would be skipped)
            or an unknown ``pad_mode``.
    """
    if len(slice_shape) != 2 or min(slice_shape) < 1:
        raise ValueError(f"slice shape must be (H, W) with H, W >= 1, got {tuple(slice_shape)}")
    if patch_size < 1 or step < 1:
        raise ValueError(f"patch_size and step must be >= 1, got {patch_size} and {step}")
    if step > patch_size:
        raise ValueError(
            f"step ({step}) must not exceed patch_size ({patch_size}); gaps would leave "
            "pixels unseen"
        )
    if pad_mode not in _PAD_MODES:
        raise ValueError(f"pad_mode must be one of {', '.join(_PAD_MODES)}, got {pad_mode!r}")
    h, w = int(slice_shape[0]), int(slice_shape[1])
    rows, hp = _covering(h, patch_size, step)
    cols, wp = _covering(w, patch_size, step)
    return PatchGrid(
        patch_size=patch_size,
        step=step,
        slice_shape=(h, w),
        padded_shape=(hp, wp),
        padding=((0, hp - h), (0, wp - w)),
        grid=(rows, cols),
        pad_mode=pad_mode,
    )


def patchify_slice(
    image: np.ndarray, patch_size: int, step: int, pad_mode: str = "reflect"
) -> tuple[np.ndarray, PatchGrid]:
    """Cut one slice into patches, padding it to the grid first when needed.

    Args:
        image: ``(H, W)`` array of any dtype.
        patch_size: patch side ``P``.
        step: grid step ``S <= P``.
        pad_mode: how padded pixels are filled: ``reflect``, ``constant`` (zeros), ``edge``.

    Returns:
        ``(patches, grid)``: patches ``(rows, cols, P, P)`` in ``image``'s dtype (a copy,
        not a view) and the :class:`PatchGrid` needed to invert the cut.

    Raises:
        ValueError: ``image`` is not 2D, or invalid grid parameters (see :func:`patch_grid`).
    """
    arr = check_array(image, "patchify_slice", ndim=2)
    grid = patch_grid(arr.shape, patch_size, step, pad_mode)
    if grid.padded_shape != grid.slice_shape:
        arr = np.pad(arr, grid.padding, mode=pad_mode)
    patches = patchify(arr, (patch_size, patch_size), step=step)
    return np.ascontiguousarray(patches), grid


def unpatchify_slice(patches: np.ndarray, grid: PatchGrid) -> np.ndarray:
    """Reassemble one slice from its patches and crop the padding away.

    Args:
        patches: ``(rows, cols, P, P)`` or flat ``(rows * cols, P, P)`` in row-major order,
            as produced by :func:`patchify_slice`.
        grid: the grid returned by :func:`patchify_slice`.

    Returns:
        ``(H, W)`` slice in the patches' dtype. With overlapping steps the overlap is taken
        from one of the patches (they agree for patches cut from one slice).

    Raises:
        ValueError: the patches do not match the grid.
    """
    arr = np.asarray(patches)
    rows, cols = grid.grid
    p = grid.patch_size
    if arr.ndim == 3 and arr.shape == (rows * cols, p, p):
        arr = arr.reshape(rows, cols, p, p)
    if arr.shape != (rows, cols, p, p):
        raise ValueError(
            f"unpatchify_slice: patches of shape {arr.shape} do not match the grid "
            f"({rows}, {cols}, {p}, {p})"
        )
    full = unpatchify(arr, grid.padded_shape)
    h, w = grid.slice_shape
    return np.ascontiguousarray(full[:h, :w])


def patchify_stack(
    stack: np.ndarray, patch_size: int, step: int, pad_mode: str = "reflect"
) -> tuple[np.ndarray, PatchGrid]:
    """Cut every slice of a stack into patches (slice-major, then row-major).

    Args:
        stack: ``(Z, H, W)`` array of any dtype.
        patch_size: patch side ``P``.
        step: grid step ``S <= P``.
        pad_mode: ``reflect``, ``constant`` or ``edge``.

    Returns:
        ``(patches (Z * rows * cols, P, P), grid)``; patch ``z * rows * cols + k`` is patch
        ``k`` of slice ``z``.

    Raises:
        ValueError: ``stack`` is not 3D, or invalid grid parameters.
    """
    arr = check_array(stack, "patchify_stack", ndim=3)
    grid = patch_grid(arr.shape[1:], patch_size, step, pad_mode)
    out = np.empty((arr.shape[0] * grid.patches_per_slice, patch_size, patch_size), arr.dtype)
    n = grid.patches_per_slice
    for z in range(arr.shape[0]):
        patches, _ = patchify_slice(arr[z], patch_size, step, pad_mode)
        out[z * n : (z + 1) * n] = patches.reshape(n, patch_size, patch_size)
    return out, grid


def unpatchify_stack(patches: np.ndarray, grid: PatchGrid) -> np.ndarray:
    """Inverse of :func:`patchify_stack`.

    Args:
        patches: ``(Z * rows * cols, P, P)``.
        grid: the grid returned by :func:`patchify_stack`.

    Returns:
        ``(Z, H, W)`` stack in the patches' dtype.

    Raises:
        ValueError: the patch count is not a multiple of ``rows * cols`` or sizes differ.
    """
    arr = np.asarray(patches)
    n = grid.patches_per_slice
    p = grid.patch_size
    if arr.ndim != 3 or arr.shape[1:] != (p, p) or arr.shape[0] % n:
        raise ValueError(
            f"unpatchify_stack: patches of shape {arr.shape} are not (Z * {n}, {p}, {p})"
        )
    return np.stack([unpatchify_slice(arr[i : i + n], grid) for i in range(0, arr.shape[0], n)])


def to_uint8(image: np.ndarray) -> np.ndarray:
    """The stored patch intensity: ``rint(normalize_slice(image) * 255)``.

    Args:
        image: ``(H, W)`` whole slice, any numeric dtype.

    Returns:
        ``(H, W)`` uint8.
    """
    return np.rint(normalize_slice(image) * 255.0).astype(np.uint8)


def network_inputs(stack: np.ndarray, slices: list[int], z_context: int = 0) -> np.ndarray:
    """Slices of a raw stack as the network sees them, uint8 (intensity x 255).

    Args:
        stack: ``(Z, H, W)`` raw slices.
        slices: indexes into ``stack``.
        z_context: 2.5D context ``k`` (:func:`mitoseg.inference.predict.context_window`).

    Returns:
        ``(N, H, W)`` uint8 (:func:`to_uint8` of each slice), or ``(N, H, W, 2k + 1)``
        for ``k > 0``.
    """
    cache: dict[int, np.ndarray] = {}

    def norm(i: int) -> np.ndarray:
        if i not in cache:
            cache[i] = to_uint8(stack[i])
        return cache[i]

    if z_context == 0:
        return np.stack([norm(i) for i in slices])
    depth = stack.shape[0]
    return np.stack(
        [np.stack([norm(j) for j in context_window(z, depth, z_context)], -1) for z in slices]
    )


def map_mask_to_classes(
    mask: np.ndarray, value_to_index: dict[int, int], *, where: str = "mask"
) -> np.ndarray:
    """Map raw mask values to class indices.

    Args:
        mask: ``(H, W)`` (or any shape) integer array of raw values.
        value_to_index: ``BaseConfig.value_to_index()``.
        where: text naming the file and slice, used in the error message.

    Returns:
        Array of ``mask``'s shape, uint8 class indices ``0..C-1`` (and
        :data:`~mitoseg.labels.IGNORE_INDEX` where the raw value is ``base.ignore_value``).

    Raises:
        DataError: a value is not in the class table (message names ``where`` and values).
    """
    values, inverse = np.unique(np.asarray(mask), return_inverse=True)
    unknown = [v for v in values.tolist() if v not in value_to_index]
    if unknown:
        allowed = ", ".join(str(v) for v in sorted(value_to_index))
        raise DataError(
            f"{where}: mask values {unknown} are not in the class table base.classes "
            f"(allowed values: {allowed})"
        )
    lut = np.array([value_to_index[v] for v in values.tolist()], dtype=np.uint8)
    return lut[inverse].reshape(np.shape(mask))


def split_slices(
    n_slices: int, val_fraction: float, seed: int, labelled: Sequence[bool] | None = None
) -> tuple[list[int], list[int]]:
    """Seeded split of slice indices into train and validation.

    ``round(n * val_fraction)`` slices go to validation, at least one when
    ``val_fraction > 0`` and ``n >= 2``, and always leaving at least one for training.
    The validation slices are one block of consecutive sections at a seeded position: the
    plan is validated on them as a stack (2.5D context and z-averaging see true
    neighbours there).

    Sparse labels (``labelled``): the block is placed only where it holds a labelled slice
    and leaves one outside it; unlabelled slices stay in the block (as neighbours; the
    metrics skip their pixels) and never go to training. One labelled slice: no
    validation. With every slice labelled the split is the same as without ``labelled``.

    Args:
        n_slices: slices in the stack.
        val_fraction: share of the slices in the validation block, in ``[0, 1)``.
        seed: seed of the block position.
        labelled: per slice, whether it has a labelled pixel; None: all have.

    Returns:
        ``(train_slices, val_slices)``: sorted, disjoint; together ``0..n-1`` less the
        unlabelled slices outside the block.

    Raises:
        ValueError: ``n_slices < 1``, ``val_fraction`` outside ``[0, 1)``, ``labelled`` of
            the wrong length or without a labelled slice, or no block position holding a
            labelled slice that leaves one for training.
    """
    if n_slices < 1:
        raise ValueError(f"split_slices: need at least 1 slice, got {n_slices}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"split_slices: val_fraction must be in [0, 1), got {val_fraction}")
    flags = [True] * n_slices if labelled is None else [bool(x) for x in labelled]
    if len(flags) != n_slices:
        raise ValueError(f"split_slices: {len(flags)} labelled flags for {n_slices} slices")
    n_labelled = sum(flags)
    if not n_labelled:
        raise ValueError("split_slices: no slice has a labelled pixel")
    n_val = round(n_slices * val_fraction)
    if val_fraction > 0 and n_slices >= 2:
        n_val = max(1, n_val)
    n_val = min(n_val, n_slices - 1) if n_labelled >= 2 else 0
    starts = [
        s
        for s in range(n_slices - n_val + 1)
        if n_val == 0 or 0 < sum(flags[s : s + n_val]) < n_labelled
    ]
    if not starts:
        where = [z for z in range(n_slices) if flags[z]]
        raise ValueError(
            f"split_slices: no block of {n_val} consecutive slices holds a labelled slice "
            f"and leaves one for training (labelled slices: {where}); lower "
            "patchify.val_fraction or label slices further apart"
        )
    start = starts[int(np.random.default_rng(seed).integers(0, len(starts)))]
    val = list(range(start, start + n_val))
    return [i for i in range(n_slices) if i not in val and flags[i]], val


def _fg_fraction(masks: np.ndarray) -> float:
    """Foreground share of the labelled pixels (0.0 when none is labelled)."""
    known = labelled(masks)
    n = int(known.sum())
    return float(((masks != 0) & known).sum() / n) if n else 0.0


def _with_labels(images: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The patches that have a labelled pixel."""
    keep = has_labels(masks, axis=(1, 2)) if len(masks) else np.zeros(0, bool)
    return images[keep], masks[keep]


def _normalised_train_split(
    raw_dir: str | Path, base: BaseConfig, progress: bool
) -> tuple[np.ndarray, np.ndarray, Path]:
    """The TRAIN split as network slices and class indices.

    Returns:
        ``(Z, H, W) uint8`` slices (:func:`to_uint8`), ``(Z, H, W) uint8`` class indices
        (:func:`map_mask_to_classes`) and the mask file's path (for messages).

    Raises:
        DataError: missing/unreadable stacks, a slice that cannot be normalised or mask
            values outside the class table (naming the file and slice).
    """
    images, masks = read_split(raw_dir, "train", require_masks=True)
    assert masks is not None  # read_split(require_masks=True) raises otherwise
    img_path, mask_path = split_paths(raw_dir, "train")
    v2i = base.value_to_index()
    norm = np.empty(images.shape, dtype=np.uint8)
    classes = np.empty(masks.shape, dtype=np.uint8)
    for z in progress_iter(range(images.shape[0]), images.shape[0], "normalising", progress):
        try:
            norm[z] = to_uint8(images[z])
        except ValueError as exc:
            raise DataError(f"{img_path} slice {z}: {exc}") from None
        classes[z] = map_mask_to_classes(masks[z], v2i, where=f"{mask_path} slice {z}")
    return norm, classes, mask_path


def _split_labelled_slices(
    classes: np.ndarray, base: BaseConfig, cfg: PatchifyConfig, seed: int, mask_path: Path
) -> tuple[list[int], list[int], np.ndarray]:
    """Train and validation slice indices (:func:`split_slices` over the labelled slices)
    and the ``(Z,) bool`` labelled-slice flags.

    Raises:
        DataError: no slice has a labelled pixel, or no validation block holds one.
    """
    slice_labelled = has_labels(classes, axis=(1, 2))
    if not slice_labelled.any():
        raise DataError(
            f"{mask_path}: no slice has a labelled pixel (every mask value is "
            f"base.ignore_value {base.ignore_value}, class index {IGNORE_INDEX})"
        )
    try:
        train_idx, val_idx = split_slices(
            classes.shape[0], cfg.val_fraction, seed, slice_labelled.tolist()
        )
    except ValueError as exc:
        raise DataError(f"{mask_path}: {exc}") from None
    return train_idx, val_idx, slice_labelled


def _cut_slices(
    norm: np.ndarray, classes: np.ndarray, idx: list[int], cfg: PatchifyConfig
) -> tuple[np.ndarray, np.ndarray]:
    """The labelled patches of slices ``idx``.

    Returns:
        ``(N, P, P) uint8`` images (``(N, P, P, 2k + 1)`` with ``cfg.z_context = k > 0``:
        channel ``j`` from slice ``context_window(z, Z, k)[j]``) and ``(N, P, P) uint8``
        class indices; patches without a labelled pixel dropped.
    """
    p, s, mode, k = cfg.patch_size, cfg.step, cfg.pad_mode, cfg.z_context

    def cut(stack: np.ndarray, slices: list[int]) -> np.ndarray:
        if not slices:
            return np.empty((0, p, p), dtype=np.uint8)
        return patchify_stack(stack[slices], p, s, mode)[0]

    if k == 0:
        images = cut(norm, idx)
    elif idx:
        windows = [context_window(z, norm.shape[0], k) for z in idx]
        images = np.stack([cut(norm, [w[j] for w in windows]) for j in range(2 * k + 1)], -1)
    else:
        images = np.empty((0, p, p, 2 * k + 1), np.uint8)
    return _with_labels(images, cut(classes, idx))


def make_patch_dataset(
    raw_dir: str | Path,
    out_dir: str | Path,
    base: BaseConfig,
    cfg: PatchifyConfig,
    seed: int,
    *,
    progress: bool = False,
) -> dict[str, Any]:
    """Build the patch dataset from the TRAIN split of a canonical raw directory.

    Each whole slice is normalised (:func:`to_uint8`), its mask mapped to class indices
    (:func:`map_mask_to_classes`); slices are split into train/val (:func:`split_slices`)
    and cut into patches (:func:`patchify_stack`, image and mask padded alike).

    Writes into ``out_dir`` (replaced atomically as a whole):
    ``train_images.npy`` ``(N, P, P)`` uint8 (``(N, P, P, 2k + 1)`` for 2.5D,
    ``cfg.z_context = k > 0``: channel ``j`` holds slice ``context_window(z, Z, k)[j]`` of the
    train stack, the patch's own slice in the middle, neighbours clamped at the stack ends,
    as :func:`mitoseg.inference.predict.iter_stack_probabilities` gives them at inference),
    ``train_masks.npy`` ``(N, P, P)`` uint8 class index, ``val_images.npy`` /
    ``val_masks.npy`` (same, from the validation slices; ``N = 0`` when there are none) and
    ``meta.json``.

    Sparse labels (``base.ignore_value``): slices without a labelled pixel give no
    patches (they still serve as 2.5D context), the validation block holds a labelled
    slice (:func:`split_slices`), and patches without a labelled pixel are dropped.

    Args:
        raw_dir: canonical raw directory (only ``train/`` is read).
        out_dir: output directory (``artifacts/patches``).
        base: class table (``base.classes``).
        cfg: ``patch_size``, ``step``, ``val_fraction``, ``pad_mode``, ``z_context``.
        seed: seed of the slice split.
        progress: show a progress bar.

    Returns:
        The ``meta.json`` content: ``patch_size, step, pad_mode, z_context, n_classes,
        class_names,
        train_slices, val_slices, slice_shape, padded_shape, patches_per_slice,
        n_train_patches, n_val_patches, foreground_fraction {train, val}, labelled_slices,
        labelled_fraction {train, val}, seed``. ``foreground_fraction`` is the fraction of
        non-background pixels among the labelled patch pixels, ``labelled_fraction`` the
        share of labelled patch pixels.

    Raises:
        DataError: missing/unreadable train stacks, mask values outside the class table,
            no labelled slice, or no validation block that holds a labelled slice.
    """
    norm, classes, mask_path = _normalised_train_split(raw_dir, base, progress)
    train_idx, val_idx, slice_labelled = _split_labelled_slices(classes, base, cfg, seed, mask_path)
    grid = patch_grid(norm.shape[1:], cfg.patch_size, cfg.step, cfg.pad_mode)
    arrays: dict[str, np.ndarray] = {}
    for split, idx in (("train", train_idx), ("val", val_idx)):
        arrays[f"{split}_images"], arrays[f"{split}_masks"] = _cut_slices(norm, classes, idx, cfg)
    meta: dict[str, Any] = {
        "patch_size": cfg.patch_size,
        "step": cfg.step,
        "pad_mode": cfg.pad_mode,
        "z_context": cfg.z_context,
        "n_classes": base.n_classes,
        "class_names": base.class_names,
        "train_slices": train_idx,
        "val_slices": val_idx,
        "slice_shape": list(grid.slice_shape),
        "padded_shape": list(grid.padded_shape),
        "patches_per_slice": grid.patches_per_slice,
        "n_train_patches": int(arrays["train_images"].shape[0]),
        "n_val_patches": int(arrays["val_images"].shape[0]),
        "foreground_fraction": {
            "train": _fg_fraction(arrays["train_masks"]),
            "val": _fg_fraction(arrays["val_masks"]),
        },
        "labelled_slices": np.flatnonzero(slice_labelled).tolist(),
        "labelled_fraction": {
            split: float(labelled(arrays[f"{split}_masks"]).mean())
            if arrays[f"{split}_masks"].size
            else 0.0
            for split in ("train", "val")
        },
        "seed": seed,
    }
    with atomic_dir(out_dir) as tmp:
        for name, arr in arrays.items():
            np.save(tmp / f"{name}.npy", arr)
        write_json(tmp / "meta.json", meta)
    return meta
