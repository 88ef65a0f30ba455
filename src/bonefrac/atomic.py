"""Atomic file writes: a temp file in the same folder, then ``os.replace``.

Every stage writes its outputs through these so an interrupted run never
leaves a half-written table, report or model behind (readers see the old file
or the new one, nothing in between).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd


def _process_umask() -> int:
    # The only portable way to read the umask is to set it and put it back; done once at import.
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_process_umask()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it replaces ``path``, on error it is removed.

    For writers that want a file name of their own (``torch.save``, ONNX export,
    pydicom, PIL): ``with atomic_path(out) as tmp: torch.save(obj, tmp)``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600; give the file the mode a plain open() would (reports and
        # models are read by other users: ops, the web server).
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_csv(df: pd.DataFrame, path: str | Path) -> Path:
    return atomic_write_text(path, df.to_csv(index=False))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=str))


def atomic_link_or_copy(src: str | Path, dst: str | Path) -> bool:
    """Make ``dst`` hold ``src``'s bytes: a hard link when the file system allows, else a copy.

    A hard link costs no second copy on disk (a hospital's images are not stored twice). The
    source is never modified: no chmod (it would change the shared inode), no write. The new
    name appears atomically (temp name, then ``os.replace``). Returns whether it linked.
    """
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
            linked = True
        except OSError:  # another file system, or links not allowed: copy
            shutil.copyfile(src, tmp)
            os.chmod(tmp, _FILE_MODE)
            linked = False
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)  # left when dst already was this very file (rename does nothing)
    return linked
