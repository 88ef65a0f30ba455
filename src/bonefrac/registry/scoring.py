"""Score a registered model on the current test split, for the promotion gate.

The gate compares challenger and champion on the *same* images, so both are
scored here, from the preprocessed cache (the exact tensors evaluation used),
not from an older prediction file of the champion's own test set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from bonefrac.errors import BonefracError
from bonefrac.preprocess.cache import load_cache


class ScoringError(BonefracError):
    """The cache or the model cannot be scored (e.g. no test rows, shape mismatch)."""


@torch.no_grad()
def calibrated_probs(
    model: torch.nn.Module, temperature: float, images: np.ndarray, batch_size: int = 32
) -> np.ndarray:
    """``sigmoid(fracture_logit / T)`` for a float array ``(N, 1, ...)`` on [0, 1]."""
    model.eval()
    out: list[np.ndarray] = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.asarray(images[start : start + batch_size], dtype=np.float32))
        logits = model(x)
        logit = logits[:, 0] if logits.ndim == 2 else logits.reshape(-1)
        out.append(torch.sigmoid(logit.float() / float(temperature)).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def score_split(
    bundle: Any, cache_dir: str | Path, split: str = "test", batch_size: int = 32
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
    expected = bundle.preprocess.get("image_size") if isinstance(bundle.preprocess, dict) else None
    if expected and bundle.spatial_dims == 2 and x.shape[-1] != int(expected):
        raise ScoringError(
            f"the model expects {expected} px inputs but the cache holds {x.shape[-1]} px: "
            "rebuild the cache with the model's preprocessing"
        )
    probs = calibrated_probs(bundle.build_model(), bundle.temperature, x, batch_size)
    ids = [str(v) for v in rows["image_id"]] if "image_id" in rows.columns else [str(i) for i in rows.index]
    return rows["label"].to_numpy().astype(int), probs, ids
