"""On-the-fly augmentation of (image, mask) training pairs.

One random affine transform per sample (rotation, shift, zoom, shear and flips composed into
a single matrix), an optional elastic deformation (smoothed random displacement field), and
intensity changes (brightness, contrast, gamma, Gaussian noise, Gaussian blur) applied to
the image only. The image is resampled bilinearly, the mask with nearest neighbour, so the
augmented mask only ever contains labels of the input mask. Everything is driven by the
``numpy.random.Generator`` passed in, so a given seed reproduces a sample exactly.

This module is pure numpy/scipy (no tensorflow): the training input pipeline calls
:func:`augment_pair` through ``tf.numpy_function``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError
from scipy import ndimage

from mitoseg.checks import check_array
from mitoseg.config import AugmentConfig
from mitoseg.io import DataError, atomic_path, read_json_object

__all__ = [
    "augment_pair",
    "augment_spec",
    "is_identity",
    "measure_augment_cost",
    "read_augment_spec",
    "select_preview",
    "write_preview",
]

#: How a batch of patches is spelled in messages.
_NHW = {3: "(N, H, W)"}


def is_identity(cfg: AugmentConfig) -> bool:
    """True when every transform of ``cfg`` is disabled (augmentation is a no-op)."""
    return (
        cfg.rotation_deg == 0
        and cfg.shift_fraction == 0
        and cfg.zoom_range == 0
        and cfg.shear_deg == 0
        and not cfg.hflip
        and not cfg.vflip
        and (cfg.elastic_prob == 0 or cfg.elastic_alpha == 0)
        and cfg.brightness == 0
        and cfg.contrast == 0
        and cfg.gamma == 0
        and cfg.noise_std == 0
        and (cfg.blur_prob == 0 or cfg.blur_sigma == 0)
    )


def _random_affine(
    shape: tuple[int, int], rng: np.random.Generator, cfg: AugmentConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one affine map output -> input coordinates about the image centre.

    Returns:
        ``(matrix (2, 2) float64, offset (2,) float64)`` such that an output pixel at
        ``o`` (row, col) samples the input at ``matrix @ o + offset``.
    """
    h, w = shape
    matrix = np.eye(2)
    if cfg.hflip and rng.random() < 0.5:
        matrix = matrix @ np.diag([1.0, -1.0])
    if cfg.vflip and rng.random() < 0.5:
        matrix = matrix @ np.diag([-1.0, 1.0])
    if cfg.rotation_deg > 0:
        theta = math.radians(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg))
        c, s = math.cos(theta), math.sin(theta)
        matrix = matrix @ np.array([[c, -s], [s, c]])
    if cfg.shear_deg > 0:
        shear = math.tan(math.radians(rng.uniform(-cfg.shear_deg, cfg.shear_deg)))
        matrix = matrix @ np.array([[1.0, shear], [0.0, 1.0]])
    if cfg.zoom_range > 0:
        # Independent zoom per axis; a factor > 1 samples a larger input area (zoom out).
        zoom = rng.uniform(1.0 - cfg.zoom_range, 1.0 + cfg.zoom_range, size=2)
        matrix = matrix @ np.diag(zoom)
    shift = np.zeros(2)
    if cfg.shift_fraction > 0:
        shift = rng.uniform(-cfg.shift_fraction, cfg.shift_fraction, size=2) * np.array([h, w])
    centre = (np.array([h, w], dtype=np.float64) - 1.0) / 2.0
    offset = centre - matrix @ centre + shift
    return matrix, offset


def _elastic_field(
    shape: tuple[int, int], rng: np.random.Generator, alpha: float, sigma: float
) -> np.ndarray:
    """Smoothed random displacement field ``(2, H, W) float64`` in pixels.

    The white noise is drawn on a grid ``~sigma/2`` times coarser than the image, smoothed
    there and upsampled (cubic), which is equivalent to smoothing at full resolution for
    the low frequencies that survive a Gaussian of width ``sigma`` but is much cheaper.
    """
    h, w = shape
    factor = max(1, int(sigma // 2))
    ch, cw = max(2, math.ceil(h / factor)), max(2, math.ceil(w / factor))
    noise = rng.uniform(-1.0, 1.0, size=(2, ch, cw))
    field = np.empty((2, h, w))
    for axis in range(2):
        smooth = ndimage.gaussian_filter(noise[axis], sigma / factor, mode="reflect")
        # Rescale so the smoothed field keeps unit-ish amplitude before multiplying by alpha.
        peak = np.abs(smooth).max()
        if peak > 0:
            smooth = smooth / peak
        field[axis] = ndimage.zoom(smooth, (h / ch, w / cw), order=1, mode="nearest")[:h, :w]
    return field * alpha


def _intensity(image: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """Blur, contrast, brightness, gamma and noise on an ``(H, W)`` or ``(H, W, C)`` float32
    image in [0, 1] (the same draw for every channel; blur within each channel)."""
    out = image
    if cfg.blur_prob > 0 and cfg.blur_sigma > 0 and rng.random() < cfg.blur_prob:
        sigma = rng.uniform(0.25 * cfg.blur_sigma, cfg.blur_sigma)
        out = ndimage.gaussian_filter(out, (sigma, sigma, 0)[: out.ndim])
    if cfg.contrast > 0:
        factor = rng.uniform(1.0 - cfg.contrast, 1.0 + cfg.contrast)
        mean = float(out.mean())
        out = (out - mean) * factor + mean
    if cfg.brightness > 0:
        out = out + rng.uniform(-cfg.brightness, cfg.brightness)
    if cfg.gamma > 0:
        out = np.clip(out, 0.0, 1.0) ** math.exp(rng.uniform(-cfg.gamma, cfg.gamma))
    if cfg.noise_std > 0:
        out = out + rng.normal(0.0, cfg.noise_std, size=out.shape)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _per_channel(image: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``fn`` on an ``(H, W)`` image, or on each channel of an ``(H, W, C)`` one."""
    if image.ndim == 2:
        return fn(image)
    return np.stack([fn(image[..., c]) for c in range(image.shape[-1])], axis=-1)


def augment_pair(
    image: np.ndarray,
    mask: np.ndarray,
    rng: np.random.Generator,
    cfg: AugmentConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """Apply one random geometric + intensity augmentation to an image and its mask.

    Args:
        image: ``(H, W)`` or ``(H, W, C)`` float32 in ``[0, 1]`` (channels of a 2.5D patch
            get the same transform).
        mask: ``(H, W)`` integer class indices (``uint8`` typically).
        rng: source of randomness; the same generator state gives the same output.
        cfg: augmentation strengths; all-zero/false strengths return the inputs unchanged.

    Returns:
        ``(image float32 in [0, 1] of the input's shape, mask (H, W) same dtype as the
        input mask)``.
        The mask only contains labels present in the input mask (nearest-neighbour
        resampling, reflected borders).

    Raises:
        ValueError: ``image`` is not ``(H, W)``/``(H, W, C)``, shapes differ, or ``mask`` is
            not integer.
    """
    image = check_array(image, "augment_pair", ndim=(2, 3), axes={3: "(H, W, C)"})
    mask = np.asarray(mask)
    if mask.shape != image.shape[:2]:
        raise ValueError(
            f"augment_pair: mask shape {mask.shape} differs from image shape {image.shape}"
        )
    if not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"augment_pair: mask must hold integer class indices, got {mask.dtype}")
    image = image.astype(np.float32, copy=False)
    shape = (image.shape[0], image.shape[1])

    matrix, offset = _random_affine(shape, rng, cfg)
    elastic = cfg.elastic_prob > 0 and cfg.elastic_alpha > 0 and rng.random() < cfg.elastic_prob
    if elastic:
        field = _elastic_field(shape, rng, cfg.elastic_alpha, cfg.elastic_sigma)
        grid = np.indices(shape, dtype=np.float64)
        coords = np.tensordot(matrix, grid, axes=1) + offset[:, None, None] + field
        image = _per_channel(
            image, lambda ch: ndimage.map_coordinates(ch, coords, order=1, mode="reflect")
        )
        mask = ndimage.map_coordinates(mask, coords, order=0, mode="reflect")
    else:
        centre = (np.array(shape, dtype=np.float64) - 1.0) / 2.0
        if np.array_equal(np.abs(matrix), np.eye(2)) and np.allclose(
            offset, centre - matrix @ centre
        ):
            # Only flips (or nothing): exact, and much faster as array flips.
            flip = tuple(ax for ax in range(2) if matrix[ax, ax] < 0)
            if flip:
                image, mask = np.flip(image, flip).copy(), np.flip(mask, flip).copy()
        else:
            image = _per_channel(
                image,
                lambda ch: ndimage.affine_transform(ch, matrix, offset, order=1, mode="reflect"),
            )
            mask = ndimage.affine_transform(mask, matrix, offset, order=0, mode="reflect")
    image = _intensity(image, rng, cfg)
    return image, mask


def augment_spec(cfg: AugmentConfig, seed: int) -> dict[str, Any]:
    """The augmentation spec written to ``augment.json`` and read back by training."""
    return {"seed": int(seed), "augment": cfg.model_dump()}


def read_augment_spec(path: str | Path) -> tuple[AugmentConfig, int]:
    """Read ``augment.json`` written by the augment stage.

    Returns:
        ``(AugmentConfig, seed)``.

    Raises:
        DataError: missing file, invalid JSON, or missing/invalid fields (names the file).
    """
    p = Path(path)
    data = read_json_object(p, "augment spec")
    if "augment" not in data or "seed" not in data:
        raise DataError(f"{p}: expected keys 'augment' and 'seed'")
    try:
        cfg = AugmentConfig.model_validate(data["augment"])
    except ValidationError as exc:
        problems = "; ".join(
            f"augment.{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise DataError(f"{p}: invalid augment config: {problems}") from None
    if not isinstance(data["seed"], int):
        raise DataError(f"{p}: seed must be an integer, got {data['seed']!r}")
    return cfg, data["seed"]


def measure_augment_cost(
    images: np.ndarray, masks: np.ndarray, cfg: AugmentConfig, seed: int, n: int = 64
) -> float:
    """Mean wall-clock milliseconds of one :func:`augment_pair` call on these patches.

    Args:
        images: ``(N, H, W) uint8`` patches (intensity * 255).
        masks: ``(N, H, W) uint8`` class indices.
        cfg: augmentation strengths.
        seed: seed of the generator.
        n: number of calls timed.
    """
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for i in range(n):
        k = i % len(images)
        augment_pair(images[k].astype(np.float32) / 255.0, masks[k], rng, cfg)
    return (time.perf_counter() - start) * 1000.0 / n


def select_preview(masks: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Pick ``n`` patch indices for the preview, preferring patches with foreground.

    Args:
        masks: ``(N, H, W)`` class indices.
        n: number of samples wanted (fewer when ``N < n``).
        seed: seed of the choice.

    Returns:
        ``(min(n, N),) int64`` sorted indices; patches containing foreground first.

    Raises:
        ValueError: ``masks`` not ``(N, H, W)``, empty, or ``n < 1``.
    """
    masks = check_array(masks, "select_preview", ndim=3, axes=_NHW, nonempty=True)
    if n < 1:
        raise ValueError(f"select_preview: n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    has_fg = masks.reshape(len(masks), -1).any(axis=1)
    fg, bg = np.flatnonzero(has_fg), np.flatnonzero(~has_fg)
    order = np.concatenate([rng.permutation(fg), rng.permutation(bg)])
    return np.sort(order[: min(n, len(masks))]).astype(np.int64)


def write_preview(
    images: np.ndarray,
    masks: np.ndarray,
    cfg: AugmentConfig,
    seed: int,
    path: str | Path,
    n_classes: int | None = None,
) -> None:
    """Save a PNG grid: one row per sample, columns image, mask, augmented image and mask.

    Args:
        images: ``(N, H, W)`` ``uint8`` (intensity * 255) or float in ``[0, 1]``.
        masks: ``(N, H, W)`` integer class indices.
        cfg: augmentation strengths.
        seed: seed of the generator (the same seed gives the same figure).
        path: output ``.png`` path, written atomically.
        n_classes: colour scale of the masks; default ``max(mask) + 1`` (at least 2).

    Raises:
        ValueError: ``images`` not ``(N, H, W)``, empty input or ``images``/``masks``
            shapes differ.
    """
    images = check_array(images, "write_preview", ndim=3, axes=_NHW, nonempty=True)
    masks = np.asarray(masks)
    if masks.shape != images.shape:
        raise ValueError(
            f"write_preview: masks shape {masks.shape} differs from images shape {images.shape}"
        )
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    floats = images.astype(np.float32)
    if np.issubdtype(images.dtype, np.integer):
        floats /= 255.0
    vmax = max(1, (n_classes or int(masks.max()) + 1) - 1)
    rng = np.random.default_rng(seed)
    n = len(images)
    fig = Figure(figsize=(8, 2 * n), dpi=80)
    FigureCanvasAgg(fig)
    axes = fig.subplots(n, 4, squeeze=False)
    titles = ("image", "mask", "augmented image", "augmented mask")
    for row in range(n):
        aug_img, aug_mask = augment_pair(floats[row], masks[row], rng, cfg)
        panels = (floats[row], masks[row], aug_img, aug_mask)
        for col, (ax, panel) in enumerate(zip(axes[row], panels, strict=True)):
            is_mask = col % 2 == 1
            ax.imshow(
                panel,
                cmap="viridis" if is_mask else "gray",
                vmin=0,
                vmax=vmax if is_mask else 1,
                interpolation="nearest",
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(titles[col], fontsize=9)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
