"""Operating points: the probability thresholds a reader actually acts on.

Commercial fracture AI (e.g. BoneView) shows two: a high-sensitivity point for
triage ("do not miss a fracture") and a high-specificity point for
confirmation ("flag only what is almost certainly broken"). Both are chosen on
the validation split, on calibrated probabilities, and stored in the model
bundle; the test split only measures them. The decision rule everywhere is
``prob >= threshold`` (scikit-learn's ``roc_curve`` convention), applied by
:func:`bonefrac.model.calibrate.decide`.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_curve

from bonefrac.errors import BonefracError

HIGH_SENSITIVITY = "high_sensitivity"
HIGH_SPECIFICITY = "high_specificity"


class OperatingPointError(BonefracError, ValueError):
    """Scores or labels from which no threshold can be chosen."""


def _finite(threshold: float, probs: np.ndarray) -> float:
    # roc_curve's first threshold is +inf ("call nothing positive"); store a finite
    # number with the same effect so the bundle stays JSON-friendly.
    if np.isfinite(threshold):
        return float(threshold)
    return float(np.nextafter(max(1.0, float(np.max(probs))), np.inf))


def choose_thresholds(
    probs: np.ndarray,
    labels: np.ndarray,
    high_sensitivity_target: float = 0.95,
    high_specificity_target: float = 0.95,
) -> dict[str, float]:
    """Thresholds on ``probs`` meeting each target on these data (the validation split).

    - ``high_sensitivity``: the highest threshold whose sensitivity is >= the target
      (so specificity is as high as it can be while meeting the target);
    - ``high_specificity``: the lowest threshold whose specificity is >= the target
      (so sensitivity is as high as it can be while meeting the target).
    """
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if p.shape != y.shape or p.size == 0:
        raise OperatingPointError(
            f"need equal-length, non-empty probs and labels (got {p.size} and {y.size})"
        )
    if not np.all(np.isfinite(p)):
        raise OperatingPointError("probabilities contain NaN or infinite values")
    if set(np.unique(y).tolist()) != {0, 1}:
        raise OperatingPointError("choosing thresholds needs both classes (labels 0 and 1)")
    for name, t in (
        ("high_sensitivity_target", high_sensitivity_target),
        ("high_specificity_target", high_specificity_target),
    ):
        if not 0.0 < t <= 1.0:
            raise OperatingPointError(f"{name} must be in (0, 1], got {t}")

    fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)
    # thresholds decrease and tpr/fpr increase along the curve.
    sens_ok = np.flatnonzero(tpr >= high_sensitivity_target)
    t_sens = thr[sens_ok[0]]  # first (highest) threshold reaching the target
    spec_ok = np.flatnonzero(1.0 - fpr >= high_specificity_target)
    t_spec = thr[spec_ok[-1]]  # last (lowest) threshold still meeting the target
    return {HIGH_SENSITIVITY: _finite(t_sens, p), HIGH_SPECIFICITY: _finite(t_spec, p)}
