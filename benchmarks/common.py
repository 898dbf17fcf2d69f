"""Shared helpers for the benchmark scripts (machine description, result files, data).

Benchmarks are run by hand or with ``make bench``; they are not tests. Each writes one
JSON file under ``benchmarks/results/`` saying what was measured on which machine.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from mitoseg.io import write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARED = ROOT.parent / "shared" / "data"


def machine() -> dict[str, Any]:
    """Describe the machine and software the numbers were measured on."""
    import tensorflow as tf

    gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "gpus": gpus,
        "python": sys.version.split()[0],
        "tensorflow": tf.__version__,
        "platform": platform.platform(),
        "git_commit": commit or "unknown",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def save(name: str, data: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>.json`` atomically and print it."""
    path = RESULTS / f"{name}.json"
    write_json(path, data)
    print(json.dumps(data, indent=2))
    print(f"wrote {path}")
    return path


def cdeep3m_split_manifest(out: Path, n_train: int = 15) -> Path:
    """Write a manifest splitting the labelled CDeep3M slices slice-wise into train/test.

    Slices ``[0, n_train)`` train (the patchify stage holds some of them out for
    validation), ``[n_train, 20)`` test. Raises ``FileNotFoundError`` when
    ``../shared/data`` is absent.
    """
    img = SHARED / "cdeep3m" / "cdeep3m_train_raw.tif"
    msk = SHARED / "cdeep3m" / "cdeep3m_train_mito.tif"
    if not img.is_file() or not msk.is_file():
        raise FileNotFoundError(f"{img}: CDeep3M data not found (needs ../shared/data)")
    manifest = {
        "train": [{"image": str(img), "mask": str(msk), "slices": [0, n_train]}],
        "test": [{"image": str(img), "mask": str(msk), "slices": [n_train, 20]}],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(manifest))
    return out
