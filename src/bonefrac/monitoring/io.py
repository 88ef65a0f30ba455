"""Atomic writes for monitoring outputs: a crash never leaves half a report or table behind."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from bonefrac.atomic import atomic_write_bytes, atomic_write_text

__all__ = ["atomic_write_bytes", "atomic_write_text", "read_table", "write_table"]


def write_table(frame: pd.DataFrame, path: Path) -> Path:
    """CSV (portable, diffable, no pyarrow needed to read it back)."""
    return atomic_write_text(Path(path), frame.to_csv(index=False))


def read_table(path: Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"feature table not found: {path}")
    return pd.read_csv(path)
