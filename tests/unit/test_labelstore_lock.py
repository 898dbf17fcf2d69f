"""Several writers of one label store (:mod:`mitoseg.labelstore_lock`), each a real process
(tests/labelstore_worker.py): concurrent adds all land, the lock's timeout names the
holder, a killed holder or a writer killed mid-save leaves a store that is the state
before or after a whole save."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from labelstore_worker import IGNORE, mask
from mitoseg.cli import app
from mitoseg.io import write_stack
from mitoseg.labelstore import (
    LabelStoreError,
    add_slice,
    init_store,
    make_provenance,
    read_manifest,
    read_slice,
)
from mitoseg.labelstore_lock import LOCK_FILE

WORKER = Path(__file__).resolve().parents[1] / "labelstore_worker.py"

SHAPE = (5, 12, 16)


@pytest.fixture()
def store(tmp_path: Path) -> Path:
    vol = tmp_path / "vol.tif"
    write_stack(vol, np.zeros(SHAPE, np.uint8), (50.0, 4.0, 4.0))
    root = tmp_path / "labels"
    init_store(root, str(vol), {"background": 0, "mitochondria": 255}, IGNORE)
    return root


def _start(job: dict[str, Any], **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(WORKER), json.dumps(job)], text=True, env=os.environ.copy(), **kw
    )


def _finish(procs: list[subprocess.Popen[str]]) -> None:
    for p in procs:
        assert p.wait(timeout=60) == 0


@pytest.fixture()
def holder(store: Path) -> Iterator[subprocess.Popen[str]]:
    """A process holding the store's lock (user ``holder-ana``) until it reads a line."""
    p = _start(
        {"do": "hold", "store": str(store), "user": "holder-ana"},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert p.stdout is not None and p.stdout.readline() == "held\n"
    yield p
    if p.poll() is None:
        p.kill()
        p.wait()


def _notes(store: Path, z: int) -> list[str | None]:
    entry = read_manifest(store).entry(z)
    assert entry is not None
    return [p.note for p in [*entry.history, entry.provenance]]


def _race(store: Path, tmp_path: Path, jobs: dict[str, list[list[Any]]]) -> None:
    """One process per author adding its masks, all starting at once."""
    go = tmp_path / "go"
    procs = [
        _start({"do": "add", "store": str(store), "author": a, "go": str(go), "adds": adds})
        for a, adds in jobs.items()
    ]
    time.sleep(0.5)  # both imported and polling
    go.touch()
    _finish(procs)


def test_concurrent_writers_of_different_slices_all_land(store: Path, tmp_path: Path) -> None:
    rounds = 4
    boxes = {z: [z, z + 3, 2 * z, 2 * z + 5] for z in range(5)}
    jobs = {
        a: [[z, boxes[z], 255, f"{a} z{z} r{r}"] for r in range(rounds) for z in zs]
        for a, zs in (("ana", [0, 2, 4]), ("ben", [1, 3]))
    }
    _race(store, tmp_path, jobs)
    manifest = read_manifest(store)
    assert [e.z for e in manifest.entries] == [0, 1, 2, 3, 4]
    for e in manifest.entries:
        a = e.provenance.author
        assert _notes(store, e.z) == [f"{a} z{e.z} r{r}" for r in range(rounds)]
        assert [p.mode for p in [*e.history, e.provenance]] == ["new"] + ["merge"] * (rounds - 1)
        np.testing.assert_array_equal(read_slice(store, e.z), mask(boxes[e.z], 255))
        assert e.labelled_pixels == 15


def test_concurrent_merges_into_one_slice_keep_every_save(store: Path, tmp_path: Path) -> None:
    """Rule: each save merges into the slice as the saves before it left it; the later
    save's labels win where both labelled, the earlier save goes to the history."""
    rounds = 5
    boxes = {"ana": ([0, 6, 0, 10], 255), "ben": ([0, 6, 6, 16], 0)}
    jobs = {a: [[2, box, v, f"{a} r{r}"] for r in range(rounds)] for a, (box, v) in boxes.items()}
    _race(store, tmp_path, jobs)
    notes = _notes(store, 2)
    assert sorted(notes) == sorted(n for adds in jobs.values() for *_, n in adds)
    for a in boxes:  # each writer's saves in its order
        assert [n for n in notes if n.startswith(a)] == [f"{a} r{r}" for r in range(rounds)]
    entry = read_manifest(store).entry(2)
    assert entry is not None
    last = entry.provenance.author
    got = read_slice(store, 2)
    np.testing.assert_array_equal(got[:6, :6], 255)  # ana's alone
    np.testing.assert_array_equal(got[:6, 10:], 0)  # ben's alone
    np.testing.assert_array_equal(got[:6, 6:10], boxes[last][1])  # overlap: the last save's
    np.testing.assert_array_equal(got[6:], IGNORE)
    assert entry.labelled_pixels == 96 and entry.class_pixels["mitochondria"] == (
        36 if last == "ben" else 60
    )


def _since(message: str) -> datetime:
    stamp = re.search(r"since (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC", message)
    assert stamp is not None, message
    return datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)


def test_a_held_lock_times_out_naming_the_holder(
    store: Path, holder: subprocess.Popen[str]
) -> None:
    before = (store / "store.json").read_text()
    prov = make_provenance("python", author="ben")
    t0 = time.monotonic()
    with pytest.raises(LabelStoreError) as err:
        add_slice(store, 1, mask([0, 2, 0, 2], 255), prov, lock_timeout_s=0.5)
    waited = time.monotonic() - t0
    msg = str(err.value)
    who = f"pid {holder.pid} on host {socket.gethostname()}, user holder-ana"
    assert re.fullmatch(
        re.escape(f"label store {store}/store.json is locked by another writer ({who}, since ")
        + r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC; waited 0\.5 s\)",
        msg,
    ), msg
    assert abs((datetime.now(UTC) - _since(msg)).total_seconds()) < 30
    assert 0.5 <= waited < 5
    assert (store / "store.json").read_text() == before
    assert holder.stdin is not None
    holder.stdin.write("release\n")
    holder.stdin.flush()
    _finish([holder])
    add_slice(store, 1, mask([0, 2, 0, 2], 255), prov, lock_timeout_s=0.5)
    assert _notes(store, 1) == [None]


def test_the_cli_reports_a_held_lock(
    store: Path, tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    import tifffile

    tifffile.imwrite(tmp_path / "m.tif", mask([0, 2, 0, 2], 255))
    r = CliRunner().invoke(
        app,
        ["labels", "add", "--store", str(store), "--z", "1", "--mask", str(tmp_path / "m.tif"),
         "--lock-timeout", "0.2"],
    )  # fmt: skip
    assert r.exit_code == 1, r.output
    last = r.output.strip().splitlines()[-1]
    assert last.startswith(
        f"error: label store {store}/store.json is locked by another writer (pid {holder.pid} "
    ) and last.endswith("; waited 0.2 s)"), r.output


def test_a_killed_holder_does_not_block(store: Path, holder: subprocess.Popen[str]) -> None:
    holder.send_signal(signal.SIGKILL)
    assert holder.wait(timeout=10) == -signal.SIGKILL
    t0 = time.monotonic()
    add_slice(store, 1, mask([0, 2, 0, 2], 255), make_provenance("python", author="ben"))
    assert time.monotonic() - t0 < 2
    record = json.loads((store / LOCK_FILE).read_text())  # the last holder: this process
    assert (record["pid"], record["user"]) == (os.getpid(), "ben")


@pytest.mark.parametrize(
    ("at", "committed"),
    [
        (".z00001.pending.tif", False),
        (".pending.json", False),
        ("store.json", False),
        ("z00001.tif", True),
    ],
    ids=["writing-the-mask", "writing-the-journal", "writing-store-json", "after-store-json"],
)
def test_a_writer_killed_mid_save_leaves_a_whole_state(
    store: Path, at: str, committed: bool
) -> None:
    old, new = ([0, 3, 0, 3], 255), ([5, 9, 5, 12], 0)
    add_slice(store, 1, mask(*old), make_provenance("python", author="ana", note="old"))
    job = {"do": "die", "store": str(store), "author": "ben", "at": at, "add": [1, *new, "new"]}
    p = _start(job)
    assert p.wait(timeout=60) == -signal.SIGKILL
    want_notes, want_mask = (["old", "new"], mask(*new)) if committed else (["old"], mask(*old))

    def check() -> None:  # the manifest and the mask agree
        assert _notes(store, 1) == want_notes
        got = read_slice(store, 1)
        np.testing.assert_array_equal(got, want_mask)
        entry = read_manifest(store).entry(1)
        assert entry is not None and entry.labelled_pixels == int((got != IGNORE).sum())

    check()  # readers, before any writer recovers
    add_slice(store, 3, mask(*old), make_provenance("python", author="cy"))  # recovers
    check()
    names = sorted(f.name for f in store.iterdir())
    assert names == [".store.lock", "store.json", "z00001.tif", "z00003.tif"]
