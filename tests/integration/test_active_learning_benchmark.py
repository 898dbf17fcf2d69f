"""benchmarks/active_learning.py end to end on a tiny synthetic stack (tiny model, few steps).

The loop's numbers mean nothing here; what is checked is the loop itself: the JSON
validates against :class:`mitoseg.active.ActiveLearningReport`, every strategy has every
round, the labelled slices grow by ``k`` per round (and ``partial``'s labelled pixels by
a slice's worth), the fixed test and gap slices are never labelled, ``--resume`` skips the
finished arms and ``--table`` prints them.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mitoseg.active import STRATEGIES, read_active_learning
from mitoseg.io import write_stack

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "active_learning.py"
SIDE = 64


def _stack(root: Path) -> tuple[Path, Path]:
    """20 slices of noise with bright disks (the mitochondria, mask 255)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:SIDE, :SIDE]
    images = rng.normal(90, 12, (20, SIDE, SIDE))
    masks = np.zeros((20, SIDE, SIDE), np.uint8)
    for z in range(20):
        for cy, cx in rng.integers(8, SIDE - 8, (3, 2)):
            disk = (yy - cy) ** 2 + (xx - cx) ** 2 < 36
            images[z][disk] += 80
            masks[z][disk] = 255
    write_stack(root / "raw.tif", np.clip(images, 0, 255).astype(np.uint8))
    write_stack(root / "mito.tif", masks)
    return root / "raw.tif", root / "mito.tif"


def _run(tmp_path: Path, image: Path, mask: Path, *extra: str, rc: int = 0) -> str:
    train = (
        '{"model": {"depth": 2, "base_filters": 4, "dropout": 0.0}, "crop_size": 32, '
        '"batch_size": 2, "precise_bn_batches": 0, "ema_momentum": null, "clipnorm": null}'
    )
    args = [
        sys.executable, str(SCRIPT), "--image", str(image), "--mask", str(mask),
        "--out", str(tmp_path / "al.json"), "--work", str(tmp_path / "work"), "--seeds", "3",
        "--rounds", "1", "--k", "2", "--steps-first", "3", "--steps-per-round", "2",
        "--partial-tile", "16", "--train", train, *extra,
    ]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == rc, done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.mark.slow  # 115 s beside the other worker (74 s alone) on a 2-core AMD EPYC (AVX2)
def test_the_loop_on_a_tiny_stack(tmp_path: Path) -> None:
    image, mask = _stack(tmp_path)
    _run(tmp_path, image, mask)
    report = read_active_learning(tmp_path / "al.json")
    assert report.data["pool"] == list(range(10)) and report.data["test"] == [15, 16, 17, 18, 19]
    assert report.data["validation"] == [10, 11] and report.data["shape"] == [SIDE, SIDE]
    assert report.machine["git_commit"] and report.settings["steps_per_round"] == 2
    assert [(a.strategy, a.seed) for a in report.arms] == [(s, 3) for s in STRATEGIES]
    start = report.arms[0].rounds[0]
    assert start.labelled_slices == [2, 7] and start.steps == 3 and start.init == "scratch"
    for arm in report.arms:
        assert [(r.round, r.init, r.steps) for r in arm.rounds] == [
            (0, "scratch", 3),
            (1, "previous", 2),
        ]
        for r in arm.rounds:
            assert set(r.labelled_slices) <= set(range(10))  # never test 15-19 or gap 10-14
            assert set(r.added) <= set(r.labelled_slices)
            assert 0 <= r.test_iou <= 1 and r.seconds.total >= r.seconds.train > 0
        # 16-pixel tiles add up to whole slices exactly
        assert [r.labelled_pixels for r in arm.rounds] == [2 * SIDE * SIDE, 4 * SIDE * SIDE]
        before, after = arm.rounds
        if arm.strategy == "partial":
            assert len(before.labelled_slices) > 2  # the regions spread over the pool
            assert not arm.shared_start
        else:
            assert [len(before.labelled_slices), len(after.labelled_slices)] == [2, 4]
            assert set(after.labelled_slices) == set(before.labelled_slices) | set(after.added)
            assert len(after.added) == 2 and not set(after.added) & set(before.labelled_slices)
            assert arm.shared_start and before == start
    suggest = report.arms[0].rounds[1]
    assert suggest.suggest_scores is not None and sorted(suggest.suggest_scores) == list(range(10))
    free = [z for z in range(10) if z not in start.labelled_slices]
    assert suggest.added == sorted(sorted(free, key=lambda z: (-suggest.suggest_scores[z], z))[:2])
    assert [(s.strategy, s.round) for s in report.summary] == [
        (s, r) for s in STRATEGIES for r in range(2)
    ]

    # --resume: the finished arms are not run again; other settings are refused
    text = (tmp_path / "al.json").read_text()
    out = _run(tmp_path, image, mask, "--resume")
    assert "nothing to run" in out and (tmp_path / "al.json").read_text() == text
    out = _run(tmp_path, image, mask, "--resume", "--steps-per-round", "5", rc=1)
    assert "was measured with other settings (steps_per_round)" in out
    table = _run(tmp_path, image, mask, "--table")
    assert (
        "| round | labelled slices | labelled pixels | suggest | random | even | partial |" in table
    )


@pytest.mark.parametrize(
    ("extra", "rc", "message"),
    [
        (["--rounds", "5"], 2, r"--start 2 \+ --rounds 5 x --k 2 labels more than the pool's 10"),
        (["--k", "0"], 2, r"--start and --k must be >= 1, --rounds >= 0"),
        (["--steps-per-round", "0"], 2, r"--steps-first and --steps-per-round must be >= 1"),
        (["--partial-tile", "0"], 2, r"--partial-tile must be >= 1, got 0"),
        (["--val-slices", "9", "10"], 2, r"--val-slices \[9\]: must be in 10\.\.14"),
        (["--train", '{"batch_size": 0}'], 2, r"--train: .*batch_size"),
        (["--train", "{"], 2, r"--train: Expecting property name"),
        (["--crop", "16"], 1, r"--crop 16: must be in 32\.\.64"),
        (["--image", "missing.tif"], 1, r"missing\.tif: not found"),
    ],
)
def test_bad_arguments_are_refused_before_any_training(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    rc: int,
    message: str,
) -> None:
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # the script imports benchmarks/common
    script = importlib.import_module("active_learning")
    image, mask = _stack(tmp_path)
    argv = ["--image", str(image), "--mask", str(mask), "--out", str(tmp_path / "al.json")]
    argv += ["--work", str(tmp_path / "work"), *extra]
    with pytest.raises(SystemExit) as exc:
        script.main(argv)
    text = capsys.readouterr().err + str(exc.value.code)
    assert (2 if isinstance(exc.value.code, int) else 1) == rc
    assert re.search(message, text), text
    assert not (tmp_path / "al.json").exists() and not (tmp_path / "work").exists()
