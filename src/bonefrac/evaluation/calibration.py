"""Measures of calibration: expected calibration error and the reliability diagram.

Fitting and applying the calibration map belongs to the model contract
(:mod:`bonefrac.model.calibrate`); this module only measures how well a set of
probabilities matches the observed fracture rate.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from monai.metrics.calibration import calibration_binning

from bonefrac.errors import BonefracError


class CalibrationError(BonefracError, ValueError):
    """Inputs that cannot be used to fit or measure calibration."""


def _as_binary(logits_or_probs: np.ndarray, labels: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(logits_or_probs, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if x.shape != y.shape:
        raise CalibrationError(f"{what} and labels differ in length ({x.size} vs {y.size})")
    if x.size == 0:
        raise CalibrationError(f"no {what} given")
    if not np.all(np.isfinite(x)):
        raise CalibrationError(f"{what} contain NaN or infinite values")
    if not np.isin(y, (0, 1)).all():
        raise CalibrationError("labels must be 0 or 1")
    return x, y.astype(np.float64)


def _binning(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    p, y = _as_binary(probs, labels, "probabilities")
    if p.min() < 0 or p.max() > 1:
        raise CalibrationError("probabilities must lie in [0, 1]")
    if n_bins < 1:
        raise CalibrationError(f"n_bins must be >= 1, got {n_bins}")
    # MONAI's binning works on (B, C, spatial...): one batch item, one channel, N "pixels".
    mean_p, mean_y, counts = calibration_binning(
        torch.as_tensor(p, dtype=torch.float32).view(1, 1, -1),
        torch.as_tensor(y, dtype=torch.float32).view(1, 1, -1),
        num_bins=n_bins,
    )
    return mean_p[0, 0].double().numpy(), mean_y[0, 0].double().numpy(), counts[0, 0].double().numpy()


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 10) -> float:
    """ECE of the fracture probability: bin-count-weighted |mean prob - fraction positive|.

    Equal-width bins on [0, 1] (MONAI ``calibration_binning``), the binary
    reliability-diagram form used in medical-imaging calibration papers.
    """
    mean_p, mean_y, counts = _binning(probs, labels, n_bins)
    full = counts > 0
    return float(np.sum(counts[full] * np.abs(mean_p[full] - mean_y[full])) / counts.sum())


def reliability_curve(probs: np.ndarray, labels: np.ndarray, n_bins: int = 10) -> pd.DataFrame:
    """Per-bin table for a reliability diagram (empty bins are dropped).

    Columns: ``bin_lower``, ``bin_upper``, ``mean_predicted``, ``fraction_positive``, ``count``.
    """
    mean_p, mean_y, counts = _binning(probs, labels, n_bins)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    df = pd.DataFrame(
        {
            "bin_lower": edges[:-1],
            "bin_upper": edges[1:],
            "mean_predicted": mean_p,
            "fraction_positive": mean_y,
            "count": counts.astype(int),
        }
    )
    return df[df["count"] > 0].reset_index(drop=True)
