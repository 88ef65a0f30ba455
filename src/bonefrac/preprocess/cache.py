"""The preprocessed-tensor cache: decode and preprocess once, train from memory-mapped float16.

Decoding JPEG/PNG/DICOM and percentile-windowing a 1,440 px radiograph costs far
more than a training step of a small network on its 128 px result, so the
deterministic half of preprocessing (``bonefrac.preprocess.transforms``) runs
once here and every epoch reads one memory-mapped ``images.npy``. One file (not
one file per image) keeps DVC fast and lets DataLoader workers share pages
through the OS cache. float16 halves the disk/RAM footprint; values on [0, 1]
keep ~3 significant digits, far finer than the 8-bit steps of the sources.

Layout of ``out_dir``:

- ``images.npy``: float16, ``(N, 1, S, S)`` or ``(N, 1, D, H, W)``
- ``index.csv``: the input rows plus ``cache_row`` (row in ``images.npy``)
- ``cache.json``: the preprocessing settings, copied into the model bundle so
  inference preprocesses exactly like training.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bonefrac.atomic import atomic_write_text
from bonefrac.config import resolve
from bonefrac.preprocess.transforms import preprocess_array

log = logging.getLogger(__name__)

IMAGES_FILE = "images.npy"
INDEX_FILE = "index.csv"
META_FILE = "cache.json"
CACHE_ROW = "cache_row"
CACHE_FORMAT = "bonefrac-cache/1"

ReadFn = Callable[[str], Any]


class CacheError(RuntimeError):
    """The cache cannot be built or read; the message names the file or column at fault."""


def _default_read(source: str) -> Any:
    # Imported lazily: the decoder lives in another area and pulls in pydicom/nibabel.
    from bonefrac.data.imageio import read_image

    return read_image(resolve(source))  # table paths are relative to the project root


def _as_array(decoded: Any) -> np.ndarray:
    """Accept a ``DecodedImage`` (``.array``) or a bare array from a custom ``read_fn``."""
    arr = getattr(decoded, "array", decoded)
    return np.asarray(arr, dtype=np.float32)


def _process_one(
    path: str,
    read_fn: ReadFn | None,
    spatial_dims: int,
    image_size: int,
    volume_size: Sequence[int],
    lower: float,
    upper: float,
) -> np.ndarray:
    reader = read_fn or _default_read
    try:
        arr = _as_array(reader(path))
        out = preprocess_array(arr, spatial_dims, image_size, volume_size, lower, upper)
    except Exception as err:  # the decoder's own errors are already clear; add which file
        raise CacheError(f"cannot preprocess {path}: {type(err).__name__}: {err}") from err
    return out.numpy().astype(np.float16)


def _worker(args: tuple[Any, ...]) -> tuple[int, np.ndarray]:
    i, *rest = args
    return i, _process_one(*rest)


def build_cache(
    df: pd.DataFrame,
    out_dir: Path,
    spatial_dims: int,
    image_size: int,
    volume_size: Sequence[int] = (32, 64, 64),
    lower_percentile: float = 0.5,
    upper_percentile: float = 99.5,
    read_fn: ReadFn | None = None,
    workers: int = 1,
) -> Path:
    """Decode + preprocess every row of ``df`` into ``out_dir/images.npy`` and ``index.csv``.

    ``df`` needs a ``path`` column (and usually ``split``, ``label``); every
    column is kept in ``index.csv``. ``read_fn(path)`` returns a ``DecodedImage``
    or an array; it defaults to ``bonefrac.data.imageio.read_image``. With
    ``workers > 1`` images are decoded in a process pool (``read_fn`` must then
    be picklable, i.e. a module-level function). Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    if "path" not in df.columns:
        raise CacheError(f"build_cache needs a 'path' column; got columns {list(df.columns)}")
    if spatial_dims not in (2, 3):
        raise CacheError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if len(df) == 0:
        raise CacheError("build_cache got an empty table: nothing to cache")
    out_dir.mkdir(parents=True, exist_ok=True)
    shape: tuple[int, ...] = (1, image_size, image_size) if spatial_dims == 2 else (1, *map(int, volume_size))
    rows = df.reset_index(drop=True)
    paths = [str(p) for p in rows["path"]]
    common = (read_fn, spatial_dims, image_size, tuple(volume_size), lower_percentile, upper_percentile)

    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{IMAGES_FILE}.", suffix=".tmp.npy")
    os.close(fd)
    try:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(len(rows), *shape))
        if workers > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                jobs = ((i, p, *common) for i, p in enumerate(paths))
                for i, arr in pool.map(_worker, jobs, chunksize=8):
                    mm[i] = arr
        else:
            for i, p in enumerate(paths):
                mm[i] = _process_one(p, *common)
        mm.flush()
        del mm
        os.replace(tmp, out_dir / IMAGES_FILE)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)

    index = rows.copy()
    index[CACHE_ROW] = np.arange(len(index))
    atomic_write_text(out_dir / INDEX_FILE, index.to_csv(index=False))
    meta = {
        "format": CACHE_FORMAT,
        "n": len(index),
        "shape": list(shape),
        "spatial_dims": spatial_dims,
        "image_size": image_size,
        "volume_size": [int(v) for v in volume_size],
        "lower_percentile": lower_percentile,
        "upper_percentile": upper_percentile,
    }
    atomic_write_text(out_dir / META_FILE, json.dumps(meta, indent=2))
    log.info("cached %d images of shape %s in %s", len(index), shape, out_dir)
    return out_dir


def load_cache(out_dir: Path) -> tuple[np.ndarray, pd.DataFrame]:
    """Open ``images.npy`` memory-mapped (read-only) and read ``index.csv``."""
    out_dir = Path(out_dir)
    img, idx = out_dir / IMAGES_FILE, out_dir / INDEX_FILE
    for f in (img, idx):
        if not f.exists():
            raise CacheError(f"preprocessed cache incomplete: {f} is missing (run the preprocess stage)")
    images = np.load(img, mmap_mode="r")
    # keep_default_na=False: empty fracture_type stays "" (not NaN), as the schema says.
    index = pd.read_csv(idx, keep_default_na=False)
    if CACHE_ROW not in index.columns:
        raise CacheError(f"{idx} has no '{CACHE_ROW}' column; not a bonefrac cache")
    if len(index) and int(index[CACHE_ROW].max()) >= len(images):
        top = int(index[CACHE_ROW].max())
        raise CacheError(f"{idx} refers to row {top} but {img} has {len(images)} rows")
    return images, index


def cache_settings(out_dir: Path) -> dict[str, Any]:
    """The preprocessing settings the cache was built with ({} for a cache without ``cache.json``)."""
    p = Path(out_dir) / META_FILE
    return json.loads(p.read_text()) if p.exists() else {}
