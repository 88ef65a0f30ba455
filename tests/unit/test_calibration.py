"""Calibration measures: ECE and the reliability table agree with scikit-learn's binning."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.calibration import calibration_curve

from bonefrac.evaluation.calibration import CalibrationError, expected_calibration_error, reliability_curve


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
    with pytest.raises(CalibrationError, match=r"\[0, 1\]"):
        expected_calibration_error(np.array([1.5, 0.2]), np.array([0, 1]))
    with pytest.raises(CalibrationError, match="NaN"):
        expected_calibration_error(np.array([np.nan, 0.2]), np.array([0, 1]))
