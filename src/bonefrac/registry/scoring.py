"""Score a registered model on the current test split, for the promotion gate.

The gate compares challenger and champion on the *same* images, so both are
scored here, from the preprocessed cache (the exact tensors evaluation used),
not from an older prediction file of the champion's own test set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bonefrac.errors import BonefracError
from bonefrac.inference.predictor import Predictor
from bonefrac.model.bundle import ModelBundle
from bonefrac.preprocess.cache import cache_spec, load_cache


class ScoringError(BonefracError):
    """The cache or the model cannot be scored (e.g. no test rows, shape mismatch)."""


def score_split(
    bundle: ModelBundle, cache_dir: str | Path, split: str = "test", batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(labels, calibrated probabilities, image_ids)`` of ``bundle`` on one split of the cache.

    Rows come in ``index.csv`` order, so two models scored here line up image by image.
    """
    images, index = load_cache(Path(cache_dir))
    if "split" not in index.columns:
        raise ScoringError(f"{cache_dir}/index.csv has no 'split' column")
    rows = index[index["split"] == split]
    if rows.empty:
        raise ScoringError(f"the cache at {cache_dir} has no {split!r} rows")
    x = np.asarray(images[rows["cache_row"].to_numpy()], dtype=np.float32)
    spec = cache_spec(Path(cache_dir))
    if spec != bundle.preprocess_spec:
        raise ScoringError(
            f"the model was trained on inputs preprocessed as {bundle.preprocess_spec.model_dump()}, "
            f"but the cache holds {spec.model_dump()}: rebuild the cache with the model's preprocessing"
        )
    probs = Predictor(bundle, batch_size=batch_size).predict_tensor(torch.from_numpy(x)).prob
    ids = [str(v) for v in rows["image_id"]] if "image_id" in rows.columns else [str(i) for i in rows.index]
    return rows["label"].to_numpy().astype(int), probs, ids
