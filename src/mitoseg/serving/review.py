"""Requests kept for review (opt-in): a sampled fraction of uploads and their masks,
written with the model version to a local folder or an S3 prefix for labelling.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ReviewWriter"]

logger = logging.getLogger("mitoseg.serving")


def _encode_png(mask: np.ndarray) -> bytes:
    from mitoseg.serving.codec import encode_png

    return encode_png(mask)


class ReviewWriter:
    """Keeps a sampled fraction of requests for review: the upload, its mask and a JSON
    record, under ``<uri>/<model>/<version>/<YYYY-MM-DD>/<id>/``.

    Files are written by one background thread (``submit`` never blocks; beyond
    ``queue`` waiting samples new ones are dropped and counted). Local files are written
    to a temporary name and renamed; S3 objects (``s3://``, through s3fs) appear whole.
    ``record.json`` is written last: a sample without it is incomplete.

    Args:
        uri: local folder or ``s3://bucket/prefix``.
        fraction: probability that a request is kept.
        labels: ``{"model", "version"}``.
        queue: most samples waiting to be written.
        seed: random seed of the sampling (None: fresh entropy).
    """

    def __init__(
        self,
        uri: str,
        fraction: float,
        labels: Mapping[str, str],
        queue: int = 16,
        seed: int | None = None,
    ) -> None:
        self.uri = uri.rstrip("/")
        self.fraction = float(fraction)
        self.labels = dict(labels)
        self._rng = np.random.default_rng(seed)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mitoseg-review")
        self._pending = threading.BoundedSemaphore(queue)
        self._lock = threading.Lock()
        self.dropped = 0
        self.written = 0

    def sampled(self) -> bool:
        """Whether the next request is kept (one draw)."""
        with self._lock:
            return bool(self._rng.random() < self.fraction)

    def submit(self, upload: bytes, mask: np.ndarray, record: Mapping[str, Any]) -> bool:
        """Queue one sample; returns False when it was dropped (queue full)."""
        if not self._pending.acquire(blocking=False):
            with self._lock:
                self.dropped += 1
            return False
        self._pool.submit(self._write, upload, np.array(mask), dict(record))
        return True

    def close(self, wait: bool = True) -> None:
        """Stop the writer thread (after the queued samples when ``wait``)."""
        self._pool.shutdown(wait=wait)

    def _write(self, upload: bytes, mask: np.ndarray, record: dict[str, Any]) -> None:
        try:
            day = time.strftime("%Y-%m-%d", time.gmtime())
            sample_id = f"{time.strftime('%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:12]}"
            key = f"{self.labels['model']}/{self.labels['version']}/{day}/{sample_id}"
            record = {**record, **self.labels, "id": sample_id, "time": time.time()}
            files = {
                "upload.bin": upload,
                "mask.png" if mask.ndim == 2 else "mask.tif": _mask_bytes(mask),
                "record.json": json.dumps(record, indent=2).encode(),
            }
            self._put(key, files)
            with self._lock:
                self.written += 1
        except Exception:
            logger.exception("review sample not written to %s", self.uri)
        finally:
            self._pending.release()

    def _put(self, key: str, files: dict[str, bytes]) -> None:
        if self.uri.startswith("s3://"):
            import s3fs

            from mitoseg.volume.store import s3_storage_options

            fs = s3fs.S3FileSystem(**s3_storage_options())
            for name, data in files.items():  # record.json last (dicts keep order)
                fs.pipe_file(f"{self.uri}/{key}/{name}", data)
            return
        from mitoseg.io import atomic_path

        folder = Path(self.uri) / key
        for name, data in files.items():
            with atomic_path(folder / name) as tmp:
                tmp.write_bytes(data)


def _mask_bytes(mask: np.ndarray) -> bytes:
    if mask.ndim == 2:
        return _encode_png(mask)
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, mask, compression="zlib")
    return buf.getvalue()


# ----------------------------------------------------------------- the monitors
