"""Per-image out-of-distribution (OOD) warning: is this image like the ones the model was trained on?

Drift (``bonefrac.monitoring.drift``) compares batches; a radiologist needs a warning on the
one image in front of them. This module scores one image by its distance to the training
distribution, in two independent feature groups:

- ``image``: intensity statistics on the nominal range (mean, std, p01, p50, p99) and the
  aspect ratio, computed exactly as the drift reference computes them
  (:func:`bonefrac.monitoring.features.image_features`), plus the acquisition's size
  (``log10_pixels``: another detector, another resolution) and a resolution-free texture
  measure (``texture``: mean gradient magnitude over the intensity spread, on a copy resized
  to 128 px, so smooth synthetic images and detailed radiographs differ);
- ``embedding`` (optional): the model's embedding
  (:func:`bonefrac.model.networks.forward_with_embedding`, the pooled features its head reads)
  projected on the drift reference's PCA (``emb_0..k-1``), plus the log norm of the part the
  PCA leaves out (``emb_residual``: few axes fitted on the training images do not see a new
  kind of image that lies off them, as FracAtlas does for a phantom model). The PCA travels inside the
  detector (``reducer``), so a served model scores the embedding its own worker returns
  (eager or ONNX) without reading the reference folder.

Each group is a Gaussian fitted on the training rows (standardised, covariance shrunk toward
the identity so a few dozen rows are enough) and scored by Mahalanobis distance. The
threshold of each group is a high quantile of the distances of *held-out* in-distribution
images (validation split) times a margin, so the false-alarm rate is set on data the fit
never saw. The image's score is the largest ``distance / threshold`` over the groups it has:
``> 1`` warns. The answer is plain JSON, ready for the service response and the viewer::

    {"flag": true, "score": 3.4, "threshold": 1.0, "group": "image", "fired": ["image", "embedding"],
     "reason": "image statistics unlike the training images (intensity_p50 7.9 SD, ...); ...", ...}

The detector is stored as JSON (never pickled), next to the drift reference.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bonefrac.config import project_relative
from bonefrac.errors import BonefracError
from bonefrac.monitoring.features import EMBEDDING_PREFIX, EmbeddingReducer, image_features

IMAGE_STAT_COLUMNS = [
    "intensity_mean",
    "intensity_std",
    "intensity_p01",
    "intensity_p50",
    "intensity_p99",
    "aspect",
    "log10_pixels",
    "texture",
]
OOD_JSON = "ood.json"
RESIDUAL_COLUMN = f"{EMBEDDING_PREFIX}residual"
if TYPE_CHECKING:
    from bonefrac.inference.cache_outputs import CacheOutputs

GROUP_WORDS = {"image": "image statistics", "embedding": "the model's internal features (embedding)"}


class OODError(BonefracError):
    """The detector cannot be fitted, read or applied."""


@dataclass
class GaussianGroup:
    """A standardised Gaussian over ``columns`` with a shrunk covariance."""

    columns: list[str]
    mean: np.ndarray
    scale: np.ndarray
    precision: np.ndarray
    threshold: float = float("inf")

    @classmethod
    def fit(cls, frame: pd.DataFrame, columns: Sequence[str], shrinkage: float = 0.2) -> GaussianGroup:
        x = frame[list(columns)].to_numpy(dtype=np.float64)
        x = x[np.isfinite(x).all(axis=1)]
        if len(x) < 5:
            raise OODError(f"need at least 5 complete training rows to fit {list(columns)}, got {len(x)}")
        mean = x.mean(axis=0)
        # A floor on the scale: a feature that never varies in training (e.g. one aspect ratio)
        # must not turn a tiny difference into an infinite distance.
        scale = np.maximum(x.std(axis=0), 1e-3 * np.maximum(np.abs(mean), 1.0))
        z = (x - mean) / scale
        cov = np.cov(z, rowvar=False) if z.shape[1] > 1 else np.atleast_2d(np.var(z))
        cov = (1.0 - shrinkage) * cov + shrinkage * np.eye(len(columns))
        return cls(list(columns), mean, scale, np.linalg.pinv(cov))

    def zscores(self, x: np.ndarray) -> np.ndarray:
        return (np.atleast_2d(np.asarray(x, dtype=np.float64)) - self.mean) / self.scale

    def distance(self, x: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each row of ``x`` (N, len(columns))."""
        z = self.zscores(x)
        return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", z, self.precision, z), 0.0))

    def to_dict(self) -> dict[str, Any]:
        return {
            "columns": self.columns,
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "precision": self.precision.tolist(),
            "threshold": self.threshold,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GaussianGroup:
        return cls(
            list(d["columns"]),
            np.asarray(d["mean"], dtype=np.float64),
            np.asarray(d["scale"], dtype=np.float64),
            np.asarray(d["precision"], dtype=np.float64),
            float(d["threshold"]),
        )


@dataclass
class OODDetector:
    groups: dict[str, GaussianGroup]
    meta: dict[str, Any] = field(default_factory=dict)
    #: The drift reference's PCA of the embedding (``None``: image statistics only).
    reducer: EmbeddingReducer | None = None

    @classmethod
    def fit(
        cls,
        train: pd.DataFrame,
        heldout: pd.DataFrame,
        *,
        quantile: float = 0.99,
        margin: float = 1.25,
        use_embedding: bool = True,
        meta: Mapping[str, Any] | None = None,
        reducer: EmbeddingReducer | None = None,
    ) -> OODDetector:
        """Fit on ``train`` rows; thresholds from the ``heldout`` rows (in-distribution, not fitted on).

        ``quantile`` of the held-out distances times ``margin``: with q=0.99 about 1 % of
        in-distribution images would warn before the margin, fewer after it.
        """
        if heldout.empty:
            raise OODError("need held-out in-distribution rows to set the thresholds")
        groups: dict[str, GaussianGroup] = {"image": GaussianGroup.fit(train, IMAGE_STAT_COLUMNS)}
        emb_cols = [c for c in train.columns if c.startswith(EMBEDDING_PREFIX)]
        if use_embedding and emb_cols and all(c in heldout.columns for c in emb_cols):
            groups["embedding"] = GaussianGroup.fit(train, emb_cols)
        for name, g in groups.items():
            d = g.distance(heldout[g.columns].to_numpy(dtype=np.float64))
            d = d[np.isfinite(d)]
            if d.size == 0:
                raise OODError(f"no complete held-out rows for the {name} group")
            g.threshold = float(np.quantile(d, quantile) * margin)
        info = {"n_train": len(train), "n_heldout": len(heldout), "quantile": quantile, "margin": margin}
        return cls(groups, {**info, **(meta or {})}, reducer if "embedding" in groups else None)

    def embedding_features(self, embedding: np.ndarray | None) -> dict[str, float]:
        """The ``emb_*`` features of one image's raw embedding ``(F,)`` ({} without a PCA or an embedding).

        An embedding of another width (a model swapped under a stale detector) gives {} and
        the group is skipped, never a wrong distance.
        """
        if self.reducer is None or embedding is None:
            return {}
        emb = np.asarray(embedding, dtype=np.float64).reshape(1, -1)
        if emb.shape[1] != self.reducer.components.shape[1]:
            return {}
        return embedding_ood_features(emb[0], self.reducer)

    def score(self, features: Mapping[str, float], embedding: np.ndarray | None = None) -> dict[str, Any]:
        """One image's features (``IMAGE_STAT_COLUMNS``, optionally ``emb_*``) → a JSON-ready verdict.

        ``embedding``: the model's raw embedding of this image, projected with the detector's
        own PCA. A group whose features are missing (e.g. no embedding from this runtime) is
        skipped and listed in ``skipped``. ``fired`` lists every group over its threshold, worst
        first, and ``reason`` names each of them (the viewer shows which check fired).
        """
        features = {**features, **self.embedding_features(embedding)}
        ratios: dict[str, float] = {}
        distances: dict[str, float] = {}
        skipped: list[str] = []
        worst: tuple[float, str] | None = None
        for name, g in self.groups.items():
            vals = [features.get(c) for c in g.columns]
            if any(v is None or not np.isfinite(float(v)) for v in vals):
                skipped.append(name)
                continue
            x = np.asarray(vals, dtype=np.float64)[None]
            d = float(g.distance(x)[0])
            distances[name] = round(d, 3)
            ratios[name] = round(d / g.threshold, 3) if g.threshold > 0 else float("inf")
            if worst is None or ratios[name] > worst[0]:
                worst = (ratios[name], name)
        if worst is None:
            raise OODError("no feature group could be scored: the image features are missing")
        score, group = worst
        flag = bool(score > 1.0)
        fired = sorted((n for n, r in ratios.items() if r > 1.0), key=lambda n: -ratios[n])

        def detail(name: str) -> str:
            g = self.groups[name]
            z = g.zscores([features[c] for c in g.columns])[0]
            return ", ".join(f"{g.columns[i]} {z[i]:+.1f} SD" for i in np.argsort(-np.abs(z))[:3])

        if flag:
            reason = "; ".join(
                f"{GROUP_WORDS.get(n, n)} unlike the training images ({detail(n)}; {ratios[n]:.1f}× its threshold)"
                for n in fired
            )
        else:
            reason = f"within the range of the training images ({GROUP_WORDS.get(group, group)}: {detail(group)})"
        return {
            "flag": flag,
            "score": round(float(score), 3),
            "threshold": 1.0,
            "group": group,
            "fired": fired,
            "reason": reason,
            "ratios": ratios,
            "distances": distances,
            "skipped": skipped,
        }

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"groups": {k: g.to_dict() for k, g in self.groups.items()}, "meta": self.meta}
        if self.reducer is not None:
            d["reducer"] = {"mean": self.reducer.mean.tolist(), "components": self.reducer.components.tolist()}
        return d

    def save(self, path: str | Path) -> Path:
        from bonefrac.monitoring.io import atomic_write_text

        return atomic_write_text(Path(path), json.dumps(self.to_dict(), default=str))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OODDetector:
        r = d.get("reducer")
        reducer = (
            EmbeddingReducer(np.asarray(r["mean"], dtype=np.float64), np.asarray(r["components"], dtype=np.float64))
            if r
            else None
        )
        groups = {k: GaussianGroup.from_dict(g) for k, g in d["groups"].items()}
        return cls(groups, dict(d.get("meta") or {}), reducer)

    @classmethod
    def load(cls, path: str | Path) -> OODDetector:
        path = Path(path)
        if not path.is_file():
            raise OODError(f"no OOD detector at {path}: fit one on the drift reference first")
        return cls.from_dict(json.loads(path.read_text()))


def image_ood_features(
    array: np.ndarray,
    bit_depth: int,
    value_range: Sequence[float] | None = None,
    embedding: np.ndarray | None = None,
    reducer: Any | None = None,
) -> dict[str, float]:
    """Features of one decoded image for :meth:`OODDetector.score`.

    ``embedding`` is the model's embedding (F,) for this image; with the drift reference's
    ``reducer`` (PCA) it becomes the ``emb_*`` columns (:func:`embedding_ood_features`).
    """
    base = image_features(array, bit_depth, value_range)
    feats: dict[str, float] = {k: float(v) for k, v in base.items() if k in IMAGE_STAT_COLUMNS}
    feats["log10_pixels"] = float(np.log10(max(1.0, base["width"] * base["height"])))
    feats["texture"] = texture(array)
    if embedding is not None and reducer is not None:
        feats.update(embedding_ood_features(embedding, reducer))
    return feats


def embedding_ood_features(embedding: np.ndarray, reducer: EmbeddingReducer) -> dict[str, float]:
    """``emb_0..k-1`` (the PCA coordinates) and ``emb_residual`` (log10 of 1 + the off-axes norm)."""
    emb = np.asarray(embedding, dtype=np.float64).reshape(1, -1)
    feats = {f"{EMBEDDING_PREFIX}{i}": float(v) for i, v in enumerate(reducer.transform(emb)[0])}
    feats[RESIDUAL_COLUMN] = float(np.log10(1.0 + reducer.residual(emb)[0]))
    return feats


def texture(array: np.ndarray, side: int = 128) -> float:
    """Mean gradient magnitude / intensity spread of a copy resized to ``side`` px (middle slice of a volume)."""
    from PIL import Image

    arr = np.asarray(array, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[arr.shape[0] // 2]
    lo, hi = np.percentile(arr, [1.0, 99.0])
    spread = float(hi - lo)
    if spread <= 0:
        return 0.0
    h, w = arr.shape
    s = side / max(h, w)
    small = np.asarray(
        Image.fromarray(np.clip((arr - lo) / spread, 0, 1).astype(np.float32), mode="F").resize(
            (max(2, round(w * s)), max(2, round(h * s))), Image.Resampling.BOX
        ),
        dtype=np.float32,
    )
    gy, gx = np.gradient(small)
    return float(np.mean(np.hypot(gx, gy)))


def _feature_frame(
    image_rows: Sequence[dict[str, float] | None], embeddings: np.ndarray | None, reducer: Any | None
) -> pd.DataFrame:
    """Image features per row (``None``: not decodable) joined with the embedding features."""
    rows = []
    for i, feats in enumerate(image_rows):
        if feats is None:
            rows.append({c: np.nan for c in IMAGE_STAT_COLUMNS})
            continue
        emb = embeddings[i] if embeddings is not None and len(embeddings) > i else None
        if emb is not None and reducer is not None:
            feats = {**feats, **embedding_ood_features(emb, reducer)}
        rows.append(feats)
    return pd.DataFrame(rows)


def build_ood_detector(
    cache_dir: str | Path,
    out_path: str | Path,
    *,
    bundle: Any,
    reducer: Any | None = None,
    max_rows: int = 1000,
    seed: int = 0,
    read_fn: Any | None = None,
    quantile: float = 0.99,
    margin: float = 1.25,
    outputs: CacheOutputs | None = None,
) -> OODDetector:
    """Fit on the cache's ``train`` rows, threshold on its ``val`` rows; write ``out_path`` (JSON).

    As the drift reference does: image statistics from the original files, the embedding
    from the model run on the cached tensors, projected with the reference's PCA
    (``reducer``; without one the detector has the image group only). The training sample is
    the drift reference's (same ``max_rows`` and ``seed``), so with the stage's shared
    ``outputs`` its embeddings cost no second forward pass.
    """
    from bonefrac.inference.cache_outputs import CacheOutputs
    from bonefrac.inference.predictor import Predictor
    from bonefrac.monitoring.reference import map_decoded, sample_split
    from bonefrac.preprocess.cache import load_cache

    images, index = load_cache(Path(cache_dir))
    if "split" not in index.columns:
        raise OODError(f"{cache_dir}: the cache index has no 'split' column")
    if reducer is not None:
        outputs = outputs if outputs is not None else CacheOutputs(Predictor(bundle), images)
        outputs.check_network(bundle)
    frames = {}
    for split in ("train", "val"):
        rows = sample_split(index, split, max_rows, seed)
        if rows.empty:
            raise OODError(f"the cache at {cache_dir} has no {split!r} rows")
        image_rows, _ = map_decoded([str(p) for p in rows["path"]], image_ood_features, read_fn)
        emb = outputs.embeddings(rows["cache_row"]) if reducer is not None and outputs is not None else None
        frames[split] = _feature_frame(image_rows, emb, reducer)
    det = OODDetector.fit(
        frames["train"],
        frames["val"],
        quantile=quantile,
        margin=margin,
        meta={"cache_dir": project_relative(cache_dir), "model": getattr(bundle, "arch", None)},
        reducer=reducer,
    )
    det.save(out_path)
    return det
