"""The calibration map: fits recover known miscalibration; Platt undoes a class-weight shift."""

from __future__ import annotations

import numpy as np
import pytest

from bonefrac.evaluation.calibration import expected_calibration_error
from bonefrac.model.calibrate import (
    IDENTITY,
    CalibrationError,
    CalibrationMap,
    binary_nll,
    calibrate,
    decide,
    fit_calibration,
    sigmoid,
    type_probabilities,
)


def _labels(z: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random(z.size) < sigmoid(z)).astype(int)


def _miscalibrated(n: int, scale: float, shift: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from sigmoid(z); the model reports ``z * scale + shift``."""
    z = np.random.default_rng(seed).normal(-1.0, 2.0, size=n)
    return z * scale + shift, _labels(z, seed + 1)


@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_temperature_fit_recovers_a_known_temperature(true_t: float) -> None:
    logits, y = _miscalibrated(20000, true_t, 0.0)
    cal = fit_calibration(logits, y, "temperature")
    assert cal.method == "temperature" and cal.intercept == 0.0
    assert cal.temperature == pytest.approx(true_t, rel=0.08)


def test_platt_recovers_slope_and_intercept() -> None:
    logits, y = _miscalibrated(20000, 2.0, 1.5)  # z = (logit - 1.5) / 2
    cal = fit_calibration(logits, y, "platt")
    assert cal.slope == pytest.approx(0.5, rel=0.08)
    assert cal.intercept == pytest.approx(-0.75, abs=0.1)


def test_class_weight_shift_needs_an_intercept() -> None:
    """Weighted BCE shifts every logit by ln(w): temperature cannot undo it, Platt can."""
    logits, y = _miscalibrated(8000, 1.0, np.log(4.7), seed=3)
    ece = {
        m: expected_calibration_error(fit_calibration(logits, y, m).probability(logits), y, 10)
        for m in ("identity", "temperature", "platt")
    }
    assert ece["platt"] < 0.03
    assert ece["temperature"] > 2 * ece["platt"]
    assert binary_nll(logits, y, fit_calibration(logits, y, "platt")) < binary_nll(logits, y)


def test_calibration_keeps_the_ranking() -> None:
    logits, y = _miscalibrated(500, -1.0, 0.0, seed=5)  # an inverted scorer: slope must not go negative
    cal = fit_calibration(logits, y, "platt")
    assert cal.slope > 0
    p = cal.probability(logits)
    assert np.array_equal(np.argsort(p, kind="stable"), np.argsort(logits, kind="stable"))


def test_identity_and_bad_inputs() -> None:
    assert fit_calibration(np.zeros(3), np.array([0, 1, 0]), "identity") == IDENTITY
    assert IDENTITY.probability(np.array([0.0]))[0] == 0.5
    with pytest.raises(CalibrationError, match="both classes"):
        fit_calibration(np.array([1.0, 2.0]), np.array([1, 1]))
    with pytest.raises(CalibrationError, match="NaN"):
        fit_calibration(np.array([np.nan, 2.0]), np.array([0, 1]))
    with pytest.raises(CalibrationError, match="positive"):
        CalibrationMap.from_temperature(0.0)
    with pytest.raises(ValueError):
        CalibrationMap(method="platt", slope=-1.0)


def test_calibrate_applies_map_decisions_and_type_softmax() -> None:
    cal = CalibrationMap(method="platt", slope=0.5, intercept=-1.0)
    logits = np.array([[2.0, 1.0, 0.0], [-4.0, 0.0, 3.0]])
    pred = calibrate(logits, cal, {"hi": 0.4, "lo": 0.05})
    assert pred.prob == pytest.approx(sigmoid(np.array([0.0, -3.0])))
    assert pred.decisions["hi"].tolist() == [True, False]
    assert pred.decisions["lo"].tolist() == [True, False]  # 0.047 < 0.05
    assert pred.type_probs.sum(1) == pytest.approx([1.0, 1.0])
    assert pred.type_probs[1].argmax() == 1
    assert pred.raw_prob == pytest.approx(sigmoid(np.array([2.0, -4.0])))
    row = pred.row(0, ["a", "b"])
    assert set(row) == {"probability", "logit", "decisions", "fracture_type_probabilities"}


def test_decide_uses_greater_or_equal() -> None:
    assert decide(np.array([0.3, 0.29999]), {"t": 0.3})["t"].tolist() == [True, False]


def test_sigmoid_is_stable_at_extremes() -> None:
    assert sigmoid(np.array([-1000.0, 1000.0])).tolist() == [0.0, 1.0]
    assert type_probabilities(np.array([[1000.0, 0.0]]))[0, 0] == 1.0
