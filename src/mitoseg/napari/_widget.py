"""The napari widget (magicgui): segment the selected image layer.

Imported by napari when the widget is opened (npe2 command ``mitoseg.segment_widget``),
never by ``mitoseg`` itself; the work is done by :mod:`mitoseg.napari._segment`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from magicgui import magic_factory

from mitoseg.napari._segment import as_stack, mask_layers, segment_in_worker, segment_remote

if TYPE_CHECKING:
    import napari

__all__ = ["segment_widget"]


@magic_factory(
    call_button="Segment",
    model={"label": "model URI", "tooltip": ".keras path or models:/mitoseg-unet@champion"},
    endpoint={"label": "or endpoint URL", "tooltip": "e.g. http://127.0.0.1:3000"},
    token={"label": "endpoint token", "widget_type": "Password"},
)
def segment_widget(
    image: napari.layers.Image,
    model: str = "models:/mitoseg-unet@champion",
    endpoint: str = "",
    token: str = "",
) -> list[napari.types.LayerDataTuple]:
    """Segment ``image`` with a local model (``model``) or, when ``endpoint`` is set, a
    running mitoseg service; returns the mask and instance layers (replaced when they
    exist already)."""
    if image is None:
        raise ValueError("select an image layer to segment")
    stack = as_stack(image.data if not image.multiscale else image.data[0], rgb=image.rgb)
    if endpoint.strip():
        classes, meta = segment_remote(stack, endpoint, token or None)
        names, min_size = meta["class_names"], int(meta["plan"]["min_object_size"])
    else:
        classes, names, min_size = segment_in_worker(stack, model)
    ndim = 2 if image.rgb else image.ndim
    scale = tuple(image.scale)[-ndim:] if ndim == 3 else tuple(image.scale)[-2:]
    return mask_layers(classes, names, min_size, scale, image.name, squeeze=ndim == 2)
