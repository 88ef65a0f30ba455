"""The preprocessed-tensor cache: decode and preprocess once, train from memory-mapped float16.

Decoding JPEG/PNG/DICOM and percentile-windowing a 1,440 px radiograph costs far
more than a training step of a small network on its 128 px result, so the
deterministic half of preprocessing (``bonefrac.model.transforms``) runs
once here and every epoch reads one memory-mapped ``images.npy``. One file (not
one file per image) keeps DVC fast and lets DataLoader workers share pages
through the OS cache. float16 halves the disk/RAM footprint; values on [0, 1]
keep ~3 significant digits, far finer than the 8-bit steps of the sources.

Layout of ``out_dir``:

- ``images.npy``: float16, ``(N, 1, S, S)`` or ``(N, 1, D, H, W)``
- ``index.csv``: the input rows plus ``cache_row`` (row in ``images.npy``)
- ``cache.json``: the :class:`PreprocessSpec` it was built with, copied into the
  model bundle so inference preprocesses exactly like training.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bonefrac.atomic import atomic_path, atomic_write_text
from bonefrac.config import resolve
from bonefrac.errors import BonefracError
from bonefrac.model.transforms import PreprocessSpec

log = logging.getLogger(__name__)

IMAGES_FILE = "images.npy"
INDEX_FILE = "index.csv"
META_FILE = "cache.json"
CACHE_ROW = "cache_row"
CACHE_FORMAT = "bonefrac-cache/2"

ReadFn = Callable[[str], Any]


class CacheError(BonefracError, RuntimeError):
    """The cache cannot be built or read; the message names the file or column at fault."""


def _default_read(source: str, spec: PreprocessSpec) -> Any:
    # Imported lazily: the decoder lives in another area and pulls in pydicom/nibabel.
    from bonefrac.data.imageio import read_image

    # Table paths are relative to the project root; the spec says at which scale a JPEG is
    # decoded (its definition, shared with `bonefrac predict` and the service).
    return read_image(resolve(source), max_side_hint=spec.decode_side_hint)


def _as_array(decoded: Any) -> np.ndarray:
    """Accept a ``DecodedImage`` (``.array``) or a bare array from a custom ``read_fn``."""
    arr = getattr(decoded, "array", decoded)
    return np.asarray(arr, dtype=np.float32)


def _process_one(path: str, read_fn: ReadFn | None, spec: PreprocessSpec) -> np.ndarray:
    try:
        decoded = read_fn(path) if read_fn is not None else _default_read(path, spec)
        out = spec.apply(_as_array(decoded))
    except Exception as err:  # the decoder's own errors are already clear; add which file
        raise CacheError(f"cannot preprocess {path}: {type(err).__name__}: {err}") from err
    return out.numpy().astype(np.float16)


def _worker(args: tuple[Any, ...]) -> tuple[int, np.ndarray]:
    i, *rest = args
    return i, _process_one(*rest)


def build_cache(
    df: pd.DataFrame,
    out_dir: Path,
    spec: PreprocessSpec,
    read_fn: ReadFn | None = None,
    workers: int = 1,
) -> Path:
    """Decode + preprocess every row of ``df`` with ``spec`` into ``out_dir/images.npy`` and ``index.csv``.

    ``df`` needs a ``path`` column (and usually ``split``, ``label``); every
    column is kept in ``index.csv``. ``read_fn(path)`` returns a ``DecodedImage``
    or an array; it defaults to ``bonefrac.data.imageio.read_image`` at the spec's
    ``decode_side_hint`` (a custom reader must honour it too). With
    ``workers > 1`` images are decoded in a process pool (``read_fn`` must then
    be picklable, i.e. a module-level function). Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    if "path" not in df.columns:
        raise CacheError(f"build_cache needs a 'path' column; got columns {list(df.columns)}")
    if len(df) == 0:
        raise CacheError("build_cache got an empty table: nothing to cache")
    spec.check_version()
    out_dir.mkdir(parents=True, exist_ok=True)
    shape = spec.input_shape
    rows = df.reset_index(drop=True)
    paths = [str(p) for p in rows["path"]]

    with atomic_path(out_dir / IMAGES_FILE) as tmp:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(len(rows), *shape))
        if workers > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                jobs = ((i, p, read_fn, spec) for i, p in enumerate(paths))
                for i, arr in pool.map(_worker, jobs, chunksize=8):
                    mm[i] = arr
        else:
            for i, p in enumerate(paths):
                mm[i] = _process_one(p, read_fn, spec)
        mm.flush()
        del mm

    index = rows.copy()
    index[CACHE_ROW] = np.arange(len(index))
    atomic_write_text(out_dir / INDEX_FILE, index.to_csv(index=False))
    meta = {"format": CACHE_FORMAT, "n": len(index), "shape": list(shape), "spec": spec.model_dump(mode="json")}
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


def cache_spec(out_dir: Path) -> PreprocessSpec:
    """The :class:`PreprocessSpec` the cache was built with (read from ``cache.json``)."""
    p = Path(out_dir) / META_FILE
    if not p.exists():
        raise CacheError(f"{p} is missing: rebuild the cache (run the preprocess stage)")
    meta = json.loads(p.read_text())
    if meta.get("format") != CACHE_FORMAT:
        raise CacheError(f"{p} is an older cache format ({meta.get('format')!r}): rerun the preprocess stage")
    return PreprocessSpec.model_validate(meta["spec"])


def cache_version(out_dir: Path) -> str:
    """Short hash of ``index.csv`` and ``cache.json``: which rows, labels, splits and preprocessing.

    A training checkpoint records it so a resume never continues across data
    versions (``images.npy`` is a function of those two files, so it is not read).
    """
    h = hashlib.sha256()
    for name in (INDEX_FILE, META_FILE):
        p = Path(out_dir) / name
        h.update(name.encode() + b"\0" + (p.read_bytes() if p.exists() else b"") + b"\0")
    return h.hexdigest()[:16]
