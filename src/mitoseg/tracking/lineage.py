"""Lineage of a run: code version (git), data version (``data.dvc``) and DVC stage state.

Pure file and ``git`` reads: no MLflow here.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from mitoseg.tracking.store import UNKNOWN

__all__ = ["data_dvc_md5", "lineage_tags"]


def _git(repo_root: Path, *args: str) -> str | None:
    try:
        proc = subprocess.run(
            ["git", "-C", str(repo_root), *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    return proc.stdout


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None


def _stage_tag_key(name: str) -> str:
    return "dvc_stage_" + re.sub(r"[^A-Za-z0-9_\-.]", "_", name)


def data_dvc_md5(root: Path) -> str:
    """md5 of the first output recorded in ``<root>/data.dvc``, or ``unknown``."""
    data_dvc = _read_yaml(root / "data.dvc")
    if isinstance(data_dvc, dict):
        outs = data_dvc.get("outs")
        if isinstance(outs, list) and outs and isinstance(outs[0], dict):
            md5 = outs[0].get("md5") or outs[0].get("hash")
            if isinstance(md5, str) and md5:
                return md5
    return UNKNOWN


def lineage_tags(repo_root: Path) -> dict[str, str]:
    """Lineage of a run: code version, data version and DVC stage state.

    Args:
        repo_root: root of the git/DVC repository (holds ``data.dvc`` and ``dvc.lock``).

    Returns:
        ``git_commit`` (HEAD sha), ``git_dirty`` (``"true"``/``"false"``: uncommitted
        changes to tracked files or new unignored files), ``data_dvc_md5`` (md5 of the
        first output in ``data.dvc``), ``dvc_lock_md5`` (md5 of ``dvc.lock``) and one
        ``dvc_stage_<name>`` per stage in ``dvc.lock`` (md5 of the stage's locked command,
        dependency, parameter and output hashes). Anything that cannot be determined
        (no git, not a repository, file missing or malformed) has the value ``"unknown"``;
        this function never raises for a missing or broken repository.
    """
    root = Path(repo_root)
    tags: dict[str, str] = {}
    head = _git(root, "rev-parse", "HEAD")
    tags["git_commit"] = head.strip() if head and head.strip() else UNKNOWN
    status = _git(root, "status", "--porcelain") if head else None
    tags["git_dirty"] = UNKNOWN if status is None else ("true" if status.strip() else "false")

    tags["data_dvc_md5"] = data_dvc_md5(root)

    lock_path = root / "dvc.lock"
    try:
        tags["dvc_lock_md5"] = hashlib.md5(lock_path.read_bytes()).hexdigest()
    except OSError:
        tags["dvc_lock_md5"] = UNKNOWN
    lock = _read_yaml(lock_path)
    stages = lock.get("stages") if isinstance(lock, dict) else None
    if isinstance(stages, dict):
        for name, entry in stages.items():
            blob = json.dumps(entry, sort_keys=True, default=str).encode()
            tags[_stage_tag_key(str(name))] = hashlib.md5(blob).hexdigest()
    return tags
