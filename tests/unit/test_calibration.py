"""Temperature scaling recovers a known temperature and improves calibration."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.calibration import calibration_curve

from bonefrac.evaluation.calibration import (
    CalibrationError,
    apply_temperature,
    binary_nll,
    expected_calibration_error,
    fit_temperature,
    reliability_curve,
    sigmoid,
)


def _miscalibrated(n: int, true_t: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from sigmoid(z); the model reports logits z * true_t (over-confident if > 1)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, size=n)
    y = (rng.random(n) < sigmoid(z)).astype(int)
    return z * true_t, y


@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_fit_recovers_known_temperature(true_t: float) -> None:
    logits, y = _miscalibrated(20000, true_t)
    t = fit_temperature(logits, y)
    assert t == pytest.approx(true_t, rel=0.08)


def test_scaling_lowers_nll_and_ece() -> None:
    logits, y = _miscalibrated(4000, 3.0, seed=1)
    t = fit_temperature(logits, y)
    assert binary_nll(logits, y, t) < binary_nll(logits, y, 1.0)
    before = expected_calibration_error(sigmoid(logits), y, 10)
    after = expected_calibration_error(apply_temperature(logits, t), y, 10)
    assert after < before / 2


def test_ece_matches_reliability_table_and_sklearn_bins() -> None:
    rng = np.random.default_rng(3)
    p = rng.random(500)
    y = (rng.random(500) < p**2).astype(int)
    table = reliability_curve(p, y, n_bins=10)
    frac_pos, mean_pred = calibration_curve(y, p, n_bins=10, strategy="uniform")
    assert np.allclose(table["fraction_positive"], frac_pos, atol=1e-6)
    assert np.allclose(table["mean_predicted"], mean_pred, atol=1e-6)
    ece = np.sum(table["count"] * np.abs(table["mean_predicted"] - table["fraction_positive"])) / 500
    assert expected_calibration_error(p, y, 10) == pytest.approx(ece, abs=1e-6)
    assert table["count"].sum() == 500


def test_perfectly_calibrated_probabilities_have_small_ece() -> None:
    rng = np.random.default_rng(4)
    p = rng.random(50000)
    y = (rng.random(50000) < p).astype(int)
    assert expected_calibration_error(p, y, 10) < 0.01


def test_bad_inputs_are_clear_errors() -> None:
    with pytest.raises(CalibrationError, match="both classes"):
        fit_temperature(np.array([1.0, 2.0]), np.array([1, 1]))
    with pytest.raises(CalibrationError, match="NaN"):
        fit_temperature(np.array([np.nan, 2.0]), np.array([0, 1]))
    with pytest.raises(CalibrationError, match=r"\[0, 1\]"):
        expected_calibration_error(np.array([1.5, 0.2]), np.array([0, 1]))
    with pytest.raises(CalibrationError, match="positive"):
        apply_temperature(np.zeros(2), 0.0)
