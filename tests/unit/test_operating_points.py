"""Thresholds meet their targets on the data they were chosen on, and are the best that do."""

from __future__ import annotations

import numpy as np
import pytest

from bonefrac.evaluation.operating_points import (
    HIGH_SENSITIVITY,
    HIGH_SPECIFICITY,
    OperatingPointError,
    choose_thresholds,
)
from bonefrac.model.calibrate import decide


def _sens_spec(p: np.ndarray, y: np.ndarray, t: float) -> tuple[float, float]:
    d = decide(p, {"t": t})["t"]
    return float(d[y == 1].mean()), float((~d[y == 0]).mean())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("targets", [(0.95, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_targets_met_on_the_fitting_data(seed: int, targets: tuple[float, float]) -> None:
    rng = np.random.default_rng(seed)
    y = (rng.random(400) < 0.25).astype(int)
    p = 1 / (1 + np.exp(-(rng.normal(size=400) + 1.5 * (2 * y - 1))))
    thr = choose_thresholds(p, y, *targets)
    sens, _ = _sens_spec(p, y, thr[HIGH_SENSITIVITY])
    _, spec = _sens_spec(p, y, thr[HIGH_SPECIFICITY])
    assert sens >= targets[0]
    assert spec >= targets[1]
    # Optimal: the next distinct score above (resp. below) would miss the target.
    higher = p[p > thr[HIGH_SENSITIVITY]]
    if higher.size:
        assert _sens_spec(p, y, higher.min())[0] < targets[0]
    lower = p[p < thr[HIGH_SPECIFICITY]]
    if lower.size:
        assert _sens_spec(p, y, lower.max())[1] < targets[1]
    assert thr[HIGH_SENSITIVITY] <= thr[HIGH_SPECIFICITY] or targets == (0.9, 0.8)


def test_thresholds_are_finite_even_when_nothing_can_be_called() -> None:
    # The highest score is a normal image: 100 % specificity means calling nothing positive.
    p = np.array([0.9, 0.8, 0.1])
    y = np.array([0, 1, 0])
    thr = choose_thresholds(p, y, 0.5, 1.0)
    assert np.isfinite(thr[HIGH_SPECIFICITY]) and not decide(p, thr)[HIGH_SPECIFICITY].any()


def test_bad_inputs_are_clear_errors() -> None:
    with pytest.raises(OperatingPointError, match="both classes"):
        choose_thresholds(np.array([0.1, 0.2]), np.array([1, 1]))
    with pytest.raises(OperatingPointError, match="target"):
        choose_thresholds(np.array([0.1, 0.2]), np.array([0, 1]), high_sensitivity_target=1.5)
