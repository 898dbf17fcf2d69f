"""The "Label store" dock widget: suggestions to jump to, painting, saving to the store.

Imported by napari when the widget is opened (npe2 command ``mitoseg.label_store_widget``),
never by ``mitoseg`` itself (it imports Qt). The work is done by the Qt-free
:mod:`mitoseg.napari._labels`:

* **Suggestions**: ``suggestions.json`` of ``mitoseg suggest`` is opened as its Shapes
  layer (the top tiles as rectangles, :func:`mitoseg.napari._suggestions.read_suggestions`)
  and listed (top tiles, then every slice by rank); clicking a line moves the viewer to
  that slice (and centres a tile).
* **Paint**: "New labels layer" adds an empty uint8 Labels layer on the store's volume
  grid (``<store> labels``, an in-memory Zarr array: only painted chunks take memory;
  0 = unpainted, 1 = the first class, 2 = the second, ...), or
  starts it from the current slice of a prediction layer (the Segment widget's mask; the
  model that made it goes to the layer's ``metadata["model"]``).
* **Save labels to store**: every slice of the selected Labels layer (or the painting
  layer) with a painted pixel goes into the store (merge), with the split, note, author
  and model as provenance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from napari.layers import Image, Labels
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from mitoseg.napari._labels import (
    Suggestion,
    label_colormap,
    labels_from_prediction,
    painting_array,
    save_labels,
    suggestion_items,
)

__all__ = ["LabelStoreWidget"]

#: Suffix of the painting layer's name.
PAINT_SUFFIX = " labels"


class LabelStoreWidget(QWidget):
    """Dock widget: suggestions list, a painting layer and "Save labels to store".

    Args:
        napari_viewer: the viewer (napari passes it).
    """

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.store_edit = QLineEdit()
        self.store_edit.setPlaceholderText("label store directory (mitoseg labels init)")
        self.suggestions_edit = QLineEdit()
        self.suggestions_edit.setPlaceholderText("suggestions.json of mitoseg suggest")
        load = QPushButton("Load suggestions")
        load.clicked.connect(self.load_suggestions)
        self.suggestion_list = QListWidget()
        self.suggestion_list.itemClicked.connect(self._jump)
        new_layer = QPushButton("New labels layer")
        new_layer.clicked.connect(lambda: self.new_labels_layer())
        self.start_from = QComboBox()
        self.split = QComboBox()
        self.split.addItems(["train", "test"])
        self.note = QLineEdit()
        self.note.setPlaceholderText("e.g. suggest rank 3")
        self.author = QLineEdit()
        self.author.setPlaceholderText("default: $MITOSEG_AUTHOR / $USER")
        self.allow_test = QCheckBox("allow changing test slices")
        save = QPushButton("Save labels to store")
        save.clicked.connect(lambda: self.save())
        self.status = QLabel("")
        self.status.setWordWrap(True)

        form = QFormLayout()
        form.addRow("store", self.store_edit)
        form.addRow("suggestions", self.suggestions_edit)
        form.addRow("start from", self.start_from)
        form.addRow("split", self.split)
        form.addRow("note", self.note)
        form.addRow("author", self.author)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(load)
        layout.addWidget(self.suggestion_list)
        layout.addWidget(new_layer)
        layout.addWidget(self.allow_test)
        layout.addWidget(save)
        layout.addWidget(self.status)
        self._items: list[Suggestion] = []
        self._shapes_name: str | None = None
        self.viewer.layers.events.inserted.connect(self._refresh_sources)
        self.viewer.layers.events.removed.connect(self._refresh_sources)
        self._refresh_sources()

    # ------------------------------------------------------------------ helpers

    def _say(self, text: str) -> None:
        self.status.setText(text)

    def _store(self) -> Path:
        text = self.store_edit.text().strip()
        if not text:
            raise ValueError("give the label store directory first")
        return Path(text)

    def _refresh_sources(self, *_: Any) -> None:
        current = self.start_from.currentText()
        names = [
            layer.name
            for layer in self.viewer.layers
            if isinstance(layer, Labels) and "class_names" in layer.metadata
        ]
        self.start_from.clear()
        self.start_from.addItems(["empty", *names])
        if current in names:
            self.start_from.setCurrentText(current)

    def _suggestions_on_top(self) -> None:
        """Keep the suggestion rectangles above a painting layer added after them."""
        layers = self.viewer.layers
        if self._shapes_name in layers:
            layers.move(layers.index(self._shapes_name), len(layers))

    def _current_z(self) -> int:
        return int(self.viewer.dims.current_step[0])

    # ------------------------------------------------------------------ actions

    def load_suggestions(self) -> list[Suggestion]:
        """Open the suggestions file as its Shapes layer and list its tiles and slices."""
        from mitoseg.napari._suggestions import read_suggestions

        path = self.suggestions_edit.text().strip()
        try:
            items = suggestion_items(path)
            ((data, kwargs, _),) = read_suggestions(path)
        except ValueError as exc:  # DataError included
            self._say(f"error: {exc}")
            return []
        if kwargs["name"] in self.viewer.layers:
            self.viewer.layers.remove(kwargs["name"])
        self.viewer.add_shapes(data, **kwargs)
        self._shapes_name = kwargs["name"]
        self._items = items
        self.suggestion_list.clear()
        for item in items:
            self.suggestion_list.addItem(QListWidgetItem(item.text))
        self._say(f"{len(items)} suggestions from {path}")
        return items

    def _jump(self, item: QListWidgetItem) -> None:
        self.jump_to(self.suggestion_list.row(item))

    def jump_to(self, row: int) -> None:
        """Move the viewer to the slice (and tile centre) of suggestion ``row``."""
        target = self._items[row]
        self.viewer.dims.set_current_step(0, target.z)
        if target.box is not None:
            top, left, height, width = target.box
            scale = self._yx_scale()
            self.viewer.camera.center = (
                (top + height / 2) * scale[0],
                (left + width / 2) * scale[1],
            )
        self._say(f"slice {target.z}: {target.text}")

    def _yx_scale(self) -> tuple[float, float]:
        for layer in self.viewer.layers:
            if isinstance(layer, Image):
                return float(layer.scale[-2]), float(layer.scale[-1])
        return 1.0, 1.0

    def new_labels_layer(self) -> Any:
        """Add the painting layer on the store's volume grid (empty, or the current slice
        of the prediction chosen in "start from"); returns it."""
        from mitoseg.labelstore import read_manifest

        try:
            manifest = read_manifest(self._store())
        except ValueError as exc:
            self._say(f"error: {exc}")
            return None
        shape = manifest.volume.shape
        data = painting_array(shape)
        metadata: dict[str, Any] = {"mitoseg_store": str(self._store()), "model": None}
        source = self.start_from.currentText()
        if source and source != "empty":
            pred = self.viewer.layers[source]
            z = self._current_z()
            pred_shape = tuple(int(n) for n in pred.data.shape)
            if pred_shape != shape:
                self._say(
                    f"error: prediction layer {source!r} has shape {pred_shape}, the "
                    f"store's volume {shape}"
                )
                return None
            data[z] = labels_from_prediction(np.asarray(pred.data[z]))
            metadata["model"] = pred.metadata.get("model")
        vs = manifest.volume.voxel_size_nm
        name = f"{self._store().name}{PAINT_SUFFIX}"
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        extra = {"scale": tuple(vs), "units": ("nm",) * 3} if vs is not None else {}
        layer = self.viewer.add_labels(
            data,
            name=name,
            opacity=0.7,
            colormap=label_colormap(len(manifest.classes)),
            metadata=metadata,
            **extra,
        )
        self._suggestions_on_top()
        names = ", ".join(f"{k + 1} = {n}" for k, n in enumerate(manifest.classes))
        self._say(f"paint in {name!r}: {names} (0 = unlabelled)")
        return layer

    def _labels_layer(self) -> Any:
        active = self.viewer.layers.selection.active
        # isinstance, not type(): napari hands plugins proxies of its objects
        if active is not None and isinstance(active, Labels):
            return active
        for layer in self.viewer.layers:
            if "mitoseg_store" in layer.metadata:
                return layer
        raise ValueError("select the Labels layer to save (or make one: New labels layer)")

    def save(self) -> list[Any]:
        """Save every painted slice of the Labels layer into the store; returns the new
        entries (an error is shown in the widget and nothing more is saved)."""
        try:
            layer = self._labels_layer()
            entries = save_labels(
                self._store(), layer.data, layer.name, dict(layer.metadata),
                split=self.split.currentText(), note=self.note.text().strip() or None,
                author=self.author.text().strip() or None,
                allow_test_change=self.allow_test.isChecked(),
            )  # fmt: skip
        except ValueError as exc:  # LabelStoreError / DataError included
            self._say(f"error: {exc}")
            return []
        zs = ", ".join(str(e.z) for e in entries)
        self._say(f"saved slices {zs} ({entries[0].split}) to {self._store()}")
        return entries
