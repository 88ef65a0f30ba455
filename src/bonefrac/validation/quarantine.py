"""Split the manifest into clean rows and a quarantine list, and write outputs atomically.

Quarantine is a list, not a move: files stay where they are (a hospital's
archive is never touched), and every input row ends up in exactly one of the
two tables, so nothing disappears without a written reason.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from bonefrac.atomic import atomic_write_text


def split_clean_quarantine(
    manifest: pd.DataFrame, failures: Mapping[str, Mapping[int, str]]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``failures``: check → {row position → reason}. Returns (clean, quarantine with 'check' and 'reason').

    A row failing several checks appears once in quarantine, its checks and
    reasons joined with "; " in check order.
    """
    base = manifest.reset_index(drop=True)
    checks: dict[int, list[str]] = {}
    reasons: dict[int, list[str]] = {}
    for check, rows in failures.items():
        for pos, reason in sorted(rows.items()):
            checks.setdefault(pos, []).append(check)
            reasons.setdefault(pos, []).append(reason)
    bad = sorted(checks)
    quarantine = base.iloc[bad].copy()
    quarantine["check"] = ["; ".join(checks[p]) for p in bad]
    quarantine["reason"] = ["; ".join(reasons[p]) for p in bad]
    clean = base.drop(index=bad)
    return clean.reset_index(drop=True), quarantine.reset_index(drop=True)


def write_json_atomic(data: Mapping[str, Any], path: Path) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def replace_dir_atomic(new_dir: Path, target: Path) -> None:
    """Put ``new_dir`` at ``target``: rename the old one aside, rename the new one in, delete the old.

    Two renames on one file system, so a reader sees the old site or the new
    one, never half of each.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        old.rmdir()
        os.replace(target, old)
    os.replace(new_dir, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
