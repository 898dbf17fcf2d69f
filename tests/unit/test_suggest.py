"""``mitoseg suggest``: the uncertainty maps and ranking on hand-computed probabilities,
the model passes with predictors whose answer is known by construction, the writers
(napari reads the Shapes CSV back) and the command line with a tiny Keras model."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mitoseg.cli import app
from mitoseg.inference.plan import InferencePlan
from mitoseg.io import write_stack
from mitoseg.suggest import (
    SuggestReport,
    SuggestWeights,
    disagreement_map,
    entropy_map,
    flip_disagreement_map,
    score_passes,
    suggest_stack,
    tile_means,
    write_suggestions,
)

runner = CliRunner()


def _h(p: float) -> float:
    """Binary entropy in bits."""
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def _const(value: float, shape=(2, 2), channels: int = 1) -> np.ndarray:
    return np.full((*shape, channels), value, np.float32)


# ---------------------------------------------------------------------------- pixel maps


def test_entropy_map_binary_and_multiclass() -> None:
    p = np.array([0.0, 0.5, 1.0, 0.25], np.float32).reshape(2, 2, 1)
    assert entropy_map(p).ravel() == pytest.approx([0.0, 1.0, 0.0, _h(0.25)], abs=1e-6)
    m = np.array([[[1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0]]], np.float32)
    # uniform over 3 classes: log 3 / log 3 = 1; one-hot: 0; (0.5, 0.5, 0): log 2 / log 3
    half = np.array([[[0.5, 0.5, 0.0]]], np.float32)
    assert entropy_map(m).ravel() == pytest.approx([1.0, 0.0], abs=1e-6)
    assert entropy_map(half).ravel() == pytest.approx([math.log(2) / math.log(3)], abs=1e-6)


def test_disagreement_maps() -> None:
    assert disagreement_map(_const(0.2), _const(0.7)) == pytest.approx(np.full((2, 2), 0.5))
    a = np.array([[[0.5, 0.5, 0.0]]], np.float32)
    b = np.array([[[0.0, 0.5, 0.5]]], np.float32)
    assert disagreement_map(a, b).ravel() == pytest.approx([0.5])  # (0.5 + 0 + 0.5) / 2
    # passes 0.2 and 0.6: mean 0.4, each 0.2 away
    assert flip_disagreement_map([_const(0.2), _const(0.6)]) == pytest.approx(np.full((2, 2), 0.2))
    assert flip_disagreement_map([_const(0.3)]) == pytest.approx(np.zeros((2, 2)))


def test_tile_means_cut_the_last_tiles_at_the_border() -> None:
    v = np.arange(25, dtype=np.float64).reshape(5, 5)
    t = tile_means(v, 2)
    assert t.shape == (3, 3)
    # (0, 0): 0, 1, 5, 6; (0, 2): 4, 9; (2, 2): 24; (2, 0): 20, 21
    assert (t[0, 0], t[0, 2], t[2, 2], t[2, 0]) == (3.0, 6.5, 24.0, 20.5)
    assert tile_means(v, 8).tolist() == [[12.0]]


# ---------------------------------------------------------------------------- ranking


def test_score_passes_ranks_slices_by_entropy_and_neighbour_disagreement() -> None:
    # constant slices 0.5, 0.1, 0.9, one pass each (no flip term):
    # entropy 1, H(0.1), H(0.9); neighbours |0.5-0.1| = 0.4, (0.4 + 0.8) / 2 = 0.6, 0.8
    passes = [[_const(v)] for v in (0.5, 0.1, 0.9)]
    slices, tiles, used = score_passes(passes, 3, tile_size=2)
    assert used == SuggestWeights(entropy=1.0, flip=0.0, neighbour=1.0)
    expected = {0: (1.0 + 0.4) / 2, 1: (_h(0.1) + 0.6) / 2, 2: (_h(0.9) + 0.8) / 2}
    assert [s.slice for s in slices] == [0, 2, 1]
    assert [s.rank for s in slices] == [1, 2, 3]
    for s in slices:
        assert s.score == pytest.approx(expected[s.slice], abs=1e-6)
        assert s.flip == 0.0
    assert [s.neighbour for s in sorted(slices, key=lambda s: s.slice)] == pytest.approx(
        [0.4, 0.6, 0.8]
    )
    assert len(tiles) == 3 and [t.slice for t in tiles] == [0, 2, 1]  # one 2 x 2 tile each


def test_score_passes_tiles_weights_and_first_slice() -> None:
    # one 2 x 4 slice: left tile p = 0.5 (entropy 1), right tile p = 0 (entropy 0); two
    # passes agree on the left, disagree by 0.2 / 2 on the right
    plain = np.zeros((2, 4, 1), np.float32)
    plain[:, :2] = 0.5
    other = plain.copy()
    other[:, 2:] = 0.2
    slices, tiles, used = score_passes(
        [[plain, other]], 1, tile_size=2, weights=SuggestWeights(entropy=3, flip=1), first_slice=7
    )
    assert used.neighbour == 0.0 and (used.entropy, used.flip) == (3.0, 1.0)
    assert [(t.slice, t.row, t.col, t.top, t.left, t.height, t.width) for t in tiles] == [
        (7, 0, 0, 0, 0, 2, 2),
        (7, 0, 1, 0, 2, 2, 2),
    ]
    # right tile: mean 0.1 -> entropy H(0.1), flip 0.1; score (3 H(0.1) + 0.1) / 4
    assert tiles[0].score == pytest.approx(0.75, abs=1e-6)  # (3 * 1 + 0) / 4
    assert tiles[1].entropy == pytest.approx(_h(0.1), abs=1e-6)
    assert tiles[1].flip == pytest.approx(0.1, abs=1e-6)
    assert tiles[1].score == pytest.approx((3 * _h(0.1) + 0.1) / 4, abs=1e-6)
    assert slices[0].slice == 7
    assert slices[0].score == pytest.approx((tiles[0].score + tiles[1].score) / 2, abs=1e-6)


@pytest.mark.parametrize(
    ("passes", "depth", "kwargs", "message"),
    [
        ([[_const(0.5)]], 0, {}, r"score_passes: depth must be >= 1, got 0"),
        ([[_const(0.5)]], 1, {"tile_size": 0}, r"score_passes: tile_size must be >= 1, got 0"),
        ([[_const(0.5)]], 1, {"first_slice": -1}, r"score_passes: first_slice must be >= 0"),
        (
            [[_const(0.5)]],
            1,
            {"weights": SuggestWeights(entropy=0.0)},
            r"suggest: every weight of a measurable term is 0",
        ),
        ([[_const(0.5)]], 2, {}, r"score_passes: got 1 slices, expected depth=2"),
        ([[_const(0.5)], [_const(0.5)]], 1, {}, r"more than depth=1 slices were given"),
        (
            [[_const(0.5)], [_const(0.5), _const(0.5)]],
            2,
            {},
            r"score_passes: slice 1 has 2 passes of shapes \[\(2, 2, 1\)\]; expected 1 of "
            r"shape \(2, 2, 1\)",
        ),
        (
            [[np.zeros((2, 2, 1), np.uint8)]],
            1,
            {},
            r"score_passes: slice 0: expected float probabilities, got uint8",
        ),
    ],
)
def test_score_passes_errors(passes, depth: int, kwargs: dict, message: str) -> None:
    args = {"tile_size": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        score_passes(passes, depth, **args)


# ---------------------------------------------------------------------------- model passes


def _plan(**fields) -> InferencePlan:
    base = {
        "n_classes": 2,
        "class_names": ["background", "mito"],
        "tile_size": 16,
        "halo": 0,
        "border": 0,
        "batch_size": 4,
        "threshold": 0.5,
        "tta": True,  # switched off by suggest_stack
        "z_average": 1,  # switched off by suggest_stack
    }
    return InferencePlan.model_validate({**base, **fields})


def _column_ramp(batch: np.ndarray) -> np.ndarray:
    """Whatever the input: the tile's column position, 0 .. 1 (not flip-equivariant)."""
    b, h, w = batch.shape[:3]
    ramp = np.arange(w, dtype=np.float32) / (w - 1)
    return np.broadcast_to(ramp[None, None, :, None], (b, h, w, 1)).copy()


def _noise(z: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (z, 16, 16), dtype=np.uint8)


def test_suggest_stack_measures_flip_disagreement_of_a_known_predictor() -> None:
    # 16 x 16 slices, one 16-pixel tile without padding: the plain pass is r = col / 15,
    # the h-flipped pass 1 - r; their mean 0.5 (entropy 1) and each |r - 0.5| away:
    # mean over columns sum_c |2c - 15| / (30 * 16) = 2 * 64 / 480
    flip = 128 / 480
    slices, tiles, used = suggest_stack(_column_ramp, _noise(2), _plan(), flips=["h"], tile_size=8)
    assert used == SuggestWeights()
    for s in slices:
        assert (s.entropy, s.flip, s.neighbour) == pytest.approx((1.0, flip, 0.0), abs=1e-5)
        assert s.score == pytest.approx((1.0 + flip) / 3, abs=1e-5)
    assert len(tiles) == 2 * 4
    # left and right tiles (columns 0-7, 8-15) disagree equally: sum_{c<8} |2c - 15| = 64
    assert {round(t.flip, 5) for t in tiles} == {round(64 / (30 * 8), 5)}
    # a vertical flip leaves a column ramp unchanged: no disagreement, entropy H(r)
    v_slices, _, _ = suggest_stack(_column_ramp, _noise(2), _plan(), flips=["v"], tile_size=8)
    mean_h = np.mean([_h(c / 15) if 0 < c < 15 else 0.0 for c in range(16)])
    assert v_slices[0].flip == pytest.approx(0.0, abs=1e-6)
    assert v_slices[0].entropy == pytest.approx(mean_h, abs=1e-5)


def test_suggest_stack_ranks_the_slice_that_differs_from_its_neighbours() -> None:
    # pixelwise identity predictor: probabilities = normalised intensity, which is v / 255
    # for slices holding 0 and 255 (and 128) in large shares. Slices 0, 1, 3: the same
    # checkerboard of 0/255 (entropy 0); slice 2 inverts it (neighbour disagreement 1 with
    # slices 1 and 3): it ranks first, then its neighbours 1 and 3 (1/2 each), then 0.
    board = (np.indices((16, 16)).sum(axis=0) % 2 * 255).astype(np.uint8)
    stack = np.stack([board, board, 255 - board, board])
    slices, _, _ = suggest_stack(
        lambda b: b.copy(), stack, _plan(), flips=["h", "v", "hv"], tile_size=16
    )
    assert [s.slice for s in slices][:1] == [2] and {s.slice for s in slices[1:3]} == {1, 3}
    by = {s.slice: s for s in slices}
    assert (by[2].neighbour, by[1].neighbour, by[0].neighbour) == pytest.approx(
        (1.0, 0.5, 0.0), abs=1e-6
    )
    assert all(s.entropy == pytest.approx(0.0, abs=1e-6) for s in slices)
    assert all(s.flip == pytest.approx(0.0, abs=1e-6) for s in slices)  # equivariant
    assert by[2].score == pytest.approx(1 / 3, abs=1e-6)


@pytest.mark.parametrize(
    ("flips", "message"),
    [
        (["x"], r"flips must be distinct values of \['h', 'v', 'hv'\], got \['x'\]"),
        (["h", "h"], r"flips must be distinct values of \['h', 'v', 'hv'\], got \['h', 'h'\]"),
    ],
)
def test_suggest_stack_flip_errors(flips: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        suggest_stack(_column_ramp, _noise(1), _plan(), flips=flips)


# ---------------------------------------------------------------------------- writers


def test_write_suggestions_files_and_napari_shapes(tmp_path: Path) -> None:
    from napari_builtins.io import csv_to_layer_data

    passes = [[_const(v, shape=(4, 6))] for v in (0.5, 0.1)]
    slices, tiles, used = score_passes(passes, 2, tile_size=4, first_slice=3)
    paths = write_suggestions(
        tmp_path / "s", slices, tiles, source="in.tif", model="m.keras", shape=(2, 4, 6),
        tile_size=4, flips=[], weights=used, top=3,
    )  # fmt: skip
    report = SuggestReport.model_validate(json.loads(paths["json"].read_text()))
    assert report.n_tiles == 4 and len(report.tiles) == 3 and report.shape == (2, 4, 6)
    assert [s.slice for s in report.slices] == [3, 4]
    with paths["slices"].open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["slice"]) for r in rows] == [3, 4] and rows[0]["rank"] == "1"
    with paths["tiles"].open() as f:
        assert len(list(csv.DictReader(f))) == 4
    data, meta, kind = csv_to_layer_data(str(paths["napari"]), require_type="shapes")
    assert kind == "shapes" and len(data) == 3 and meta["shape_type"] == ["rectangle"] * 3
    # the best tile: slice 3, rows 0-3, columns 0-3 -> corners (3, 0, 0) .. (3, 4, 4)
    np.testing.assert_array_equal(data[0], [[3, 0, 0], [3, 0, 4], [3, 4, 4], [3, 4, 0]])
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == sorted(
        ["suggestions.json", "slices.csv", "tiles.csv", "tiles_napari.csv"]
    )
    with pytest.raises(ValueError, match="write_suggestions: top must be >= 1, got 0"):
        write_suggestions(
            tmp_path / "t", slices, tiles, source="", model="", shape=(2, 4, 6), tile_size=4,
            flips=[], weights=used, top=0,
        )  # fmt: skip


# ---------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``sigmoid(8 x - 4)`` as a 1 x 1 convolution, with a plan of 32-pixel tiles."""
    from tiny_models import save_sigmoid_model

    return save_sigmoid_model(tmp_path_factory.mktemp("model"))


def _stack() -> np.ndarray:
    """4 slices 40 x 48: sharp 10/200 halves, except slice 2, a smooth ramp (unsure)."""
    stack = np.full((4, 40, 48), 10, np.uint8)
    stack[:, :, 24:] = 200
    stack[2] = np.tile(np.linspace(10, 200, 48).astype(np.uint8), (40, 1))
    return stack


def test_cli_suggest_tiff(model: Path, tmp_path: Path) -> None:
    write_stack(tmp_path / "stack.tif", _stack(), (50.0, 5.0, 5.0))
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        ["--no-progress", "suggest", str(tmp_path / "stack.tif"), "--model", str(model),
         "--out", str(out), "--tile", "16", "--top", "5", "--flips", "h"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "most unsure slices 2 (" in result.output
    report = SuggestReport.model_validate(json.loads((out / "suggestions.json").read_text()))
    assert report.slices[0].slice == 2 and report.shape == (4, 40, 48)
    assert report.voxel_size_nm == (50.0, 5.0, 5.0)
    assert report.flips == ["h"] and len(report.tiles) == 5 and report.n_tiles == 4 * 3 * 3
    assert report.tiles[0].slice == 2
    # --z-range: slices 1..2 keep their numbers
    part = tmp_path / "part"
    result = runner.invoke(
        app,
        ["--no-progress", "suggest", str(tmp_path / "stack.tif"), "--model", str(model),
         "--out", str(part), "--z-range", "1:3", "--flips", "none"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = SuggestReport.model_validate(json.loads((part / "suggestions.json").read_text()))
    assert [s.slice for s in report.slices] == [2, 1] and report.flips == []
    assert report.weights.flip == 0.0


def test_cli_suggest_ome_zarr(model: Path, tmp_path: Path) -> None:
    from volumes import write_ome_zarr

    uri = write_ome_zarr(tmp_path / "v.zarr", _stack(), (50.0, 5.0, 5.0), chunks=(2, 20, 24))
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        ["--no-progress", "suggest", uri, "--model", str(model), "--out", str(out),
         "--tile", "24", "--z-range", "2:4"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = SuggestReport.model_validate(json.loads((out / "suggestions.json").read_text()))
    assert report.slices[0].slice == 2 and report.shape == (2, 40, 48)
    assert report.voxel_size_nm == (50.0, 5.0, 5.0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--flips", "x"], "error: --flips must be 'none' or distinct values of h, v, hv; got 'x'"),
        (["--z-range", "3:9"], "error: --z-range must be START:STOP with 0 <= START < STOP <= 4"),
        (["--z-range", "2"], "error: --z-range must be START:STOP"),
    ],
)
def test_cli_suggest_errors(model: Path, tmp_path: Path, args: list[str], message: str) -> None:
    write_stack(tmp_path / "stack.tif", _stack())
    result = runner.invoke(
        app,
        ["--no-progress", "suggest", str(tmp_path / "stack.tif"), "--model", str(model),
         "--out", str(tmp_path / "o"), *args],
    )  # fmt: skip
    assert result.exit_code == 1 and message in result.output


def test_cli_suggest_missing_input(model: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["--no-progress", "suggest", str(tmp_path / "nope.tif"), "--model", str(model),
         "--out", str(tmp_path / "o")],
    )  # fmt: skip
    assert result.exit_code == 1 and f"error: input not found: {tmp_path / 'nope.tif'}" in (
        result.output
    )


def test_napari_reader_opens_suggestions_as_a_shapes_layer(tmp_path: Path) -> None:
    from napari.layers import Shapes

    from mitoseg.io import DataError
    from mitoseg.napari._reader import get_reader

    passes = [[_const(v, shape=(4, 6))] for v in (0.5, 0.1)]
    slices, tiles, used = score_passes(passes, 2, tile_size=4)
    paths = write_suggestions(
        tmp_path / "s", slices, tiles, source="/data/in.tif", model="m.keras",
        shape=(2, 4, 6), tile_size=4, flips=[], weights=used, top=3,
        voxel_size_nm=(50.0, 4.6, 4.6),
    )  # fmt: skip
    reader = get_reader(str(paths["json"]))
    assert reader is not None
    ((data, kwargs, kind),) = reader(str(paths["json"]))
    assert kind == "shapes" and len(data) == 3
    np.testing.assert_array_equal(data[0], [[0, 0, 0], [0, 0, 4], [0, 4, 4], [0, 4, 0]])
    assert kwargs["scale"] == (50.0, 4.6, 4.6) and kwargs["units"] == ("nm", "nm", "nm")
    assert [s["slice"] for s in kwargs["metadata"]["slices"]] == [0, 1]
    layer = Shapes(data, **kwargs)  # napari accepts the layer as it is (no viewer needed)
    assert layer.nshapes == 3 and list(layer.features["rank"]) == [1, 2, 3]
    assert layer.name == "suggestions (in.tif)"
    assert get_reader(str(tmp_path / "other.json")) is None
    bad = tmp_path / "b" / "suggestions.json"
    bad.parent.mkdir()
    bad.write_text("{}")
    with pytest.raises(DataError, match=r"suggestions\.json: not a mitoseg suggestions report"):
        get_reader(str(bad))(str(bad))


@pytest.mark.parametrize("progress", [True, False])
def test_cli_suggest_progress_bar_follows_no_progress(
    model: Path, tmp_path: Path, progress: bool
) -> None:
    write_stack(tmp_path / "stack.tif", _stack())
    flag = [] if progress else ["--no-progress"]
    result = runner.invoke(
        app,
        [*flag, "suggest", str(tmp_path / "stack.tif"), "--model", str(model),
         "--out", str(tmp_path / "o"), "--flips", "none"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert ("suggest" in result.output and "4/4" in result.output) is progress
