"""Atomic writes replace a file whole and leave it with the mode a plain open() gives."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bonefrac.atomic import atomic_write_bytes, atomic_write_json


def test_mode_matches_a_plain_write(tmp_path: Path) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic = atomic_write_json(tmp_path / "sub" / "report.json", {"a": 1})
    assert atomic.read_text().strip().startswith("{")
    assert (atomic.stat().st_mode & 0o777) == (plain.stat().st_mode & 0o777)
    assert os.access(atomic, os.R_OK)


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = atomic_write_bytes(tmp_path / "model.bin", b"old")


    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]
