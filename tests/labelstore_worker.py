"""A writer of a label store in its own process, for the concurrency tests
(tests/unit/test_labelstore_lock.py). ``python tests/labelstore_worker.py JOB`` with JOB
a JSON object:

- ``{"do": "add", "store", "author", "go", "adds": [[z, [y0, y1, x0, x1], value, note], ...]}``:
  waits until the file ``go`` exists, then adds each mask (merge mode) in order;
- ``{"do": "hold", "store", "user"}``: holds the store's lock, prints ``held`` and keeps
  it until a line arrives on stdin (or the process is killed);
- ``{"do": "die", "store", "author", "at", "add": [z, box, value, note]}``: adds the mask
  (replace mode) and kills itself with SIGKILL when the save renames a file onto the
  name ``at`` (before that rename).

Masks are ``(12, 16)`` uint8: ``value`` in the box, the ignore value 254 elsewhere.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from mitoseg.labelstore import add_slice, make_provenance
from mitoseg.labelstore_lock import store_lock

SHAPE = (12, 16)
IGNORE = 254


def mask(box: list[int], value: int) -> np.ndarray:
    """A ``(12, 16)`` uint8 mask: ``value`` in rows ``y0..y1-1``, columns ``x0..x1-1``."""
    y0, y1, x0, x1 = box
    m = np.full(SHAPE, IGNORE, np.uint8)
    m[y0:y1, x0:x1] = value
    return m


def _add(job: dict[str, Any]) -> None:
    go = Path(job["go"])
    while not go.exists():
        time.sleep(0.005)
    for z, box, value, note in job["adds"]:
        prov = make_provenance("python", author=job["author"], note=note)
        add_slice(job["store"], z, mask(box, value), prov)


def _hold(job: dict[str, Any]) -> None:
    with store_lock(job["store"], job["user"], timeout_s=10):
        print("held", flush=True)
        sys.stdin.readline()


def _die(job: dict[str, Any]) -> None:
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        if Path(dst).name == job["at"]:
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)

    os.replace = replace  # type: ignore[assignment]
    z, box, value, note = job["add"]
    prov = make_provenance("python", author=job["author"], note=note)
    add_slice(job["store"], z, mask(box, value), prov, mode="replace")


def main() -> None:
    job = json.loads(sys.argv[1])
    {"add": _add, "hold": _hold, "die": _die}[job["do"]](job)


if __name__ == "__main__":
    main()
