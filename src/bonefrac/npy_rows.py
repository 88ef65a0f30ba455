"""Rows of an ``.npy`` file read and written by positional file I/O, not through a memory map.

Why: every page a process touches through a memory map counts in its resident set size until
the map is dropped. The train stage's trunk cache at 640 px reads ~1.7 GB of preprocessed pixels
and writes ~2.2 GB of features; through memory maps those pages added ~3.9 GB to the stage's
peak RSS (7.0 GiB measured, against the 6 GiB goal) on top of the trunk's activations. Read and
written with ``pread``/``pwrite`` the same bytes pass through the kernel's page cache (shared,
reclaimable) and the process holds one batch. numpy has no row-wise positional I/O for ``.npy``
files, hence this small module; the header is parsed by numpy's own ``numpy.lib.format``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np


class NpyRows:
    """Row ``i`` of a C-ordered ``.npy`` array: the block at the leading indices ``i`` (``lead`` of them)."""

    def __init__(self, path: Path | str, lead: int = 1, writable: bool = False) -> None:
        self._fd = -1  # set before anything can fail: __del__ closes it
        self.path = Path(path)
        with open(self.path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            self.offset = f.tell()
        if fortran:
            raise ValueError(f"{self.path.name}: Fortran-ordered arrays are not supported")
        self.shape, self.dtype, self.lead = tuple(shape), np.dtype(dtype), int(lead)
        self.row_shape = self.shape[self.lead :]
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self._fd = os.open(self.path, os.O_RDWR if writable else os.O_RDONLY)

    @classmethod
    def of(cls, array: np.ndarray, lead: int = 1) -> NpyRows | None:
        """The file behind a memory map that ``np.load(..., mmap_mode=...)`` returned (``None`` for anything else)."""
        if not isinstance(array, np.memmap) or not array.filename or not array.flags.c_contiguous:
            return None
        rows = cls(array.filename, lead=lead)
        same = rows.shape == array.shape and rows.dtype == array.dtype and rows.offset == array.offset
        return rows if same else None

    def _position(self, index: int | Sequence[int]) -> int:
        flat = int(np.ravel_multi_index(tuple(np.atleast_1d(index)), self.shape[: self.lead]))
        return self.offset + flat * self.row_bytes

    def read(self, indices: Sequence[int | Sequence[int]]) -> np.ndarray:
        """The rows at ``indices`` (each an int, or a tuple of ``lead`` ints), stacked."""
        out = np.empty((len(indices), *self.row_shape), dtype=self.dtype)
        for j, index in enumerate(indices):
            data = os.pread(self._fd, self.row_bytes, self._position(index))
            if len(data) != self.row_bytes:
                raise OSError(f"{self.path.name}: short read at row {index}")
            out[j] = np.frombuffer(data, dtype=self.dtype).reshape(self.row_shape)
        return out

    def write(self, index: int | Sequence[int], row: np.ndarray) -> None:
        """Store ``row`` (cast to the file's dtype) at ``index``."""
        data = np.ascontiguousarray(row, dtype=self.dtype).reshape(self.row_shape).tobytes()
        if os.pwrite(self._fd, data, self._position(index)) != len(data):
            raise OSError(f"{self.path.name}: short write at row {index}")

    def sync(self) -> None:
        """Force the written rows to disk (before a progress marker says they are there)."""
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()


def read_rows(array: np.ndarray, rows: Sequence[int | tuple[int, ...]], lead: int = 1) -> np.ndarray:
    """``array[rows]`` (with ``lead`` = 2: ``array[v, k]`` for each ``(v, k)``), by positional reads when
    ``array`` is a memory-mapped ``.npy`` (see the module docstring)."""
    file_rows = NpyRows.of(array, lead)
    if file_rows is None:
        if lead == 1:
            return np.asarray(array[[int(r) for r in rows]])
        return np.stack([array[tuple(r)] for r in rows])
    try:
        return file_rows.read([tuple(int(i) for i in r) if isinstance(r, tuple) else int(r) for r in rows])
    finally:
        file_rows.close()
