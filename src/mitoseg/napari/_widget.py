"""The napari widget (magicgui): segment the selected image layer.

Imported by napari when the widget is opened (npe2 command ``mitoseg.segment_widget``),
never by ``mitoseg`` itself; it imports napari, and Qt only inside the call. The work is
done by :mod:`mitoseg.napari._segment` in a napari thread worker (a ``QThread``), so the
viewer stays responsive while a model runs (minutes on a CPU for a large stack); the
layers are added (or replaced) on the main thread when it returns.
"""

from typing import Any

import napari
from magicgui import magic_factory

from mitoseg.napari._segment import (
    SegmentWorker,
    as_stack,
    endpoint_model,
    mask_layers,
    segment_remote,
)

__all__ = ["segment_widget"]


def _run(
    data: Any, rgb: bool, ndim: int, scale: tuple[float, ...], name: str,
    model: str, endpoint: str, token: str, worker: SegmentWorker,
) -> list[tuple[Any, dict[str, Any], str]]:  # fmt: skip
    stack = as_stack(data, rgb=rgb)
    if endpoint.strip():
        classes, meta = segment_remote(stack, endpoint, token or None)
        names, min_size = meta["class_names"], int(meta["plan"]["min_object_size"])
        used = endpoint_model(endpoint, meta)
    else:
        classes, names, min_size = worker.segment(stack, model)
        used = model.strip()
    return mask_layers(classes, names, min_size, scale, name, squeeze=ndim == 2, model=used)


def show_layers(viewer: napari.Viewer, layers: list[tuple[Any, dict[str, Any], str]]) -> None:
    """Add the layer tuples to ``viewer``, replacing the data of layers of the same name."""
    for data, kwargs, kind in layers:
        name = kwargs["name"]
        if name in viewer.layers:
            layer = viewer.layers[name]
            layer.data = data
            layer.scale = kwargs["scale"]
            layer.metadata = kwargs["metadata"]
        else:
            getattr(viewer, f"add_{kind}")(data, **kwargs)


def _own_worker(gui: Any) -> None:
    """``widget_init``: each widget gets its own segmentation worker process (started on
    the first Segment, kept while the widget lives, stopped with this process)."""
    gui.worker.bind(SegmentWorker())


@magic_factory(
    widget_init=_own_worker,
    call_button="Segment",
    worker={"bind": None},
    model={"label": "model URI", "tooltip": ".keras path or models:/mitoseg-unet@champion"},
    endpoint={"label": "or endpoint URL", "tooltip": "e.g. http://127.0.0.1:3000"},
    token={"label": "endpoint token", "widget_type": "Password"},
)
def segment_widget(
    viewer: napari.Viewer,
    image: napari.layers.Image,
    model: str = "models:/mitoseg-unet@champion",
    endpoint: str = "",
    token: str = "",
    worker: SegmentWorker | None = None,
) -> Any:
    """Segment ``image`` with a local model (``model``) or, when ``endpoint`` is set, a
    running mitoseg service; the mask and instance layers appear when the returned
    (started) napari worker returns. Errors are shown as napari notifications."""
    from napari.qt.threading import create_worker

    if image is None:
        raise ValueError("select an image layer to segment")
    data = image.data[0] if image.multiscale else image.data
    ndim = 2 if image.rgb else image.ndim
    scale = tuple(float(s) for s in image.scale)[-min(ndim, 3) :]
    if worker is None:
        raise ValueError("the widget has no segmentation worker")
    args = (data, image.rgb, ndim, scale, image.name, model, endpoint, token, worker)
    worker = create_worker(_run, *args, _start_thread=False)
    worker.returned.connect(lambda layers: show_layers(viewer, layers))
    worker.start()
    return worker
