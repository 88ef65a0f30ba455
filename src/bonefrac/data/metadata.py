"""The per-image metadata table: read every image once and record what it contains.

Validation (Great Expectations), splits and drift monitoring all work on this
table instead of re-reading images, so it records everything they need: content
hashes (exact duplicates), a perceptual hash (near-duplicates, split groups),
geometry, stored bit depth, format, modality, intensity statistics and, above
all, whether the image decodes completely and if not, why.

Intensity statistics are on [0, 1]-scaled intensities: divided by the nominal
range of the stored values (``DecodedImage.meta["value_range"]``, e.g. 0..65535 for a
16-bit PNG, the rescaled stored range for DICOM), or, when only the data can
tell (float images, NIfTI), between its 0.5th and 99.5th percentiles.

:func:`build_metadata_table` never raises for a bad file: the row gets
``decodes_ok=False`` and ``decode_error`` says why; size fields are 0, statistics NaN,
``phash`` empty.
"""

from __future__ import annotations

import hashlib
import math
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from bonefrac.config import project_root, resolve
from bonefrac.data.imageio import DecodedImage, ImageDecodeError, accepted_modalities, read_image, sniff_format
from bonefrac.data.ingest_cache import IngestCache, content_sha256
from bonefrac.data.schema import INTAKE_ERROR, MANIFEST_COLUMNS, METADATA_COLUMNS, RECORD_COLUMNS

_STATS_MAX_PIXELS = 1_000_000  # statistics on a strided subsample: same numbers to ~1e-3, 2-4x faster


def _hash_path(path: Path) -> tuple[str, int, bytes | None]:
    """sha256, size in bytes and (for files) the bytes themselves, read once and reused for decoding."""
    h = hashlib.sha256()
    if path.is_dir():  # a DICOM series: hash of the sorted (relative name, content) pairs
        total = 0
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            data = f.read_bytes()
            h.update(f.relative_to(path).as_posix().encode() + b"\x00")
            h.update(hashlib.sha256(data).digest())
            total += len(data)
        return h.hexdigest(), total, None
    data = path.read_bytes()
    h.update(data)
    return h.hexdigest(), len(data), data


def scaled_intensities(img: DecodedImage) -> np.ndarray:
    arr = img.array
    if arr.size > _STATS_MAX_PIXELS:
        if arr.ndim == 2:
            step = math.ceil(math.sqrt(arr.size / _STATS_MAX_PIXELS))
            arr = arr[::step, ::step]
        else:
            step = math.ceil(arr.size / _STATS_MAX_PIXELS)
            arr = arr.reshape(-1)[::step]
    arr = arr.astype(np.float32, copy=False)
    vr = img.meta.get("value_range")
    if vr is not None and vr[1] > vr[0]:
        lo, hi = float(vr[0]), float(vr[1])
    else:
        finite = arr[np.isfinite(arr)]
        if finite.size == 0:
            return np.zeros(1, np.float32)
        lo, hi = (float(v) for v in np.percentile(finite, [0.5, 99.5]))
        if hi <= lo:
            hi = lo + 1.0
    return np.clip((arr - lo) / (hi - lo), 0.0, 1.0)


def perceptual_hash(img: DecodedImage) -> str:
    """imagehash.phash of the image (middle slice for volumes) as 16 hex digits.

    The image is first mapped to 8 bits over its nominal range and box-reduced to about
    128 px on its short side: phash only looks at a 32 × 32 DCT, and Lanczos-resizing a
    full 3,000 px radiograph to 32 px inside imagehash cost most of ingest time. Every
    consumer of the ``phash`` column (near-duplicate checks, split groups) uses this function.
    """
    arr = img.array if img.array.ndim == 2 else img.array[img.array.shape[0] // 2]
    vr = img.meta.get("value_range")
    if vr is not None and vr[1] > vr[0]:
        lo, hi = float(vr[0]), float(vr[1])
    else:
        step = max(1, math.ceil(math.sqrt(arr.size / _STATS_MAX_PIXELS)))
        lo, hi = (float(v) for v in np.percentile(arr[::step, ::step], [0.5, 99.5]))
        hi = hi if hi > lo else lo + 1.0
    g = np.clip((arr - np.float32(lo)) * np.float32(255.0 / (hi - lo)), 0, 255).astype(np.uint8)
    im = Image.fromarray(g)
    factor = min(im.size) // 128
    if factor > 1:
        im = im.reduce(factor)
    return str(imagehash.phash(im))


def _empty_metadata(error: str, sha: str = "", size: int = 0, fmt: str = "unknown") -> dict[str, Any]:
    return {
        "sha256": sha,
        "phash": "",
        "width": 0,
        "height": 0,
        "depth": 0,
        "spatial_dims": 0,
        "channels": 0,
        "bit_depth": 0,
        "format": fmt,
        "modality": "",
        "file_size": size,
        "intensity_mean": float("nan"),
        "intensity_std": float("nan"),
        "intensity_p01": float("nan"),
        "intensity_p99": float("nan"),
        "decodes_ok": False,
        "decode_error": error,
    }


def describe_image(
    path: str, max_pixels: int | None = None, expected_dims: int | None = None
) -> dict[str, Any]:
    """The METADATA_COLUMNS of one file or series folder; never raises (errors become ``decode_error``).

    A relative ``path`` is relative to the project root (as the ingest table stores it).

    With ``expected_dims``, an image of the other dimensionality is described in full but
    marked ``decodes_ok=False`` ("a 3D volume where a 2D image is expected"), and DICOM of a
    modality the model of that dimensionality cannot use is refused naming the modality
    (:func:`bonefrac.data.imageio.accepted_modalities`: the same policy as ``bonefrac predict``
    and the service, so a file gets the same verdict at ingest and at inference).
    """
    if not path:
        return _empty_metadata("no path given")
    p = resolve(path)  # a relative path is relative to the project root
    try:
        if not p.exists():
            return _empty_metadata("file not found")  # no name: it may identify a patient
        sha, size, data = _hash_path(p)
    except OSError as err:
        return _empty_metadata(f"cannot read file: {err.strerror or type(err).__name__}")
    fmt = "dicom_series" if data is None else sniff_format(data[:1024])
    fmt = fmt if fmt not in ("empty", "text") else "unknown"
    try:
        img = read_image(
            data if data is not None else p,
            max_pixels=max_pixels,
            modalities=accepted_modalities(None, expected_dims),
        )
    except ImageDecodeError as err:
        return _empty_metadata(str(err), sha, size, fmt)
    except MemoryError:
        return _empty_metadata("out of memory while decoding", sha, size, fmt)
    except Exception as err:  # a reader bug must not stop ingest of thousands of files
        return _empty_metadata(f"unexpected decoder error: {type(err).__name__}: {err}", sha, size, fmt)
    arr = img.array
    dims_error = ""
    if expected_dims is not None and img.spatial_dims != expected_dims:
        dims_error = (
            f"a 3D volume where a 2D image is expected (shape {tuple(arr.shape)})"
            if img.spatial_dims == 3
            else f"a 2D image where a 3D volume is expected (shape {tuple(arr.shape)})"
        )
    scaled = scaled_intensities(img)
    p01, p99 = (float(v) for v in np.percentile(scaled, [1, 99]))
    try:
        ph = perceptual_hash(img)
    except Exception:
        ph = ""
    return {
        "sha256": sha,
        "phash": ph,
        "width": int(arr.shape[-1]),
        "height": int(arr.shape[-2]),
        "depth": int(arr.shape[0]) if arr.ndim == 3 else 1,
        "spatial_dims": int(img.spatial_dims),
        "channels": int(img.channels),
        "bit_depth": int(img.bit_depth),
        "format": img.format,
        "modality": img.modality,
        "file_size": int(size),
        "intensity_mean": float(scaled.mean()),
        "intensity_std": float(scaled.std()),
        "intensity_p01": p01,
        "intensity_p99": p99,
        "decodes_ok": bool(img.complete) and dims_error == "",
        "decode_error": dims_error,
    }


def _describe_all(
    paths: list[str], max_pixels: int | None, workers: int, expected_dims: int | None
) -> list[dict[str, Any]]:
    """describe_image of every path, in order; ``workers`` processes when there is enough work."""
    results: list[dict[str, Any]] = []
    with tqdm(total=len(paths), desc="reading images", unit="img", mininterval=1.0) as bar:
        if workers <= 1 or len(paths) < 2 * workers:
            for p in paths:
                results.append(describe_image(p, max_pixels, expected_dims))
                bar.update(1)
        else:
            chunk = 8
            batches = [(paths[i : i + chunk], max_pixels, expected_dims) for i in range(0, len(paths), chunk)]
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for out in pool.map(_describe_many, batches):
                    results.extend(out)
                    bar.update(len(out))
    return results


def _describe_many(args: tuple[list[str], int | None, int | None]) -> list[dict[str, Any]]:
    paths, max_pixels, expected_dims = args
    return [describe_image(p, max_pixels, expected_dims) for p in paths]


def _content_key(path: str, root: Path) -> str | None:
    """The cache key of a table path: SHA-256 of the file (or series folder); None when unreadable."""
    if not path:
        return None
    p = resolve(path, root)
    try:
        if p.is_dir():
            return _hash_path(p)[0]
        return content_sha256(p) if p.is_file() else None
    except OSError:
        return None


def build_metadata_table(
    records: pd.DataFrame,
    max_pixels: int | None = None,
    workers: int = 1,
    expected_dims: int | None = None,
    cache: IngestCache | None = None,
) -> pd.DataFrame:
    """Read every image of ``records`` (RECORD_COLUMNS) and return the MANIFEST_COLUMNS table.

    ``expected_dims`` (2 for radiograph pipelines, 3 for volume pipelines) marks images of
    the other kind undecodable, with their geometry still recorded. Rows with a non-empty
    ``intake_error`` column (refused at intake) are not read: that text is their ``decode_error``.
    ``workers > 1`` decodes in that many processes (decoding is CPU-bound; threads would
    contend for the GIL in the numpy/imagehash parts). Row order is kept. A progress bar
    is shown on stderr. With a ``cache`` (built with the same ``max_pixels`` and
    ``expected_dims``), a file whose content was described before is only hashed, not decoded:
    its row comes from the cache, identical to a fresh one.
    """
    missing = [c for c in RECORD_COLUMNS if c not in records.columns]
    if missing:
        raise ValueError(f"records lack column(s) {missing}")
    refused = (
        records[INTAKE_ERROR].fillna("").astype(str).tolist() if INTAKE_ERROR in records.columns else []
    )
    paths = [str(p) for p in records["path"].fillna("")]
    if refused:
        paths = ["" if r else p for p, r in zip(paths, refused, strict=True)]
    results: list[dict[str, Any] | None] = [None] * len(paths)
    keys: list[str | None] = [None] * len(paths)
    if cache is not None:
        root = project_root()
        for k, p in enumerate(paths):
            keys[k] = _content_key(p, root)
            results[k] = cache.get("meta", keys[k]) if keys[k] else None
    todo = [k for k, r in enumerate(results) if r is None]
    new = _describe_all([paths[k] for k in todo], max_pixels, workers, expected_dims)
    for k, row in zip(todo, new, strict=True):
        results[k] = row
        if cache is not None and keys[k] is not None and row["sha256"] == keys[k]:  # the bytes that were read
            cache.put("meta", str(keys[k]), row)
    for k, reason in enumerate(refused):
        if reason:
            results[k] = _empty_metadata(reason)
    meta = pd.DataFrame(results, columns=METADATA_COLUMNS)
    table = pd.concat([records[RECORD_COLUMNS].reset_index(drop=True), meta], axis=1)
    for col in ("width", "height", "depth", "spatial_dims", "channels", "bit_depth", "file_size"):
        table[col] = table[col].astype(int)
    table["decodes_ok"] = table["decodes_ok"].astype(bool)
    return table[MANIFEST_COLUMNS]
