"""Where a model came from: the data version (DVC hash) and the git commit.

The data version is the hash DVC itself records in ``dvc.lock`` for the
preprocessed data (the tensors the model was trained and tested on): it changes
exactly when DVC would rerun training, and it can be checked out again with
``dvc checkout``. Without a ``dvc.lock`` (the pipeline was run by hand) the
fallback is the SHA-256 of the cache's ``index.csv``, the same short hash the
evaluate stage writes into the bundle.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import yaml

DEFAULT_DATA_OUT = "data/processed"


def dvc_out_hash(lock_path: str | Path, out_path: str = DEFAULT_DATA_OUT) -> str | None:
    """The ``md5`` DVC recorded for the output ``out_path`` in ``dvc.lock`` (``None`` if absent)."""
    lock_path = Path(lock_path)
    if not lock_path.exists():
        return None
    try:
        lock = yaml.safe_load(lock_path.read_text()) or {}
    except yaml.YAMLError:
        return None
    want = out_path.rstrip("/")
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if str(out.get("path", "")).rstrip("/") == want:
                md5 = out.get("md5") or out.get("hash")
                return str(md5).removesuffix(".dir") if md5 else None
    return None


def data_version(project_root: str | Path, processed_dir: str | Path = DEFAULT_DATA_OUT) -> str:
    """DVC hash of the preprocessed data, or ``sha256(index.csv)[:12]``, or ``"unknown"``."""
    root = Path(project_root)
    rel = Path(processed_dir)
    rel_str = str(rel.relative_to(root)) if rel.is_absolute() and rel.is_relative_to(root) else str(rel)
    h = dvc_out_hash(root / "dvc.lock", rel_str)
    if h:
        return h
    index = (rel if rel.is_absolute() else root / rel) / "index.csv"
    if index.exists():
        return hashlib.sha256(index.read_bytes()).hexdigest()[:12]
    return "unknown"


def git_commit(project_root: str | Path) -> str:
    """``HEAD`` commit (with ``-dirty`` when tracked files changed), or ``"unknown"`` outside git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=project_root, capture_output=True, text=True, timeout=30
        )
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=project_root,
            capture_output=True,
            text=True,
            timeout=30,
        )
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
