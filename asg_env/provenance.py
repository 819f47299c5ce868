"""Which code made a result: the git commit of the working tree (marked when it has uncommitted
changes), and a hash of the settings that made it."""

from __future__ import annotations

import hashlib
import json
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


MACHINE = ("data_root", "source_root", "target_root", "device", "num_workers")  # where and how fast, not what


def settings_hash(settings) -> str:
    """A short hash of the settings that made a result (JSON with sorted keys, without the
    machine-dependent :data:`MACHINE` keys at any depth): rows that share it were made the same way."""
    def portable(x):
        if isinstance(x, dict):
            return {k: portable(v) for k, v in x.items() if k not in MACHINE}
        return [portable(v) for v in x] if isinstance(x, (list, tuple)) else x
    return hashlib.sha256(json.dumps(portable(settings), sort_keys=True, default=str).encode()).hexdigest()[:12]


def stamp(settings) -> dict:
    """What a published row carries: the commit of the code that made it and its settings' hash."""
    return {"commit": git_commit(), "settings_hash": settings_hash(settings)}


def stamp_line(rows, where: str = "results.jsonl") -> str:
    """The line of a results page that names the commits and settings behind its rows (``where``
    each row is kept)."""
    commits = sorted({r.get("commit", "not recorded") for r in rows})
    hashes = sorted({r.get("settings_hash", "not recorded") for r in rows})
    return (f"Made by commit{'s' if len(commits) > 1 else ''} {', '.join(commits)} with settings "
            f"hash{'es' if len(hashes) > 1 else ''} {', '.join(hashes)} (each row of {where} names its own).")
