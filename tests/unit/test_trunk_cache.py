"""The train stage's trunk cache resumes an interrupted build and stores each view where it belongs.

`build_trunk_cache` writes rows by positional I/O and marks them done only after they are synced: a
build killed half-way must resume with the passes it had not made (not redo them, not skip any), and
finish with the same bytes as a build that was never interrupted. A finished cache is only read.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bonefrac.training.feature_cache import build_trunk_cache

SHAPES = [(2, 2, 2), (3, 1, 1)]


def _fake_trunk(calls: list[int], fail_after: int | None = None):
    """A deterministic stand-in for the trunk: pooled pixels (so a mirror gives other numbers)."""

    def run(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if fail_after is not None and len(calls) >= fail_after:
            raise KeyboardInterrupt("killed")
        calls.append(len(x))
        s16 = torch.nn.functional.adaptive_avg_pool2d(x, 2).repeat(1, 2, 1, 1)
        s32 = torch.stack([x.mean((1, 2, 3)), x[..., : x.shape[-1] // 2].mean((1, 2, 3)), x.amax((1, 2, 3))], 1)
        return s16, s32[..., None, None]

    return run


@pytest.fixture
def images(tmp_path):
    a = np.random.default_rng(0).random((40, 1, 8, 8)).astype(np.float16)
    np.save(tmp_path / "images.npy", a)
    return np.load(tmp_path / "images.npy", mmap_mode="r")


def test_an_interrupted_build_resumes_with_the_missing_passes_and_the_same_bytes(tmp_path, images):
    rows = np.array([5, 1, 30, 7, 12, 2, 33, 9, 20, 3])
    mirror = np.array([True] * 6 + [False] * 4)  # 16 passes
    whole = build_trunk_cache(images, rows, mirror, tmp_path / "whole", _fake_trunk([]), SHAPES, batch_size=2)

    calls: list[int] = []
    with pytest.raises(KeyboardInterrupt):
        build_trunk_cache(images, rows, mirror, tmp_path / "resumed", _fake_trunk(calls, fail_after=3), SHAPES,
                          batch_size=2)  # fmt: skip
    done = np.load(tmp_path / "resumed" / "done.npy")
    assert int(done.sum()) == 0  # progress is saved every 20 batches: nothing was marked yet
    resumed_calls: list[int] = []
    resumed = build_trunk_cache(images, rows, mirror, tmp_path / "resumed", _fake_trunk(resumed_calls), SHAPES,
                                batch_size=2)  # fmt: skip
    assert sum(resumed_calls) == 16
    again: list[int] = []
    build_trunk_cache(images, rows, mirror, tmp_path / "resumed", _fake_trunk(again), SHAPES, batch_size=2)
    assert again == []  # a finished cache runs nothing
    for name in ("s16", "s32"):
        np.testing.assert_array_equal(getattr(resumed, name), getattr(whole, name))
    want = _fake_trunk([])(torch.from_numpy(np.asarray(images[[30]], dtype=np.float32)).flip(-1))[1]
    np.testing.assert_allclose(whole.s32[1, 2], want[0].numpy(), atol=1e-3)  # view 1 = the mirror of rows[2]
    assert not whole.s32[1, 8].any()  # rows without a mirror keep zeros in view 1


def test_a_build_killed_after_a_checkpoint_keeps_what_it_marked(tmp_path, images):
    rows = np.arange(40)
    mirror = np.zeros(40, dtype=bool)
    calls: list[int] = []
    with pytest.raises(KeyboardInterrupt):  # batches of 1: the checkpoint after 20 batches is passed
        build_trunk_cache(images, rows, mirror, tmp_path / "c", _fake_trunk(calls, fail_after=25), SHAPES,
                          batch_size=1)  # fmt: skip
    assert int(np.load(tmp_path / "c" / "done.npy").sum()) == 20
    more: list[int] = []
    resumed = build_trunk_cache(images, rows, mirror, tmp_path / "c", _fake_trunk(more), SHAPES, batch_size=1)
    assert sum(more) == 20
    whole = build_trunk_cache(images, rows, mirror, tmp_path / "w", _fake_trunk([]), SHAPES, batch_size=1)
    np.testing.assert_array_equal(resumed.s16, whole.s16)


@pytest.mark.parametrize("damage", ["truncate", "delete", "reshape"])
def test_a_damaged_finished_cache_is_rebuilt_not_read(tmp_path, images, damage):
    """A disk that filled up or a copy cut short leaves a features file `done.npy` still vouches for:
    the build notices it and rebuilds, instead of the evaluate stage failing on a short read (or reading
    zeros as features)."""
    rows, mirror = np.arange(6), np.ones(6, dtype=bool)
    whole = build_trunk_cache(images, rows, mirror, tmp_path / "c", _fake_trunk([]), SHAPES, batch_size=4)
    kept = np.array(whole.s16)
    del whole
    path = tmp_path / "c" / "s16.npy"
    if damage == "truncate":
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size - 7)
    elif damage == "delete":
        path.unlink()
    else:
        np.save(path, np.zeros((2, 6, 2, 1, 1), dtype=np.float16))
    messages: list[str] = []
    calls: list[int] = []
    again = build_trunk_cache(images, rows, mirror, tmp_path / "c", _fake_trunk(calls), SHAPES, batch_size=4,
                              progress=messages.append)  # fmt: skip
    assert sum(calls) == 12 and any("damaged" in m for m in messages)
    np.testing.assert_array_equal(again.s16, kept)


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_a_file_that_is_not_an_npy_array_is_refused_cleanly(tmp_path):
    import gc

    from bonefrac.npy_rows import NpyRows

    (tmp_path / "bad.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(ValueError) as refused:
        NpyRows(tmp_path / "bad.npy")
    del refused  # the traceback held the half-built object: its __del__ must not raise
    gc.collect()
