"""Per-image drift features: a small table that describes what the model is being shown.

Evidently compares tables, so each image becomes one row of a few columns:

- image statistics: intensity mean, std, p01, p50, p99 on [0, 1]-scaled
  intensities (scaled by the decoder's nominal range, as the prediction
  log does, so a change of exposure stays visible), width, height, aspect, bit depth;
- a low-dimensional embedding: PCA (fitted on the reference) of the model's
  penultimate-layer features, ``drift.embedding_dims`` components — one column
  per raw feature (hundreds) would be slow and noisy;
- the model's calibrated score.

The prediction log has no embedding and no p50; drift checks on the log use
the columns both tables share (see :func:`bonefrac.monitoring.drift.shared_feature_columns`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bonefrac.errors import BonefracError
from bonefrac.model.bundle import ModelBundle

INTENSITY_COLUMNS = ["intensity_mean", "intensity_std", "intensity_p01", "intensity_p50", "intensity_p99"]
GEOMETRY_COLUMNS = ["width", "height", "aspect"]
CATEGORICAL_COLUMNS = ["bit_depth"]
SCORE_COLUMN = "score"
EMBEDDING_PREFIX = "emb_"
IMAGE_COLUMNS = INTENSITY_COLUMNS + GEOMETRY_COLUMNS + CATEGORICAL_COLUMNS


class FeatureError(BonefracError):
    """Features cannot be computed (empty image, wrong shape, PCA not fitted...)."""


def embedding_columns(dims: int) -> list[str]:
    return [f"{EMBEDDING_PREFIX}{i}" for i in range(dims)]


def nominal_range(bit_depth: int) -> tuple[float, float] | None:
    """``(0, 2**bits - 1)`` for integer images; ``None`` (data range) for float images."""
    return (0.0, float(2 ** int(bit_depth) - 1)) if bit_depth and 0 < int(bit_depth) <= 16 else None


def _scaled(arr: np.ndarray, value_range: Sequence[float] | None) -> np.ndarray:
    """Ingest's own scaling (``bonefrac.data.metadata.scaled_intensities``: subsampling, nominal range,
    percentile fallback), so reference, current batch and prediction log agree to the formula."""
    from types import SimpleNamespace

    from bonefrac.data.metadata import scaled_intensities as ingest_scaled

    img = SimpleNamespace(array=arr, meta={"value_range": list(value_range) if value_range else None})
    return np.asarray(ingest_scaled(img), dtype=np.float32).ravel()


def image_features(
    array: np.ndarray, bit_depth: int, value_range: Sequence[float] | None = None
) -> dict[str, float]:
    """Statistics of one decoded image (H, W) or volume (D, H, W) in stored units.

    Intensities are scaled by the decoder's *nominal* value range (the
    ``value_range`` in ``DecodedImage.meta``; by default the range of the stored
    bit depth) with ingest's scaling, as
    :func:`bonefrac.monitoring.prediction_log.image_statistics` does, so rows from the
    service's log and rows computed here are comparable; p50 is added here.
    """
    arr = np.asarray(array, dtype=np.float32)
    if arr.ndim not in (2, 3) or arr.size == 0:
        raise FeatureError(f"expected a non-empty 2D image or 3D volume, got shape {arr.shape}")
    rng = value_range if value_range is not None else nominal_range(bit_depth)
    scaled = _scaled(arr, rng)
    p01, p50, p99 = np.percentile(scaled, [1.0, 50.0, 99.0])
    h, w = arr.shape[-2], arr.shape[-1]
    return {
        "intensity_mean": float(scaled.mean()),
        "intensity_std": float(scaled.std()),
        "intensity_p01": float(p01),
        "intensity_p50": float(p50),
        "intensity_p99": float(p99),
        "width": float(w),
        "height": float(h),
        "aspect": float(w) / float(h),
        "bit_depth": int(bit_depth),
    }


def features_from_prediction_log(log: pd.DataFrame) -> pd.DataFrame:
    """Rows of the service's prediction log as drift features (``probability`` → ``score``).

    An empty log gives an empty table with the same columns: a window without
    traffic is a normal state of a service, which the drift check records as such.
    """
    out = pd.DataFrame(index=log.index)
    for col in ("intensity_mean", "intensity_std", "intensity_p01", "intensity_p99", "width", "height"):
        out[col] = pd.to_numeric(log[col], errors="coerce") if col in log.columns else np.nan
    out["aspect"] = out["width"] / out["height"].replace(0, np.nan)
    out["bit_depth"] = pd.to_numeric(log.get("bit_depth"), errors="coerce").astype("Int64")
    if "probability" in log.columns:
        out[SCORE_COLUMN] = pd.to_numeric(log["probability"], errors="coerce")
    elif SCORE_COLUMN in log.columns:
        out[SCORE_COLUMN] = pd.to_numeric(log[SCORE_COLUMN], errors="coerce")
    return out.reset_index(drop=True)


# ------------------------------------------------------------------ model
def model_outputs(
    bundle: ModelBundle, images: np.ndarray, batch_size: int | None = None, model: Any | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated scores ``(N,)`` and embeddings ``(N, F)`` from one forward pass.

    The embedding is :func:`bonefrac.model.networks.forward_with_embedding`'s (the pooled
    features the head reads), the vector the served model returns too, so the reference's
    PCA and the service's per-image OOD check project the same thing. The passes are
    :class:`~bonefrac.inference.cache_outputs.CacheOutputs`' (the evaluation's too: one
    batching, one input check). ``model`` reuses a network already built.
    """
    from bonefrac.inference.cache_outputs import BATCH_SIZE, CacheOutputs
    from bonefrac.inference.predictor import Predictor

    if not len(images):
        return np.zeros(0, dtype=np.float32), np.zeros((0, 0), dtype=np.float32)
    outputs = CacheOutputs(Predictor(bundle, model=model), images, batch_size or BATCH_SIZE)
    rows = np.arange(len(images))
    return bundle.calibrate(outputs.logits(rows)).prob, outputs.embeddings(rows)


# ------------------------------------------------------------------ PCA
@dataclass
class EmbeddingReducer:
    """PCA fitted on the reference embeddings; stored as plain arrays (JSON), never pickled."""

    mean: np.ndarray
    components: np.ndarray  # (k, F)

    @classmethod
    def fit(cls, embeddings: np.ndarray, dims: int, seed: int = 0) -> EmbeddingReducer:
        from sklearn.decomposition import PCA

        x = np.asarray(embeddings, dtype=np.float64)
        if x.ndim != 2 or len(x) < 2:
            raise FeatureError(f"need at least 2 embeddings of shape (N, F) to fit PCA, got {x.shape}")
        k = min(dims, x.shape[0], x.shape[1])
        pca = PCA(n_components=k, random_state=seed).fit(x)
        return cls(mean=pca.mean_.astype(np.float64), components=pca.components_.astype(np.float64))

    @property
    def dims(self) -> int:
        return int(self.components.shape[0])

    def transform(self, embeddings: np.ndarray) -> np.ndarray:
        x = np.asarray(embeddings, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.components.shape[1]:
            raise FeatureError(
                f"embeddings have {x.shape[-1]} features but the PCA was fitted on {self.components.shape[1]}"
            )
        return (x - self.mean) @ self.components.T

    def residual(self, embeddings: np.ndarray) -> np.ndarray:
        """Norm of what the axes leave out, per row ``(N,)``: ``|x - mean - proj(x)|``.

        An image unlike the reference can land near the centre of the few kept axes while
        most of its embedding lies off them; this is where it shows.
        """
        x = np.asarray(embeddings, dtype=np.float64)
        z = self.transform(x)
        return np.linalg.norm(x - self.mean - z @ self.components, axis=1)

    def to_frame(self, embeddings: np.ndarray) -> pd.DataFrame:
        return pd.DataFrame(self.transform(embeddings), columns=embedding_columns(self.dims))

    def save(self, path: str | Path) -> Path:
        from bonefrac.monitoring.io import atomic_write_text

        data = {"mean": self.mean.tolist(), "components": self.components.tolist()}
        return atomic_write_text(Path(path), json.dumps(data))

    @classmethod
    def load(cls, path: str | Path) -> EmbeddingReducer:
        path = Path(path)
        if not path.exists():
            raise FeatureError(f"embedding PCA not found: {path} (build the drift reference first)")
        d = json.loads(path.read_text())
        return cls(mean=np.asarray(d["mean"]), components=np.asarray(d["components"]))


def score_frame(scores: np.ndarray, embeddings: np.ndarray, reducer: EmbeddingReducer | None) -> pd.DataFrame:
    """``score`` (+ the ``emb_*`` PCA coordinates with a reducer) per row, from the model's outputs."""
    frame = pd.DataFrame({SCORE_COLUMN: np.asarray(scores, dtype=np.float64)})
    if reducer is not None and len(embeddings):
        frame = pd.concat([frame, reducer.to_frame(embeddings)], axis=1)
    return frame
