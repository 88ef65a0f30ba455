"""The drift reference: what the champion was trained on, as a feature table.

Built from the training split of the preprocessed cache: image statistics are
read from the original files (the cache holds windowed tensors, in which
exposure no longer shows), the score and the embedding from the model run on
the cached tensors (exactly what it saw in training). The PCA of the embedding
is fitted here and stored next to the table, so current batches are projected
onto the same axes.

Layout of ``out_dir``: ``reference.csv`` (one row per image), ``pca.json``,
``reference.json`` (provenance: model, data, row count).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd

from bonefrac.config import resolve
from bonefrac.errors import BonefracError
from bonefrac.inference.cache_outputs import CacheOutputs
from bonefrac.inference.predictor import Predictor
from bonefrac.model.bundle import ModelBundle
from bonefrac.monitoring.features import (
    IMAGE_COLUMNS,
    EmbeddingReducer,
    image_features,
    model_outputs,
    score_frame,
)
from bonefrac.monitoring.io import atomic_write_text, read_table, write_table

REFERENCE_CSV = "reference.csv"
PCA_JSON = "pca.json"
META_JSON = "reference.json"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".nii", ".gz"}

ReadFn = Callable[[str], Any]
T = TypeVar("T")


class ReferenceError(BonefracError):
    """The reference cannot be built or read."""


@dataclass
class Reference:
    table: pd.DataFrame
    reducer: EmbeddingReducer | None
    meta: dict[str, Any]


def _read(path: str, max_side_hint: int | None = None) -> Any:
    from bonefrac.data.imageio import read_image

    return read_image(path, max_side_hint=max_side_hint)


def map_decoded(
    paths: Sequence[str], fn: Callable[[np.ndarray, int, Any], T], read_fn: ReadFn | None = None
) -> tuple[list[T | None], list[str]]:
    """``fn(array, bit_depth, value_range)`` of each file, decoded one at a time; ``None`` where it
    does not decode, and why not.

    Only ``fn``'s result is kept: a full-resolution radiograph is ~1 MB of float32 on average on
    FracAtlas (up to 27 MB), and holding a thousand of them at once for a reference was the
    evaluate stage's largest allocation. Undecodable files are skipped, not fatal: a drift check
    must not stop on one bad file. Each skipped file is named by its position in ``paths`` and the
    error's type only, e.g. ``"image 3 of 40: UnidentifiedImageError"``: a hospital file name (and
    a decoder's message, which often quotes it) can identify a patient, and these lines reach
    consoles and run logs.
    """
    reader = read_fn or _read
    results: list[T | None] = []
    skipped: list[str] = []
    for i, p in enumerate(paths):
        try:
            img = reader(str(p))
            arr = np.asarray(getattr(img, "array", img), dtype=np.float32)
            bit_depth = int(getattr(img, "bit_depth", 8 if arr.max() <= 255 else 16))
            value_range = (getattr(img, "meta", None) or {}).get("value_range")
        except Exception as err:  # decoder errors are varied; their messages quote the path
            skipped.append(f"image {i + 1} of {len(paths)}: {type(err).__name__}")
            results.append(None)
            continue
        results.append(fn(arr, bit_depth, value_range))
        del img, arr
    return results, skipped


def _image_frame(stats: list[dict[str, float] | None]) -> pd.DataFrame:
    rows = [d if d is not None else {c: np.nan for c in IMAGE_COLUMNS} for d in stats]
    return pd.DataFrame(rows, columns=IMAGE_COLUMNS)


def _features_and_input(bundle: ModelBundle | None) -> Callable[[np.ndarray, int, Any], tuple[dict, Any]]:
    """Per decoded image: its statistics and (with a ``bundle``) the model's input made from it."""

    def one(arr: np.ndarray, bit_depth: int, value_range: Any) -> tuple[dict, Any]:
        x = bundle.preprocess(arr).numpy() if bundle is not None else None
        return image_features(arr, bit_depth, value_range), x

    return one


def split_features(
    cache_dir: str | Path,
    bundle: ModelBundle,
    *,
    split: str,
    reducer: EmbeddingReducer | None = None,
    embedding_dims: int = 0,
    max_rows: int = 1000,
    seed: int = 0,
    read_fn: ReadFn | None = None,
    outputs: CacheOutputs | None = None,
) -> tuple[pd.DataFrame, EmbeddingReducer | None, list[str]]:
    """Feature table of (up to ``max_rows`` of) the ``split`` rows of the cache, the PCA used, skipped files.

    Image statistics from the original files, score and embedding from the model on the cached
    tensors. Without a ``reducer``, one of ``embedding_dims`` axes is fitted on these rows (the
    reference's own); the test split of a run is projected with the reference's. ``outputs``:
    the network's outputs on this cache already computed by an earlier step (the evaluate stage
    shares one); each row goes through the network once either way.
    """
    from bonefrac.preprocess.cache import cache_spec, load_cache

    images, index = load_cache(Path(cache_dir))
    rows = sample_split(index, split, max_rows, seed)
    if rows.empty:
        raise ReferenceError(f"the cache at {cache_dir} has no {split!r} rows to build a reference from")
    from_cache = cache_spec(Path(cache_dir)) == bundle.preprocess_spec
    # Otherwise another model's preprocessing (e.g. a champion trained elsewhere): inputs from the files.
    decoded, skipped = map_decoded(
        [str(resolve(p)) for p in rows["path"]], _features_and_input(None if from_cache else bundle), read_fn
    )
    img_frame = _image_frame([d[0] if d is not None else None for d in decoded])
    if from_cache:
        keep = list(range(len(rows)))
        outputs = outputs if outputs is not None else CacheOutputs(Predictor(bundle), images)
        outputs.check_network(bundle)
        scores = bundle.calibrate(outputs.logits(rows["cache_row"])).prob
        emb = outputs.embeddings(rows["cache_row"])
    else:
        keep = [i for i, d in enumerate(decoded) if d is not None]
        if not keep:
            raise ReferenceError(f"none of the {len(rows)} {split!r} images of {cache_dir} could be read")
        scores, emb = model_outputs(bundle, np.stack([decoded[i][1] for i in keep]))
    if reducer is None and embedding_dims > 0:
        reducer = EmbeddingReducer.fit(emb, embedding_dims, seed) if len(emb) >= 2 else None
    model_frame = score_frame(scores, emb, reducer)
    model_frame.index = keep
    table = pd.concat([img_frame.reset_index(drop=True), model_frame.reindex(range(len(rows)))], axis=1)
    return table, reducer, skipped


def sample_split(index: pd.DataFrame, split: str, max_rows: int, seed: int) -> pd.DataFrame:
    """The ``split`` rows of a cache index (all rows without a split column), at most ``max_rows`` of
    them drawn with ``seed``, in cache order: the drift reference and the OOD detector draw the
    same training sample, so its outputs are computed once."""
    rows = index[index["split"] == split] if "split" in index.columns else index
    if len(rows) > max_rows:
        rows = rows.sample(n=max_rows, random_state=seed).sort_values("cache_row")
    return rows


def build_reference(
    cache_dir: str | Path,
    out_dir: str | Path,
    *,
    bundle: ModelBundle,
    embedding_dims: int,
    split: str = "train",
    max_rows: int = 1000,
    seed: int = 0,
    read_fn: ReadFn | None = None,
    provenance: dict[str, Any] | None = None,
    outputs: CacheOutputs | None = None,
) -> Reference:
    """Feature table of (up to ``max_rows`` of) the ``split`` rows of the cache; written to ``out_dir``.

    ``bundle`` is the champion's, so reference scores are the calibrated
    probabilities the service logs. When the champion preprocesses differently from
    the cache (another input size, e.g. after a manual promotion of a model trained
    elsewhere), its inputs are made from the original files with its own
    ``bundle.preprocess``, so the embedding is always the one the model computes.
    ``outputs``: see :func:`split_features`.
    """
    table, reducer, skipped = split_features(
        cache_dir,
        bundle,
        split=split,
        embedding_dims=embedding_dims,
        max_rows=max_rows,
        seed=seed,
        read_fn=read_fn,
        outputs=outputs,
    )
    meta = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "cache_dir": str(cache_dir),
        "split": split,
        "n_rows": len(table),
        "n_skipped": len(skipped),  # a count only: file names can identify patients
        "embedding_dims": reducer.dims if reducer else 0,
        **(provenance or {}),
    }
    out = Path(out_dir)
    write_table(table, out / REFERENCE_CSV)
    if reducer is not None:
        reducer.save(out / PCA_JSON)
    atomic_write_text(out / META_JSON, json.dumps(meta, indent=2, default=str))
    return Reference(table=table, reducer=reducer, meta=meta)


def load_reference(ref_dir: str | Path) -> Reference:
    """Read a reference written by :func:`build_reference` (or a bare ``reference.csv``)."""
    ref_dir = Path(ref_dir)
    table_path = ref_dir if ref_dir.suffix == ".csv" else ref_dir / REFERENCE_CSV
    folder = table_path.parent
    if not table_path.exists():
        raise ReferenceError(f"no drift reference at {table_path}: build it first (the retrain flow does)")
    reducer = EmbeddingReducer.load(folder / PCA_JSON) if (folder / PCA_JSON).exists() else None
    meta = json.loads((folder / META_JSON).read_text()) if (folder / META_JSON).exists() else {}
    return Reference(table=read_table(table_path), reducer=reducer, meta=meta)


def list_images(folder: str | Path) -> list[str]:
    """Image files under ``folder`` (recursive, sorted)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ReferenceError(f"not a folder of images: {folder}")
    return sorted(str(p) for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def current_from_images(
    paths: Sequence[str],
    *,
    bundle: ModelBundle | None = None,
    reducer: EmbeddingReducer | None = None,
    read_fn: ReadFn | None = None,
) -> tuple[pd.DataFrame, list[str]]:
    """Features of a batch of new images: image statistics, plus score/embedding when a bundle is given."""
    hint = bundle.preprocess_spec.decode_side_hint if bundle is not None else None
    if hint is None or read_fn is not None:
        decoded, skipped = map_decoded(paths, _features_and_input(bundle), read_fn)
    else:
        # The statistics describe the file as stored (as the reference's do); the model's input is
        # decoded at the scale the bundle's preprocessing defines (a large JPEG at reduced DCT
        # scale), as in training and serving: two decodes, so the score is the service's.
        stats, skipped = map_decoded(paths, _features_and_input(None), None)
        reader = partial(_read, max_side_hint=hint)
        inputs, _ = map_decoded(paths, lambda a, _b, _v: bundle.preprocess(a).numpy(), reader)
        decoded = [(s[0], x) if s is not None and x is not None else None for s, x in zip(stats, inputs, strict=True)]
    img_frame = _image_frame([d[0] if d is not None else None for d in decoded])
    if bundle is None:
        return img_frame, skipped
    ok = [i for i, d in enumerate(decoded) if d is not None]
    tensors = np.stack([decoded[i][1] for i in ok]) if ok else np.zeros((0,))
    scores, emb = model_outputs(bundle, tensors)
    model_frame = score_frame(scores, emb, reducer)
    model_frame.index = ok
    return pd.concat([img_frame, model_frame.reindex(range(len(img_frame)))], axis=1), skipped
