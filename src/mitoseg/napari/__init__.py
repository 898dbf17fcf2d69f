"""napari plugin for mitoseg (npe2 manifest ``mitoseg/napari.yaml``).

* Reader (:mod:`mitoseg.napari._reader`): opens mitoseg outputs (TIFF images, masks and
  uint32 instance labels; OME-Zarr stores with an image and a ``labels/`` group) as image
  and labels layers, with the voxel size (nm, ``z, y, x``) as the layers' ``scale``.
* Widget (:mod:`mitoseg.napari._widget`): segments the selected image layer with a local
  model URI (``.keras`` path, ``models:/...``, ``runs:/...``, run through its inference
  plan by :func:`mitoseg.inference.predict.segment_stack`) or a running mitoseg endpoint
  (``POST /segment_stack``), and adds the mask and instance layers.

Nothing here imports Qt at module import: the reader and the segmentation core
(:mod:`mitoseg.napari._segment`) are plain numpy; only napari itself, when it builds the
widget, brings Qt in.
"""

from __future__ import annotations

__all__: list[str] = []
