"""Which code made a result: the git commit of the working tree, marked when it has uncommitted changes."""

from __future__ import annotations

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit() -> str:
    """``HEAD``'s hash, with ``+dirty`` when tracked files differ from it; ``unknown`` outside a checkout."""
    try:
        run = dict(capture_output=True, text=True, check=True, cwd=ROOT)
        sha = subprocess.run(["git", "rev-parse", "HEAD"], **run).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **run).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
