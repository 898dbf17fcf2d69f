"""Volumes at scale: lazy chunked I/O and blockwise prediction on Dask.

* :mod:`mitoseg.volume.store`: open OME-Zarr (NGFF 0.4 / 0.5), plain Zarr arrays and TIFF
  stacks lazily from local paths or ``s3://`` (:func:`~mitoseg.volume.store.open_volume`),
  voxel size from the metadata.
* :mod:`mitoseg.volume.ngff`: the OME-Zarr output (image + pyramid, ``labels/mask``,
  ``labels/instances``, optional probabilities, completion record).
* :mod:`mitoseg.volume.job`: the resumable blockwise job on a ``dask.distributed``
  cluster (:func:`~mitoseg.volume.job.run_volume_job`), behind ``mitoseg predict`` and
  the service's ``/segment_volume`` task.
* :mod:`mitoseg.volume.tiles`: YX tiles of slices (``block_yx``) computed exactly as the
  whole slice (whole-slice percentiles first, the global tile grid).

Nothing heavy (zarr, dask) is imported here.
"""
