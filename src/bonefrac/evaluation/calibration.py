"""Temperature scaling and calibration measures for the fracture probability.

A network trained with (weighted) BCE gives scores that rank well but are often
over- or under-confident; a radiologist reading "0.9" should be able to trust
that about nine in ten such images are fractured. Temperature scaling (Guo et
al., ICML 2017) divides the logit by one scalar fitted on the validation split:
it cannot change the ranking (AUROC), only the calibration, and it travels with
the model bundle so evaluation, ``bonefrac predict`` and serving all apply it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from monai.metrics.calibration import calibration_binning

from bonefrac.errors import BonefracError

# Temperatures outside this range mean the validation set is degenerate (for
# example perfectly separated), not that the model needs such a correction.
MIN_TEMPERATURE = 0.05
MAX_TEMPERATURE = 20.0


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


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function (float64)."""
    x = np.asarray(x, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -x))


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Calibrated probability ``sigmoid(logit / T)``: the one formula the Predictor also uses."""
    if not temperature > 0:
        raise CalibrationError(f"temperature must be positive, got {temperature}")
    return sigmoid(np.asarray(logits, dtype=np.float64) / float(temperature))


def binary_nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under ``sigmoid(logit / T)``."""
    x, y = _as_binary(logits, labels, "logits")
    z = x / temperature
    # log(1 + e^z) - y z  ==  BCE-with-logits, written with logaddexp for stability.
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, max_iter: int = 200) -> float:
    """Fit the temperature T minimising validation NLL of ``sigmoid(logit / T)`` (LBFGS).

    T is optimised as ``exp(s)`` so it stays positive, and the result is clipped to
    [``MIN_TEMPERATURE``, ``MAX_TEMPERATURE``]. Both classes must be present, or the
    NLL has no finite minimum.
    """
    x, y = _as_binary(logits, labels, "logits")
    if y.min() == y.max():
        raise CalibrationError("temperature scaling needs both classes in the validation split")
    xt = torch.as_tensor(x, dtype=torch.float64)
    yt = torch.as_tensor(y, dtype=torch.float64)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(xt / log_t.exp(), yt)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    if not np.isfinite(t):
        raise CalibrationError("temperature fit diverged")
    return float(np.clip(t, MIN_TEMPERATURE, MAX_TEMPERATURE))


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
