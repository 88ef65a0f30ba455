"""Logits → calibrated probability → decision at each operating point → type probabilities.

The one place where a network's raw output becomes something a radiologist reads.
Evaluation, ``bonefrac predict``, the service, the registry gate, drift features and
Grad-CAM all go through :meth:`CalibrationMap.probability` and :func:`decide`
(usually via :meth:`bonefrac.model.bundle.ModelBundle.calibrate`), so the report and
the clinic cannot disagree.

The map is ``p = sigmoid(slope * logit + intercept)``:

- *temperature scaling* (Guo et al. 2017) is ``slope = 1/T, intercept = 0``: it
  rescales confidence but cannot move the decision boundary;
- *Platt scaling* fits both. A network trained with class-weighted BCE (weight w)
  shifts every logit by about ``ln w``; only an intercept can undo that, which is
  why Platt is the pipeline's default (``evaluate.calibration``).

Isotonic regression is not offered: with a few hundred validation images (tens of
fractures) its step function overfits, and it breaks ties that the ROC needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from bonefrac.errors import BonefracError

CalibrationMethod = Literal["identity", "temperature", "platt"]

# Temperatures outside this range mean the validation set is degenerate (for
# example perfectly separated), not that the model needs such a correction.
MIN_TEMPERATURE = 0.05
MAX_TEMPERATURE = 20.0
# Platt slopes are clipped to the same range of "temperatures" for the same reason.
MIN_SLOPE, MAX_SLOPE = 1.0 / MAX_TEMPERATURE, 1.0 / MIN_TEMPERATURE


class CalibrationError(BonefracError, ValueError):
    """Inputs that cannot be used to fit or apply a calibration."""


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function (float64): the project's only sigmoid of a logit."""
    x = np.asarray(x, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -x))


class CalibrationMap(BaseModel):
    """``p = sigmoid(slope * logit + intercept)``, fitted on validation logits, stored in the bundle."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: CalibrationMethod = "identity"
    slope: float = Field(1.0, gt=0)
    intercept: float = 0.0

    @classmethod
    def from_temperature(cls, temperature: float) -> CalibrationMap:
        if not temperature > 0:
            raise CalibrationError(f"temperature must be positive, got {temperature}")
        return cls(method="temperature", slope=1.0 / float(temperature), intercept=0.0)

    @property
    def temperature(self) -> float:
        """``1 / slope``: the equivalent temperature (reports show it beside the intercept)."""
        return 1.0 / self.slope

    def logit(self, logits: np.ndarray) -> np.ndarray:
        """The calibrated logit ``slope * logit + intercept`` (float64)."""
        return self.slope * np.asarray(logits, dtype=np.float64) + self.intercept

    def probability(self, logits: np.ndarray) -> np.ndarray:
        """The calibrated fracture probability."""
        return sigmoid(self.logit(logits))

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "slope": self.slope,
            "intercept": self.intercept,
            "temperature": self.temperature,
        }


IDENTITY = CalibrationMap()


def decide(probs: np.ndarray, operating_points: dict[str, float]) -> dict[str, np.ndarray]:
    """The single decision rule: positive at a point when ``prob >= threshold`` (sklearn's convention)."""
    p = np.asarray(probs, dtype=np.float64)
    return {name: p >= float(t) for name, t in operating_points.items()}


def type_probabilities(type_logits: np.ndarray) -> np.ndarray:
    """A fracture has one type: softmax over the type logits (columns 1.. of the output)."""
    t = torch.as_tensor(np.asarray(type_logits, dtype=np.float64))
    return torch.softmax(t, dim=1).numpy()


@dataclass
class Prediction:
    """Calibrated outputs for a batch; every array has N rows."""

    logit: np.ndarray  # (N,) raw fracture logit
    prob: np.ndarray  # (N,) calibrated probability
    type_probs: np.ndarray | None  # (N, T) softmax over fracture types, None without a type head
    decisions: dict[str, np.ndarray] = field(default_factory=dict)  # operating point -> (N,) bool

    def __len__(self) -> int:
        return int(self.logit.shape[0])

    @property
    def raw_prob(self) -> np.ndarray:
        """Uncalibrated ``sigmoid(logit)`` (the reliability diagram's "before")."""
        return IDENTITY.probability(self.logit)

    def row(self, i: int, type_names: list[str]) -> dict[str, Any]:
        """One image's answer as plain JSON-able values (service response, CSV row)."""
        out: dict[str, Any] = {
            "probability": float(self.prob[i]),
            "logit": float(self.logit[i]),
            "decisions": {k: bool(v[i]) for k, v in self.decisions.items()},
        }
        if self.type_probs is not None and type_names:
            out["fracture_type_probabilities"] = {
                n: float(p) for n, p in zip(type_names, self.type_probs[i], strict=False)
            }
        return out


def calibrate(logits: np.ndarray, calibration: CalibrationMap, operating_points: dict[str, float]) -> Prediction:
    """Network output ``(N, 1 + T)`` (or ``(N,)``) → :class:`Prediction`."""
    out = np.asarray(logits, dtype=np.float64)
    if out.ndim == 1:
        out = out[:, None]
    if out.ndim != 2 or out.shape[1] < 1:
        raise CalibrationError(f"expected logits shaped (N, 1 + types), got {out.shape}")
    fracture = out[:, 0]
    prob = calibration.probability(fracture)
    type_probs = type_probabilities(out[:, 1:]) if out.shape[1] > 1 else None
    return Prediction(logit=fracture, prob=prob, type_probs=type_probs, decisions=decide(prob, operating_points))


# ------------------------------------------------------------------ fitting
def _as_binary(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(logits, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if x.shape != y.shape:
        raise CalibrationError(f"logits and labels differ in length ({x.size} vs {y.size})")
    if x.size == 0:
        raise CalibrationError("no logits given")
    if not np.all(np.isfinite(x)):
        raise CalibrationError("logits contain NaN or infinite values")
    if not np.isin(y, (0, 1)).all():
        raise CalibrationError("labels must be 0 or 1")
    if y.min() == y.max():
        raise CalibrationError("calibration needs both classes in the validation split")
    return x, y.astype(np.float64)


def binary_nll(logits: np.ndarray, labels: np.ndarray, calibration: CalibrationMap = IDENTITY) -> float:
    """Mean negative log-likelihood of the labels under the calibrated probability."""
    x = np.asarray(logits, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    z = calibration.logit(x)
    # log(1 + e^z) - y z  ==  BCE-with-logits, written with logaddexp for stability.
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def _fit_lbfgs(x: np.ndarray, y: np.ndarray, with_intercept: bool, max_iter: int) -> tuple[float, float]:
    """Minimise the log-loss of ``sigmoid(exp(s) * x + b)`` over s (and b); the slope stays positive."""
    xt = torch.as_tensor(x, dtype=torch.float64)
    yt = torch.as_tensor(y, dtype=torch.float64)
    log_slope = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    intercept = torch.zeros(1, dtype=torch.float64, requires_grad=with_intercept)
    params = [log_slope, intercept] if with_intercept else [log_slope]
    opt = torch.optim.LBFGS(params, lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(log_slope.exp() * xt + intercept, yt)
        loss.backward()
        return loss

    opt.step(closure)
    slope, b = float(log_slope.detach().exp()), float(intercept.detach())
    if not (np.isfinite(slope) and np.isfinite(b)):
        raise CalibrationError("calibration fit diverged")
    return float(np.clip(slope, MIN_SLOPE, MAX_SLOPE)), b


def fit_calibration(
    logits: np.ndarray, labels: np.ndarray, method: CalibrationMethod = "platt", max_iter: int = 200
) -> CalibrationMap:
    """Fit the map on validation logits by maximum likelihood (LBFGS, unregularised).

    ``platt`` fits slope and intercept; ``temperature`` the slope alone; ``identity``
    fits nothing. Both classes must be present, or the likelihood has no finite optimum.
    The slope is kept positive (a calibration must never invert the ranking).
    """
    if method == "identity":
        return IDENTITY
    x, y = _as_binary(logits, labels)
    slope, intercept = _fit_lbfgs(x, y, with_intercept=method == "platt", max_iter=max_iter)
    return CalibrationMap(method=method, slope=slope, intercept=intercept if method == "platt" else 0.0)
