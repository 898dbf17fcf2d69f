"""Which slices and tiles to label next (``mitoseg suggest``): uncertainty ranking.

The model is run over a stack (the plan's tiling and normalisation, as ``mitoseg
predict`` runs it, through :func:`mitoseg.inference.predict.iter_stack_probabilities`) once as it
is and once per test-time flip (the input flipped, the output flipped back). Three
per-pixel uncertainty maps, each in ``[0, 1]``, come out of those probabilities:

* **entropy** ``E``: the entropy of the mean probabilities (over the passes), in units of
  its maximum: binary ``-(p log p + (1 - p) log(1 - p)) / log 2``, multiclass
  ``-sum_c p_c log p_c / log C``. 1 where the model says 50/50.
* **flip disagreement** ``F``: the mean total-variation distance between each pass and
  the mean of the passes (binary ``|p_k - p|``, multiclass ``1/2 sum_c |p_kc - p_c|``).
  0 when the flipped inputs give the same answer.
* **neighbour disagreement** ``N``: the mean total-variation distance between the mean
  probabilities of slice ``z`` and those of slices ``z - 1`` and ``z + 1`` (those that
  exist). Sections 45-50 nm apart mostly show the same mitochondria, so an answer that
  jumps from one slice to the next is unsure.

**Score.** The pixel score is the weighted mean ``(w_E E + w_F F + w_N N) / (w_E + w_F +
w_N)`` (default weights 1, 1, 1); a term that cannot be measured (no flips; a stack of one
slice) is left out of the mean. A slice's score (and each component) is the mean over its
pixels, a tile's the mean over the tile's pixels (tiles of ``tile_size`` on a grid from
the top-left corner, the last row/column of tiles cut by the slice border). Higher is more
unsure; slices and tiles are ranked by decreasing score (ties: lower slice, then
row-major tile order). The plan's own TTA and z-averaging are switched off for the passes
(:func:`suggest_stack`): TTA would hide the flip disagreement and z-averaging the neighbour
disagreement.

:func:`score_passes` is the pure core (numpy arrays in, scores out); :func:`suggest_stack`
runs a model; :func:`write_suggestions` writes ``suggestions.json`` (:class:`SuggestReport`),
``slices.csv``, ``tiles.csv`` and ``tiles_napari.csv`` (a napari Shapes layer: the top
tiles as rectangles on their slices, drag the file onto napari). Light: numpy and
pydantic (tensorflow only through the model given).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from mitoseg.checks import check_array
from mitoseg.io import atomic_path, write_json

__all__ = [
    "FLIPS",
    "SUGGEST_VERSION",
    "SliceScore",
    "SuggestReport",
    "SuggestWeights",
    "TileScore",
    "disagreement_map",
    "entropy_map",
    "flip_disagreement_map",
    "flip_passes",
    "score_passes",
    "suggest_stack",
    "tile_corners",
    "tile_means",
    "write_suggestions",
]

#: Schema version of ``suggestions.json``.
SUGGEST_VERSION = 1

#: Test-time flips: ``h`` mirrors columns (x), ``v`` rows (y), ``hv`` both.
FLIPS: tuple[str, ...] = ("h", "v", "hv")
Flip = Literal["h", "v", "hv"]
_FLIP_AXES = {"h": (2,), "v": (1,), "hv": (1, 2)}

#: Output files of :func:`write_suggestions`.
OUTPUT_FILES = ("suggestions.json", "slices.csv", "tiles.csv", "tiles_napari.csv")

_COMPONENTS = ("entropy", "flip", "neighbour")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SuggestWeights(_Strict):
    """Weights of the score's three terms (see the module docstring); not all zero."""

    entropy: float = Field(1.0, ge=0)
    flip: float = Field(1.0, ge=0)
    neighbour: float = Field(1.0, ge=0)


class SliceScore(_Strict):
    """One slice's uncertainty: ``score`` and its three terms, pixel means in [0, 1]
    (``rank`` 1 = most unsure)."""

    rank: int = Field(ge=1)
    slice: int = Field(ge=0)
    score: float = Field(ge=0, le=1)
    entropy: float = Field(ge=0, le=1)
    flip: float = Field(ge=0, le=1)
    neighbour: float = Field(ge=0, le=1)


class TileScore(SliceScore):
    """One tile's uncertainty (the :class:`SliceScore` fields over the tile): pixels
    ``top .. top + height - 1``, ``left .. left + width - 1`` of slice ``slice``, grid
    position ``row``, ``col``."""

    row: int = Field(ge=0)
    col: int = Field(ge=0)
    top: int = Field(ge=0)
    left: int = Field(ge=0)
    height: int = Field(ge=1)
    width: int = Field(ge=1)


class SuggestReport(_Strict):
    """``suggestions.json``: what was ranked, how, and the ranking.

    Attributes:
        version: :data:`SUGGEST_VERSION`.
        source: the input stack or volume.
        model: the model (path or URI) that was run.
        shape: ``(Z, Y, X)`` of the input.
        voxel_size_nm: ``(z, y, x)`` nm of the input (napari scale), None when unknown.
        tile_size: tile side, pixels.
        flips: the test-time flips run besides the plain pass.
        weights: the score's weights (terms that could not be measured have weight 0).
        slices: every slice, ranked (rank 1 = most unsure).
        tiles: the ``top`` most unsure tiles, ranked (``tiles.csv`` has all).
        n_tiles: tiles scored in all.
    """

    version: int = SUGGEST_VERSION
    source: str
    model: str
    shape: tuple[int, int, int]
    voxel_size_nm: tuple[float, float, float] | None = None
    tile_size: int = Field(ge=1)
    flips: list[Flip]
    weights: SuggestWeights
    slices: list[SliceScore]
    tiles: list[TileScore]
    n_tiles: int = Field(ge=0)


# ---------------------------------------------------------------------------- pixel maps


def _as_probs(probs: Any, where: str) -> np.ndarray:
    p = check_array(probs, where, ndim=3, axes={3: "(H, W, C)"})
    if not np.issubdtype(p.dtype, np.floating):
        raise ValueError(f"{where}: expected float probabilities, got {p.dtype}")
    return p.astype(np.float64, copy=False)


def entropy_map(probs: np.ndarray) -> np.ndarray:
    """Normalised entropy of each pixel's probabilities.

    Args:
        probs: ``(H, W, C)`` float probabilities: ``C = 1`` sigmoid foreground, else
            softmax over ``C`` classes.

    Returns:
        ``(H, W)`` float64 in ``[0, 1]`` (1 = uniform over the classes).
    """
    p = np.clip(_as_probs(probs, "entropy_map"), 0.0, 1.0)
    if p.shape[-1] == 1:
        p = np.concatenate([1.0 - p, p], axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(p), 0.0)
    return np.clip(terms.sum(axis=-1) / math.log(p.shape[-1]), 0.0, 1.0)


def disagreement_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Total-variation distance between two probability maps, per pixel.

    Args:
        a: ``(H, W, C)`` float probabilities (``C = 1``: sigmoid foreground).
        b: the same shape.

    Returns:
        ``(H, W)`` float64 in ``[0, 1]``: ``|a - b|`` for ``C = 1``, else
        ``1/2 sum_c |a_c - b_c|``.

    Raises:
        ValueError: shapes differ.
    """
    a = _as_probs(a, "disagreement_map")
    b = _as_probs(b, "disagreement_map")
    if a.shape != b.shape:
        raise ValueError(f"disagreement_map: shapes {a.shape} and {b.shape} differ")
    diff = np.abs(a - b).sum(axis=-1)
    return np.clip(diff if a.shape[-1] == 1 else diff / 2.0, 0.0, 1.0)


def flip_disagreement_map(passes: Sequence[np.ndarray]) -> np.ndarray:
    """Mean total-variation distance of each pass to the mean of the passes.

    Args:
        passes: ``K >= 1`` ``(H, W, C)`` probability maps of one slice (plain, flipped...).

    Returns:
        ``(H, W)`` float64 in ``[0, 1]`` (zeros for one pass).

    Raises:
        ValueError: no pass, or passes of different shapes.
    """
    if not passes:
        raise ValueError("flip_disagreement_map: no pass given")
    mean = np.mean([_as_probs(p, "flip_disagreement_map") for p in passes], axis=0)
    return np.mean([disagreement_map(p, mean) for p in passes], axis=0)


def tile_means(values: np.ndarray, tile_size: int) -> np.ndarray:
    """Mean of a 2D map over each tile of a grid from the top-left corner.

    Args:
        values: ``(H, W)`` numbers.
        tile_size: tile side (>= 1); the last row/column of tiles is cut by the border.

    Returns:
        ``(ceil(H / t), ceil(W / t))`` float64 means.

    Raises:
        ValueError: ``values`` not 2D, or ``tile_size < 1``.
    """
    v = check_array(values, "tile_means", ndim=2).astype(np.float64, copy=False)
    if tile_size < 1:
        raise ValueError(f"tile_means: tile_size must be >= 1, got {tile_size}")
    h, w = v.shape
    rows, cols = -(-h // tile_size), -(-w // tile_size)
    r_starts = np.arange(rows) * tile_size
    c_starts = np.arange(cols) * tile_size
    sums = np.add.reduceat(np.add.reduceat(v, r_starts, axis=0), c_starts, axis=1)
    heights = np.minimum(r_starts + tile_size, h) - r_starts
    widths = np.minimum(c_starts + tile_size, w) - c_starts
    return sums / np.outer(heights, widths)


# ---------------------------------------------------------------------------- ranking


def _effective(weights: SuggestWeights, n_passes: int, depth: int) -> SuggestWeights:
    """``weights`` with the terms that cannot be measured set to 0."""
    w = weights.model_copy(
        update={
            "flip": weights.flip if n_passes > 1 else 0.0,
            "neighbour": weights.neighbour if depth > 1 else 0.0,
        }
    )
    if w.entropy + w.flip + w.neighbour <= 0:
        raise ValueError(
            "suggest: every weight of a measurable term is 0 (flip needs --flips, "
            "neighbour a stack of more than one slice)"
        )
    return w


def score_passes(
    passes: Iterable[Sequence[np.ndarray]],
    depth: int,
    tile_size: int,
    weights: SuggestWeights | None = None,
    *,
    first_slice: int = 0,
) -> tuple[list[SliceScore], list[TileScore], SuggestWeights]:
    """Rank the slices and tiles of a stack from its probabilities (the pure core).

    Streams: holds the mean probabilities of three slices at a time.

    Args:
        passes: per slice ``z = 0 .. depth - 1``, the ``K`` ``(H, W, C)`` probability maps
            of that slice (the plain pass first, then each flip mapped back); the same
            ``K``, shape and ``C`` for every slice.
        depth: number of slices ``passes`` yields.
        tile_size: tile side, pixels.
        weights: the score's weights (default 1, 1, 1).
        first_slice: number of the first slice in the results (a block of a volume).

    Returns:
        ``(slices, tiles, weights)``: every slice and every tile, ranked (see the module
        docstring), and the weights used (0 for terms that could not be measured).

    Raises:
        ValueError: ``depth < 1``, ``tile_size < 1``, all measurable weights 0, a slice
            count other than ``depth``, or passes that differ in number or shape.
    """
    if depth < 1:
        raise ValueError(f"score_passes: depth must be >= 1, got {depth}")
    if first_slice < 0:
        raise ValueError(f"score_passes: first_slice must be >= 0, got {first_slice}")
    if tile_size < 1:
        raise ValueError(f"score_passes: tile_size must be >= 1, got {tile_size}")
    weights = weights or SuggestWeights()
    it = iter(passes)
    first = _next_slice(it, 0, depth, None)
    used = _effective(weights, len(first), depth)
    total = used.entropy + used.flip + used.neighbour
    rows_s: list[dict[str, Any]] = []
    rows_t: list[dict[str, Any]] = []
    prev_mean: np.ndarray | None = None
    cur = first
    cur_mean = np.mean(first, axis=0)
    for z in range(depth):
        nxt = _next_slice(it, z + 1, depth, cur) if z + 1 < depth else None
        nxt_mean = None if nxt is None else np.mean(nxt, axis=0)
        maps = {
            "entropy": entropy_map(cur_mean),
            "flip": flip_disagreement_map(cur),
            "neighbour": _neighbour_map(cur_mean, prev_mean, nxt_mean),
        }
        score = sum(getattr(used, k) * maps[k] for k in _COMPONENTS) / total
        means = {k: float(v.mean()) for k, v in maps.items()}
        rows_s.append({"slice": first_slice + z, "score": float(score.mean()), **means})
        rows_t.extend(_tile_rows(first_slice + z, score, maps, tile_size))
        prev_mean, cur, cur_mean = cur_mean, nxt or [], nxt_mean  # type: ignore[assignment]
    if next(it, None) is not None:
        raise ValueError(f"score_passes: more than depth={depth} slices were given")
    rows_s.sort(key=lambda r: (-r["score"], r["slice"]))
    rows_t.sort(key=lambda r: (-r["score"], r["slice"], r["row"], r["col"]))
    slices = [SliceScore(rank=i + 1, **_clip(r)) for i, r in enumerate(rows_s)]
    tiles = [TileScore(rank=i + 1, **_clip(r)) for i, r in enumerate(rows_t)]
    return slices, tiles, used


def _clip(row: dict[str, Any]) -> dict[str, Any]:
    """Scores rounded to 6 decimals and kept in [0, 1] (float sums may overshoot 1)."""
    return {
        k: min(1.0, max(0.0, round(v, 6))) if isinstance(v, float) else v for k, v in row.items()
    }


def _next_slice(
    it: Iterator[Sequence[np.ndarray]], z: int, depth: int, like: Sequence[np.ndarray] | None
) -> list[np.ndarray]:
    got = next(it, None)
    if got is None:
        raise ValueError(f"score_passes: got {z} slices, expected depth={depth}")
    out = [_as_probs(p, f"score_passes: slice {z}") for p in got]
    if not out:
        raise ValueError(f"score_passes: slice {z} has no pass")
    ref = out if like is None else like
    if len(out) != len(ref) or any(p.shape != ref[0].shape for p in out):
        raise ValueError(
            f"score_passes: slice {z} has {len(out)} passes of shapes "
            f"{sorted({p.shape for p in out})}; expected {len(ref)} of shape {ref[0].shape}"
        )
    return out


def _neighbour_map(mean: np.ndarray, prev: np.ndarray | None, nxt: np.ndarray | None) -> np.ndarray:
    near = [n for n in (prev, nxt) if n is not None]
    if not near:
        return np.zeros(mean.shape[:2])
    return np.mean([disagreement_map(mean, n) for n in near], axis=0)


def _tile_rows(
    z: int, score: np.ndarray, maps: dict[str, np.ndarray], tile_size: int
) -> list[dict[str, Any]]:
    h, w = score.shape
    means = {"score": tile_means(score, tile_size)} | {
        k: tile_means(v, tile_size) for k, v in maps.items()
    }
    rows = []
    for r in range(means["score"].shape[0]):
        for c in range(means["score"].shape[1]):
            top, left = r * tile_size, c * tile_size
            rows.append(
                {
                    "slice": z,
                    "row": r,
                    "col": c,
                    "top": top,
                    "left": left,
                    "height": min(tile_size, h - top),
                    "width": min(tile_size, w - left),
                    **{k: float(v[r, c]) for k, v in means.items()},
                }
            )
    return rows


# ---------------------------------------------------------------------------- the model


def flip_passes(
    model_or_fn: Any,
    stack: np.ndarray,
    plan: Any,
    flips: Sequence[str] = ("h", "v"),
    *,
    progress: bool = False,
) -> Iterator[list[np.ndarray]]:
    """Per slice, the probabilities of the plain pass and of each flipped pass.

    Every pass is :func:`mitoseg.inference.predict.iter_stack_probabilities` (the function behind
    ``mitoseg predict``) over the whole stack, flipped in y and/or x; its output is flipped
    back. The passes run slice by slice in lockstep.

    Args:
        model_or_fn: Keras model (run on the plan's engine) or batch-predict callable.
        stack: ``(Z, H, W)`` raw intensities.
        plan: the :class:`~mitoseg.inference.plan.InferencePlan` to run.
        flips: any of :data:`FLIPS`, each at most once.
        progress: a progress bar over the slices (of the plain pass).

    Yields:
        ``[plain, *flipped]``: ``(H, W, C)`` float32 probabilities.

    Raises:
        ValueError: an unknown or repeated flip.
    """
    from mitoseg.inference.predict import iter_stack_probabilities

    bad = [f for f in flips if f not in FLIPS]
    if bad or len(set(flips)) != len(flips):
        raise ValueError(f"flips must be distinct values of {list(FLIPS)}, got {list(flips)}")
    plain = iter_stack_probabilities(
        model_or_fn, stack, plan, progress=progress, description="suggest"
    )
    flipped = [
        iter_stack_probabilities(model_or_fn, np.flip(stack, _FLIP_AXES[f]), plan) for f in flips
    ]
    for probs, *others in zip(plain, *flipped, strict=True):
        back = [
            np.flip(p, tuple(a - 1 for a in _FLIP_AXES[f]))
            for f, p in zip(flips, others, strict=True)
        ]
        yield [probs, *back]


def suggest_stack(
    model_or_fn: Any,
    stack: np.ndarray,
    plan: Any,
    *,
    flips: Sequence[str] = ("h", "v"),
    tile_size: int = 256,
    weights: SuggestWeights | None = None,
    first_slice: int = 0,
    progress: bool = False,
) -> tuple[list[SliceScore], list[TileScore], SuggestWeights]:
    """Rank the slices and tiles of a stack by how unsure the model is.

    The plan runs with its TTA and z-averaging switched off (see the module docstring).

    Args:
        model_or_fn: Keras model or batch-predict callable.
        stack: ``(Z, H, W)`` (or ``(H, W)``) raw intensities.
        plan: the model's :class:`~mitoseg.inference.plan.InferencePlan`.
        flips: test-time flips besides the plain pass (:data:`FLIPS`; empty: none).
        tile_size: tile side of the tile ranking, pixels.
        weights: the score's weights.
        first_slice: index of ``stack[0]`` in the volume it was read from.
        progress: show a progress bar.

    Returns:
        :func:`score_passes`' ``(slices, tiles, weights)``.

    Raises:
        ValueError: bad stack, flips, tile size or weights.
    """
    arr = np.asarray(stack)
    arr = arr[None] if arr.ndim == 2 else arr
    arr = check_array(arr, "suggest: stack", ndim=3, nonempty=True)
    run_plan = plan.with_overrides(tta=False, z_average=0)
    _effective(weights or SuggestWeights(), len(flips) + 1, arr.shape[0])  # fail early
    passes = flip_passes(model_or_fn, arr, run_plan, flips, progress=progress)
    return score_passes(passes, arr.shape[0], tile_size, weights, first_slice=first_slice)


# ---------------------------------------------------------------------------- writers


def _write_csv(path: Path, rows: Sequence[BaseModel], columns: Sequence[str]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            data = row.model_dump()
            writer.writerow([data[c] for c in columns])


def _write_napari_shapes(path: Path, tiles: Sequence[TileScore]) -> None:
    """napari's Shapes CSV (``index, shape-type, vertex-index, axis-0..2``): one rectangle
    per tile on its slice, corners in (z, y, x) pixels (:func:`tile_corners`)."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "shape-type", "vertex-index", "axis-0", "axis-1", "axis-2"])
        for i, t in enumerate(tiles):
            for v, corner in enumerate(tile_corners(t).tolist()):
                writer.writerow([i, "rectangle", v, *corner])


def tile_corners(tile: TileScore) -> np.ndarray:
    """``(4, 3)`` int64 ``(z, y, x)`` pixel corners of a tile, clockwise from the top-left
    (a napari rectangle; the bottom/right edges lie on the pixel borders after the tile)."""
    bottom, right = tile.top + tile.height, tile.left + tile.width
    yx = [(tile.top, tile.left), (tile.top, right), (bottom, right), (bottom, tile.left)]
    return np.array([(tile.slice, y, x) for y, x in yx], dtype=np.int64)


def write_suggestions(
    out_dir: str | Path,
    slices: Sequence[SliceScore],
    tiles: Sequence[TileScore],
    *,
    source: str,
    model: str,
    shape: Sequence[int],
    tile_size: int,
    flips: Sequence[str],
    weights: SuggestWeights,
    top: int = 20,
    voxel_size_nm: Sequence[float] | None = None,
) -> dict[str, Path]:
    """Write the ranking (each file atomically).

    Files in ``out_dir``: ``suggestions.json`` (:class:`SuggestReport`, the ``top`` tiles),
    ``slices.csv`` (every slice), ``tiles.csv`` (every tile), ``tiles_napari.csv`` (the
    ``top`` tiles as a napari Shapes layer).

    Args:
        out_dir: output directory (created).
        slices: :func:`score_passes`' slices.
        tiles: :func:`score_passes`' tiles.
        source: the input, for the report.
        model: the model, for the report.
        shape: ``(Z, Y, X)`` of the input.
        tile_size: the tile side used.
        flips: the flips used.
        weights: the weights used.
        top: tiles in the JSON report and the napari layer (>= 1).
        voxel_size_nm: ``(z, y, x)`` nm of the input, for the report (None: unknown).

    Returns:
        ``{"json", "slices", "tiles", "napari"}`` -> path.

    Raises:
        ValueError: ``top < 1``.
    """
    if top < 1:
        raise ValueError(f"write_suggestions: top must be >= 1, got {top}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = SuggestReport(
        source=source,
        model=model,
        shape=tuple(int(s) for s in shape),  # type: ignore[arg-type]
        voxel_size_nm=None if voxel_size_nm is None else tuple(voxel_size_nm),  # type: ignore[arg-type]
        tile_size=tile_size,
        flips=list(flips),  # type: ignore[arg-type]
        weights=weights,
        slices=list(slices),
        tiles=list(tiles[:top]),
        n_tiles=len(tiles),
    )
    paths = {
        k: out / name
        for k, name in zip(("json", "slices", "tiles", "napari"), OUTPUT_FILES, strict=True)
    }
    write_json(paths["json"], report.model_dump(mode="json"))
    _write_csv(paths["slices"], slices, list(SliceScore.model_fields))
    _write_csv(paths["tiles"], tiles, list(TileScore.model_fields))
    _write_napari_shapes(paths["napari"], tiles[:top])
    return paths
