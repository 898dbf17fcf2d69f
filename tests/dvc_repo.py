"""Running ``git`` and ``dvc`` in throw-away repositories from tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

__all__ = ["dvc_env", "run"]


def dvc_env(tmp_path: Path) -> dict[str, str]:
    """The environment without ``AWS_*`` variables, with a private DVC site cache, no
    analytics and a git identity."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        DVC_NO_ANALYTICS="1",
        DVC_SITE_CACHE_DIR=str(tmp_path / "dvc-site-cache"),
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@example.org",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@example.org",
    )
    return env


def run(
    args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300, stderr: bool = False
) -> str:
    """Run ``args`` (``dvc ...`` through this interpreter's DVC) in ``cwd``; assert it
    succeeds and return its stdout (followed by its stderr with ``stderr``)."""
    cmd = [sys.executable, "-m", "dvc", *args[1:]] if args[0] == "dvc" else args
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + (result.stderr if stderr else "")
