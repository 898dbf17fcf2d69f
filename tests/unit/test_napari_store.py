"""Painted napari labels into the label store, and the suggestions list: the Qt-free core
(:mod:`mitoseg.napari._labels`) here, the "Label store" dock widget headless in a viewer
(Xvfb; a fresh process, as in tests/unit/test_napari.py) with a checked screenshot.

``MITOSEG_SHOT_DEBUG=/tmp/shot.png`` also saves the checked screenshot there."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile

from mitoseg.io import write_stack
from mitoseg.labelstore import LabelStoreError, init_store, read_manifest, read_slice

napari = pytest.importorskip("napari", reason="napari is not installed (dev extra)")

from tests.unit.test_napari import (  # noqa: E402  (after the skip)
    CASE_ENV,
    CHILD_ENV,
    display,  # noqa: F401  (the module's display fixture: Xvfb when there is none)
    in_fresh_process,
    open_viewer,
)

SHAPE = (3, 64, 96)
VOXEL = (50.0, 4.6, 4.6)
IGNORE = 254


def _store(tmp: Path) -> Path:
    write_stack(tmp / "vol.tif", np.full(SHAPE, 60, np.uint8), VOXEL)
    init_store(tmp / "labels", str(tmp / "vol.tif"), {"background": 0, "mitochondria": 255}, 254)
    return tmp / "labels"


def _suggestions(tmp: Path) -> Path:
    """suggestions.json: slices ranked 1, 0, 2; tile 1 on slice 1 (rows 0..31, columns
    48..95), tile 2 on slice 0 (rows 32..63, columns 0..47)."""
    from mitoseg.suggest import SliceScore, SuggestWeights, TileScore, write_suggestions

    zero = {"entropy": 0.0, "flip": 0.0, "neighbour": 0.0}
    slices = [SliceScore(rank=r, slice=z, score=s, **zero)
              for r, (z, s) in enumerate([(1, 0.3), (0, 0.2), (2, 0.1)], 1)]  # fmt: skip
    tiles = [
        TileScore(rank=1, slice=1, score=0.5, row=0, col=1, top=0, left=48, height=32,
                  width=48, **zero),
        TileScore(rank=2, slice=0, score=0.4, row=1, col=0, top=32, left=0, height=32,
                  width=48, **zero),
    ]  # fmt: skip
    paths = write_suggestions(
        tmp / "suggest", slices, tiles, source=str(tmp / "vol.tif"), model="models:/mito/3",
        shape=SHAPE, tile_size=48, flips=[], weights=SuggestWeights(), voxel_size_nm=VOXEL,
    )  # fmt: skip
    return paths["json"]


# ---------------------------------------------------------------- the core (no Qt)


def test_painted_slices_map_to_raw_class_values(tmp_path: Path) -> None:
    from mitoseg.napari._labels import painted_masks, save_labels

    store = _store(tmp_path)
    from mitoseg.napari._labels import painting_array

    paint = painting_array(SHAPE)  # as the widget's layer: chunked, in memory
    assert paint.chunks == (1, 64, 96)
    paint[0, 1:3, 2:5] = 2  # mitochondria
    paint[0, 10, 10] = 1  # background
    paint[2, 5:7, 0:2] = 1
    masks = painted_masks(paint, read_manifest(store), "p")
    assert sorted(masks) == [0, 2]
    expected0 = np.full(SHAPE[1:], IGNORE, np.uint8)
    expected0[1:3, 2:5], expected0[10, 10] = 255, 0
    np.testing.assert_array_equal(masks[0], expected0)
    entries = save_labels(store, paint, "p", {"model": "models:/mito/3"}, split="test",
                          note="n", author="ana", slices=[2])  # fmt: skip
    assert [(e.z, e.split, e.labelled_pixels) for e in entries] == [(2, "test", 4)]
    p = entries[0].provenance
    assert (p.tool, p.model, p.note, p.author) == ("napari", "models:/mito/3", "n", "ana")
    expected2 = np.full(SHAPE[1:], IGNORE, np.uint8)
    expected2[5:7, 0:2] = 0
    np.testing.assert_array_equal(tifffile.imread(store / "z00002.tif"), expected2)


def test_prediction_becomes_a_painting_and_suggestions_a_list(tmp_path: Path) -> None:
    from mitoseg.napari._labels import Suggestion, labels_from_prediction, suggestion_items
    from mitoseg.napari._segment import endpoint_model

    pred = np.array([[0, 1], [2, 0]], np.uint8)
    np.testing.assert_array_equal(labels_from_prediction(pred), [[1, 2], [3, 1]])
    items = suggestion_items(_suggestions(tmp_path))
    assert items == [
        Suggestion("tile 1: slice 1, y 0, x 48 (0.500)", 1, (0, 48, 32, 48)),
        Suggestion("tile 2: slice 0, y 32, x 0 (0.400)", 0, (32, 0, 32, 48)),
        Suggestion("slice 1 (rank 1, 0.300)", 1),
        Suggestion("slice 0 (rank 2, 0.200)", 0),
        Suggestion("slice 2 (rank 3, 0.100)", 2),
    ]
    assert endpoint_model("http://h:1", {"name": "mito", "version": "4"}) == "models:/mito/4"
    assert endpoint_model("http://h:1", {"bento_model": "mitoseg:abc"}) == "mitoseg:abc"
    assert endpoint_model(" http://h:1 ", {}) == "http://h:1"


def _paint(shape: tuple[int, ...] = SHAPE, value: int = 1, dtype: Any = np.uint8) -> np.ndarray:
    a = np.zeros(shape, dtype)
    a[(0,) * len(shape)] = value
    return a


@pytest.mark.parametrize(
    ("data", "slices", "metadata", "message"),
    [
        (_paint(), None, {"class_names": ["bg", "mito"], "model": "m"},
         r"labels layer 'p' is a prediction: class indexes \(0 = background\), not a painting "
         r"\(0 = unpainted\); start a painting from it with New labels layer$"),
        (_paint(), None, {"source": "pred.tif"}, r"labels layer 'p' is opened from pred\.tif: "),
        (_paint((3, 64, 95)), None, {}, r"labels layer 'p': shape \(3, 64, 95\) differs from "
                                        r"the store's volume \(Z, Y, X\) = \(3, 64, 96\)$"),
        (_paint(value=3), None, {}, r"labels layer 'p': slice 0: value 3 is not a class of the "
                                r"store \(1 = background, 2 = mitochondria; 0 = unpainted\)$"),
        (_paint(dtype=np.float32), None, {}, r"labels layer 'p': dtype float32 is not an integer"),
        (_paint(), [1], {}, r"labels layer 'p': slice 1 has no painted pixel$"),
        (_paint(), [3], {}, r"labels layer 'p': slice 3 has no painted pixel$"),
        (np.zeros(SHAPE, np.uint8), None, {}, r"labels layer 'p': nothing is painted"),
    ],
    ids=["prediction", "reader-mask", "shape", "value", "float", "slice-unpainted",
         "slice-outside", "empty"],
)  # fmt: skip
def test_save_errors_name_the_layer(
    tmp_path: Path,
    data: np.ndarray,
    slices: list[int] | None,
    metadata: dict[str, Any],
    message: str,
) -> None:
    from mitoseg.napari._labels import save_labels

    store = _store(tmp_path)
    with pytest.raises(LabelStoreError, match=message):
        save_labels(store, data, "p", metadata, slices=slices)
    assert read_manifest(store).entries == []


# ---------------------------------------------------------------- the widget, headless


def _classify(rgb: np.ndarray) -> dict[str, np.ndarray]:
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    return {
        "magenta": (r - g > 90) & (b - g > 90),
        "blue": (b - r > 90) & (b - g > 60) & (r < 80),
        "yellow": (r > 180) & (g > 180) & (b < 100),
    }


def test_widget_lists_suggestions_saves_paint_and_screenshot(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if not os.environ.get(CHILD_ENV):
        _store(tmp_path)
        _suggestions(tmp_path)
        in_fresh_process(request, tmp_path)
        return
    from qtpy.QtCore import Qt

    case = Path(os.environ[CASE_ENV])
    store, sugg = case / "labels", case / "suggest" / "suggestions.json"
    viewer = open_viewer(request)
    qtbot = request.getfixturevalue("qtbot")
    nm = ("nm",) * 3
    viewer.add_image(np.full(SHAPE, 60, np.uint8), name="vol", scale=VOXEL, units=nm,
                     contrast_limits=(0, 255))  # fmt: skip
    pred = np.zeros(SHAPE, np.uint8)
    pred[1, 40:56, 8:40] = 1
    viewer.add_labels(pred, name="vol mask", scale=VOXEL, units=nm, visible=False,
                      metadata={"class_names": ["background", "mitochondria"],
                                "model": "models:/mito/3"})  # fmt: skip
    _, widget = viewer.window.add_plugin_dock_widget("mitoseg", "Label store")
    assert widget.new_labels_layer() is None  # errors are shown in the widget
    assert widget.status.text() == "error: give the label store directory first"
    widget.suggestions_edit.setText(str(case / "nothing.json"))
    assert widget.load_suggestions() == []
    assert widget.status.text().startswith(f"error: {case / 'nothing.json'}: not a mitoseg")
    widget.store_edit.setText(str(store))
    widget.suggestions_edit.setText(str(sugg))

    # (a) the suggestions: listed; a click jumps to the slice
    widget.load_suggestions()
    texts = [widget.suggestion_list.item(i).text() for i in range(widget.suggestion_list.count())]
    assert texts[0] == "tile 1: slice 1, y 0, x 48 (0.500)" and len(texts) == 5
    assert "suggestions (vol.tif)" in viewer.layers
    for row, z in ((3, 0), (0, 1)):
        lst = widget.suggestion_list
        rect = lst.visualItemRect(lst.item(row))
        qtbot.mouseClick(lst.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
        assert viewer.dims.current_step[0] == z, texts[row]
    tile_centre = ((0 + 32 / 2) * VOXEL[1], (48 + 48 / 2) * VOXEL[2])
    assert tuple(viewer.camera.center[-2:]) == pytest.approx(tile_centre)  # tile 1 centred

    # (b) paint, starting from the prediction's current slice (1), and save
    widget.start_from.setCurrentText("vol mask")
    layer = widget.new_labels_layer()
    assert layer.name == "labels labels" and layer.metadata["model"] == "models:/mito/3"
    assert type(layer.data).__module__.startswith("zarr")  # not a volume-sized numpy array
    assert viewer.layers[-1].name == "suggestions (vol.tif)"  # rectangles stay on top
    np.testing.assert_array_equal(layer.data[1], pred[1] + 1)
    data = layer.data
    data[1, 32:, :] = 0  # only the top half was checked
    data[1, 8:24, 8:40] = 2  # a mitochondrion the model missed
    data[2, 60:64, 90:96] = 2
    layer.data = data
    widget.split.setCurrentText("train")
    widget.note.setText("suggest rank 1")
    widget.author.setText("ana")
    viewer.layers.selection.active = viewer.layers["vol mask"]
    assert widget.save() == [] and "'vol mask' is a prediction" in widget.status.text()
    viewer.layers.selection.active = layer
    entries = widget.save()
    assert widget.status.text() == f"saved slices 1, 2 (train) to {store}"
    assert [(e.z, e.split) for e in entries] == [(1, "train"), (2, "train")]
    expected1 = np.full(SHAPE[1:], IGNORE, np.uint8)
    expected1[:32], expected1[8:24, 8:40] = 0, 255
    expected2 = np.full(SHAPE[1:], IGNORE, np.uint8)
    expected2[60:64, 90:96] = 255
    np.testing.assert_array_equal(tifffile.imread(store / "z00001.tif"), expected1)
    np.testing.assert_array_equal(read_slice(store, 2), expected2)
    manifest = read_manifest(store)
    e1 = manifest.entries[0]
    assert (e1.labelled_pixels, e1.class_pixels) == (32 * 96, {"background": 32 * 96 - 512,
                                                               "mitochondria": 512})  # fmt: skip
    assert e1.bbox.model_dump() == {"y0": 0, "y1": 32, "x0": 0, "x1": 96}
    p = e1.provenance
    assert (p.tool, p.author, p.model, p.note, p.mode) == (
        "napari", "ana", "models:/mito/3", "suggest rank 1", "new",
    )  # fmt: skip

    # the checked screenshot of slice 1: paint colours and the tile rectangle in place
    viewer.dims.set_current_step(0, 1)
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=True, flash=False)[..., :3]
    colour = _classify(shot)
    rgb = shot.astype(int)
    grey = (np.ptp(rgb, axis=-1) < 10) & (rgb[..., 0] > 40) & (rgb[..., 0] < 80)
    rows, cols = np.nonzero(grey | colour["blue"] | colour["magenta"])  # the image
    top, left = rows.min(), cols.min()
    sy, sx = (rows.max() + 1 - top) / SHAPE[1], (cols.max() + 1 - left) / SHAPE[2]
    assert sx == pytest.approx(sy, rel=0.05)  # y and x pixels are both 4.6 nm

    def region(y0: float, y1: float, x0: float, x1: float) -> tuple[slice, slice]:
        return (slice(int(top + y0 * sy), int(top + y1 * sy)),
                slice(int(left + x0 * sx), int(left + x1 * sx)))  # fmt: skip

    if os.environ.get("MITOSEG_SHOT_DEBUG"):
        from PIL import Image

        Image.fromarray(shot).save(os.environ["MITOSEG_SHOT_DEBUG"])
    assert colour["magenta"][region(10, 22, 10, 38)].mean() > 0.95  # painted mitochondrion
    assert colour["blue"][region(26, 30, 10, 38)].mean() > 0.95  # painted background
    unpainted = region(40, 60, 10, 38)  # erased, and the prediction layer is hidden
    assert (colour["magenta"] | colour["blue"])[unpainted].mean() < 0.01
    edge = region(4, 28, 48.5 - 1.5, 48.5 + 1.5)  # tile 1's left edge, x = 48 (+0.5 px)
    assert colour["yellow"][edge].any(axis=1).mean() > 0.9
    assert colour["yellow"][region(36, 62, 2, 44)].mean() < 0.001  # tile 2 is on slice 0
    grab = widget.grab()
    assert not grab.isNull() and grab.width() > 100
