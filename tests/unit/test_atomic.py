"""Atomic writes replace a file whole and leave it with the mode a plain open() gives."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bonefrac.atomic import atomic_link_or_copy, atomic_write_bytes, atomic_write_json


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


def test_link_or_copy_links_without_touching_the_source(tmp_path, monkeypatch):
    src = tmp_path / "raw" / "x.png"
    src.parent.mkdir()
    src.write_bytes(b"image bytes")
    os.chmod(src, 0o440)  # e.g. a DVC cache object linked into the workspace
    dst = tmp_path / "deid" / "files" / "I-1.png"
    assert atomic_link_or_copy(src, dst) is True
    assert os.stat(dst).st_ino == os.stat(src).st_ino  # one copy on disk
    assert os.stat(src).st_mode & 0o777 == 0o440  # the shared inode's mode is not changed
    assert atomic_link_or_copy(src, dst) is True  # again onto the same file: rename is a no-op
    assert sorted(p.name for p in dst.parent.iterdir()) == ["I-1.png"]  # no temp file left
    monkeypatch.setattr(os, "link", lambda *a, **k: (_ for _ in ()).throw(OSError(18, "cross-device")))
    other = tmp_path / "deid" / "files" / "I-2.png"
    assert atomic_link_or_copy(src, other) is False
    assert other.read_bytes() == b"image bytes" and os.stat(other).st_ino != os.stat(src).st_ino
