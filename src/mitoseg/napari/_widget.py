"""The napari widget (magicgui): segment the selected image layer.

Imported by napari when the widget is opened (npe2 command ``mitoseg.segment_widget``),
never by ``mitoseg`` itself. It imports napari (not Qt): magicgui reads the annotations at
run time, so they are real objects, not strings. The work is done by
:mod:`mitoseg.napari._segment`. The widget returns a :class:`concurrent.futures.Future`
of the layer tuples: napari adds the layers when it completes, and the viewer stays
responsive while a model runs (minutes on a CPU for a large stack).
"""

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import napari
from magicgui import magic_factory

from mitoseg.napari._segment import as_stack, mask_layers, segment_in_worker, segment_remote

__all__ = ["segment_widget"]

#: One segmentation at a time, off napari's main thread.
_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mitoseg-widget")


def _run(
    data: Any, rgb: bool, ndim: int, scale: tuple[float, ...], name: str,
    model: str, endpoint: str, token: str,
) -> list[tuple[Any, dict[str, Any], str]]:  # fmt: skip
    stack = as_stack(data, rgb=rgb)
    if endpoint.strip():
        classes, meta = segment_remote(stack, endpoint, token or None)
        names, min_size = meta["class_names"], int(meta["plan"]["min_object_size"])
    else:
        classes, names, min_size = segment_in_worker(stack, model)
    return mask_layers(classes, names, min_size, scale, name, squeeze=ndim == 2)


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
) -> Future[list[napari.types.LayerDataTuple]]:
    """Segment ``image`` with a local model (``model``) or, when ``endpoint`` is set, a
    running mitoseg service; napari adds the mask and instance layers (replacing them
    when they exist) once the returned future completes."""
    if image is None:
        raise ValueError("select an image layer to segment")
    data = image.data[0] if image.multiscale else image.data
    ndim = 2 if image.rgb else image.ndim
    scale = tuple(float(s) for s in image.scale)[-min(ndim, 3) :]
    return _POOL.submit(_run, data, image.rgb, ndim, scale, image.name, model, endpoint, token)
