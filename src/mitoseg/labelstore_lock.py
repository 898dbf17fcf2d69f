"""Several writers of one label store (:mod:`mitoseg.labelstore`): a lock per store, and a
save that a killed writer cannot leave half done.

**The lock** is ``<store>/.store.lock``, an OS file lock (``flock`` through ``filelock``)
held across the whole read-modify-write of one save (:func:`store_lock`). The kernel
drops it when its process ends, killed or not, so a dead writer never blocks the next
one. A writer that waits longer than its timeout gets a :class:`LabelStoreError` naming
the store and the holder (pid, host, user, since when), which the holder writes into the
lock file on acquiring it. The file stays in the store between saves (it holds the last
holder). Stores are local directories (a shared filesystem whose ``flock`` works, e.g.
NFS v4, for annotators on several machines); ``s3://`` stores are refused.

**A save** (:func:`commit_save`) writes, each file complete under a temporary name and
then renamed: the mask as ``.z00123.pending.tif``, a journal ``.pending.json`` (the
mask's file, the pending file and the SHA-256 of the new ``store.json``), ``store.json``
itself (the commit point), then renames the pending mask over ``z00123.tif`` and
removes the journal. The next writer, holding the lock, finishes a save its killed
predecessor committed (``store.json`` is the one in the journal) or drops one it did
not, and removes the temporary files of killed writers (:func:`recover`); readers that
find a committed journal read its pending mask (:func:`committed_pending`). So the store
is always the state before or after a whole save (of a killed process; a power loss
is not covered: nothing is fsynced).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import socket
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mitoseg.errors import LabelStoreError
from mitoseg.io import atomic_path, write_json

__all__ = [
    "JOURNAL_FILE",
    "LOCK_FILE",
    "LOCK_TIMEOUT_S",
    "STORE_FILE",
    "commit_save",
    "committed_pending",
    "describe_holder",
    "local_root",
    "recover",
    "store_lock",
]

#: The manifest's file name inside a store.
STORE_FILE = "store.json"
#: The writers' lock file inside a store.
LOCK_FILE = ".store.lock"
#: The journal of the save in progress inside a store.
JOURNAL_FILE = ".pending.json"
#: Seconds a writer waits for another writer before giving up.
LOCK_TIMEOUT_S = 30.0

# what killed writers leave: temporary files of io.atomic_path (".<name>.<random><suffix>")
# and pending masks (".z00123.pending.tif")
_DEBRIS = (f".{STORE_FILE}.*", f".{JOURNAL_FILE}.*", ".z[0-9]*", "..z[0-9]*")


def local_root(store: str | Path) -> Path:
    """The store directory as a local path.

    Raises:
        LabelStoreError: an ``s3://`` store (label stores are local directories).
    """
    text = os.fspath(store)
    if text.startswith(("s3://", "s3:/")):
        raise LabelStoreError(
            f"{text}: a label store is a local directory (a shared filesystem for several "
            "annotators); s3:// stores are not supported"
        )
    return Path(store)


def describe_holder(lock_path: Path) -> str:
    """Who holds a store's lock, as its holder recorded it in the lock file:
    ``pid 123 on host h, user ana, since 2026-01-02 03:04:05 UTC``, or ``holder unknown``."""
    try:
        rec = json.loads(lock_path.read_text())
        return (
            f"pid {int(rec['pid'])} on host {rec['host']}, user {rec['user']}, since {rec['since']}"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


def _record_holder(user: str) -> Callable[[int], None]:
    """filelock's ``on_acquired`` hook: write who holds the lock into the lock file."""

    def write(fd: int) -> None:
        since = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        rec = {"pid": os.getpid(), "host": socket.gethostname(), "user": user, "since": since}
        data = (json.dumps(rec) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)

    return write


@contextlib.contextmanager
def store_lock(store: str | Path, user: str, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[Path]:
    """Hold the store's writer lock; on entry, :func:`recover` what a killed writer left.

    Args:
        store: the store directory (must exist).
        user: who writes (recorded in the lock file for the messages of waiting writers).
        timeout_s: seconds to wait for another writer (0: one try).

    Yields:
        The store directory.

    Raises:
        LabelStoreError: ``label store <store>/store.json is locked by another writer
            (<holder>; waited <timeout_s> s)``; a bad timeout; the lock file cannot be
            opened or locked (names it).
    """
    from filelock import FileLock, Timeout

    root = local_root(store)
    manifest = root / STORE_FILE
    if isinstance(timeout_s, bool) or not (
        isinstance(timeout_s, int | float) and math.isfinite(timeout_s) and timeout_s >= 0
    ):
        raise LabelStoreError(
            f"label store {manifest}: lock timeout must be a finite number of seconds >= 0, "
            f"got {timeout_s!r}"
        )
    lock_path = root / LOCK_FILE
    lock = FileLock(
        lock_path,
        timeout=float(timeout_s),
        mode=0o666,  # annotators under other accounts lock the same file
        fallback_to_soft=False,  # no flock on this filesystem: an error, not a weaker lock
        preserve_lock_file=True,
        on_acquired=_record_holder(user),
    )
    try:
        lock.acquire()
    except Timeout:
        raise LabelStoreError(
            f"label store {manifest} is locked by another writer "
            f"({describe_holder(lock_path)}; waited {timeout_s:g} s)"
        ) from None
    except OSError as exc:
        raise LabelStoreError(f"label store {manifest}: cannot lock {lock_path} ({exc})") from None
    try:
        recover(root)
        yield root
    finally:
        lock.release()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_journal(root: Path) -> dict[str, Any] | None:
    try:
        rec = json.loads((root / JOURNAL_FILE).read_text())
        return rec if {"file", "pending", "store_sha256"} <= set(rec) else None
    except (OSError, ValueError, TypeError):
        return None


def committed_pending(root: Path) -> tuple[str, Path] | None:
    """``(file, pending mask)`` of a save whose ``store.json`` was written but whose mask
    was not yet renamed into place (its writer is still at it, or was killed), else None."""
    if not (root / JOURNAL_FILE).is_file():
        return None
    rec = _read_journal(root)
    if rec is None:
        return None
    try:
        committed = _sha256((root / STORE_FILE).read_bytes()) == rec["store_sha256"]
    except OSError:
        return None
    return (str(rec["file"]), root / str(rec["pending"])) if committed else None


def recover(root: Path) -> None:
    """Finish the save a killed writer committed, drop the one it did not, and remove the
    temporary files of killed writers. Call only with the store's lock held."""
    done = committed_pending(root)
    if done is not None and done[1].is_file():
        os.replace(done[1], root / done[0])
    (root / JOURNAL_FILE).unlink(missing_ok=True)
    for pattern in _DEBRIS:
        for path in root.glob(pattern):
            path.unlink(missing_ok=True)


def commit_save(
    root: Path, file: str, write_mask: Callable[[Path], None], manifest: dict[str, Any]
) -> None:
    """Write one slice's mask and the new ``store.json`` as one save (with the lock held).

    Args:
        root: the store directory.
        file: the mask's file name in the store (``z00123.tif``).
        write_mask: writes the mask to the path it is given (atomically).
        manifest: the new ``store.json`` (JSON-ready).
    """
    text = json.dumps(manifest, indent=2) + "\n"
    pending = f".{Path(file).stem}.pending{Path(file).suffix}"
    write_mask(root / pending)
    write_json(
        root / JOURNAL_FILE,
        {"file": file, "pending": pending, "store_sha256": _sha256(text.encode())},
    )
    with atomic_path(root / STORE_FILE) as tmp:
        tmp.write_text(text)  # the commit point
    os.replace(root / pending, root / file)
    (root / JOURNAL_FILE).unlink()
