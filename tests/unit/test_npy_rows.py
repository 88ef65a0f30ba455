"""Row I/O of .npy files without memory maps (:mod:`bonefrac.npy_rows`).

The rows must be the array's own (a wrong offset, row size or index order would feed the trunk
other images), writes must land where a memory map reads them back, and reading must not leave
the file's pages in the process's resident set (the reason the module exists: the train stage's
peak RSS at 640 px)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from bonefrac.npy_rows import NpyRows, read_rows


def _rss_file_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile"))


def test_rows_read_and_written_are_the_arrays_own(tmp_path):
    a = np.random.default_rng(0).random((5, 1, 6, 7)).astype(np.float16)
    np.save(tmp_path / "a.npy", a)
    mm = np.load(tmp_path / "a.npy", mmap_mode="r")
    np.testing.assert_array_equal(read_rows(mm, [3, 0, 3]), a[[3, 0, 3]])
    np.testing.assert_array_equal(read_rows(a, [4, 1]), a[[4, 1]])  # a plain array: plain indexing
    assert NpyRows.of(a) is None and NpyRows.of(mm[1:]) is None  # not the file's own layout: no positional reads

    feats = np.lib.format.open_memmap(tmp_path / "f.npy", mode="w+", dtype=np.float16, shape=(2, 4, 3, 2, 2))
    feats.flush()
    del feats
    rows = NpyRows(tmp_path / "f.npy", lead=2, writable=True)
    rng = np.random.default_rng(1)
    want = np.zeros((2, 4, 3, 2, 2), dtype=np.float16)
    for v, k in [(1, 2), (0, 3), (1, 0)]:
        want[v, k] = rng.random((3, 2, 2))
        rows.write((v, k), want[v, k].astype(np.float32))  # cast to the file's dtype
    rows.sync()
    rows.close()
    np.testing.assert_array_equal(np.load(tmp_path / "f.npy"), want)
    back = np.load(tmp_path / "f.npy", mmap_mode="r")
    np.testing.assert_array_equal(read_rows(back, [(1, 2), (0, 3)], lead=2), want[[1, 0], [2, 3]])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RssFile is Linux's /proc accounting")
def test_positional_reads_leave_no_pages_in_the_resident_set(tmp_path):
    a = np.ones((64, 1, 512, 512), dtype=np.float16)  # 32 MiB
    np.save(tmp_path / "big.npy", a)
    del a
    mm = np.load(tmp_path / "big.npy", mmap_mode="r")
    before = _rss_file_kib()
    got = read_rows(mm, range(64))
    assert got.shape == (64, 1, 512, 512) and float(got.sum(dtype=np.float64)) == 64 * 512 * 512
    after_positional = _rss_file_kib()
    mapped = np.asarray(mm[list(range(64))])  # the memory map touches every page
    after_mapped = _rss_file_kib()
    assert mapped.shape == got.shape
    assert after_mapped - after_positional > 24 * 1024  # the measurement sees mapped pages
    assert after_positional - before < 4 * 1024
