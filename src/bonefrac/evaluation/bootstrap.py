"""Stratified bootstrap confidence intervals.

Resampling is stratified by class (as pROC does by default for AUROC CIs):
every replicate keeps the numbers of fractured and normal images, so no
replicate lacks a class and AUROC is always defined, even for small subgroups.
Intervals are percentile intervals.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


class BootstrapError(ValueError):
    """A bootstrap that cannot be run on these inputs."""


def stratified_indices(labels: np.ndarray, n_bootstrap: int, seed: int) -> np.ndarray:
    """``(n_bootstrap, n)`` index matrix; each row resamples positives and negatives separately."""
    y = np.asarray(labels).reshape(-1)
    if n_bootstrap < 1:
        raise BootstrapError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    rng = np.random.default_rng(seed)
    cols = []
    for cls in np.unique(y):
        members = np.flatnonzero(y == cls)
        cols.append(members[rng.integers(0, members.size, size=(n_bootstrap, members.size))])
    return np.concatenate(cols, axis=1) if cols else np.zeros((n_bootstrap, 0), dtype=int)


def percentile_interval(samples: np.ndarray, ci_level: float) -> tuple[float, float]:
    """Percentile interval of bootstrap replicates along axis 0 (NaN replicates ignored)."""
    if not 0.0 < ci_level < 1.0:
        raise BootstrapError(f"ci_level must be in (0, 1), got {ci_level}")
    s = np.asarray(samples, dtype=np.float64)
    s = s[np.isfinite(s)]
    if s.size == 0:
        return float("nan"), float("nan")
    alpha = (1.0 - ci_level) / 2.0
    lo, hi = np.quantile(s, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def bootstrap_ci(
    statistic: Callable[[np.ndarray, np.ndarray], float],
    labels: np.ndarray,
    scores: np.ndarray,
    n_bootstrap: int = 1000,
    ci_level: float = 0.95,
    seed: int = 0,
    indices: np.ndarray | None = None,
) -> tuple[float, float]:
    """CI of ``statistic(labels, scores)`` (e.g. ``sklearn.metrics.roc_auc_score``)."""
    y = np.asarray(labels).reshape(-1)
    s = np.asarray(scores).reshape(-1)
    if y.shape != s.shape:
        raise BootstrapError(f"labels and scores differ in length ({y.size} vs {s.size})")
    idx = stratified_indices(y, n_bootstrap, seed) if indices is None else indices
    reps = np.array([statistic(y[i], s[i]) for i in idx], dtype=np.float64)
    return percentile_interval(reps, ci_level)
