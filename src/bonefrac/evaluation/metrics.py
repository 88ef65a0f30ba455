"""Fracture-detection metrics the way radiology papers report them.

Point estimates come straight from scikit-learn; confidence intervals from a
class-stratified bootstrap (:mod:`bonefrac.evaluation.bootstrap`). Accuracy is
deliberately absent: with 17 % fractured images, "always normal" scores 83 %.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import (
    average_precision_score,
    balanced_accuracy_score,
    brier_score_loss,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from bonefrac.errors import BonefracError
from bonefrac.evaluation.bootstrap import (
    auroc_replicates,
    average_precision_replicates,
    percentile_interval,
    stratified_indices,
)
from bonefrac.evaluation.calibration import expected_calibration_error
from bonefrac.model.calibrate import decide

OP_METRICS = ("sensitivity", "specificity", "ppv", "npv", "f1", "kappa", "balanced_accuracy")
UNKNOWN_GROUPS = {"", "unknown", "nan", "none"}


class MetricsError(BonefracError, ValueError):
    """Labels or scores on which a metric is undefined (e.g. a single class)."""


def _check(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).reshape(-1).astype(int)
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    if y.shape != p.shape:
        raise MetricsError(f"labels and probabilities differ in length ({y.size} vs {p.size})")
    if not np.isin(y, (0, 1)).all():
        raise MetricsError("labels must be 0 or 1")
    if not np.all(np.isfinite(p)):
        raise MetricsError("probabilities contain NaN or infinite values")
    if y.size == 0 or y.min() == y.max():
        raise MetricsError(f"metrics need both classes (got {int(y.sum())} positive of {y.size})")
    return y, p


def _estimate(value: float, ci: tuple[float, float]) -> dict[str, float]:
    return {"value": float(value), "ci_low": ci[0], "ci_high": ci[1]}


def _op_point_estimates(y: np.ndarray, d: np.ndarray) -> dict[str, float]:
    nan = float("nan")
    return {
        "sensitivity": recall_score(y, d, pos_label=1, zero_division=nan),
        "specificity": recall_score(y, d, pos_label=0, zero_division=nan),
        "ppv": precision_score(y, d, pos_label=1, zero_division=nan),
        "npv": precision_score(y, d, pos_label=0, zero_division=nan),
        "f1": f1_score(y, d, zero_division=0.0),
        "kappa": cohen_kappa_score(y, d),
        "balanced_accuracy": balanced_accuracy_score(y, d),
    }


def _op_bootstrap(y: np.ndarray, d: np.ndarray, idx: np.ndarray) -> dict[str, np.ndarray]:
    """The same formulas as scikit-learn's, on all replicates at once.

    Written out because calling seven scikit-learn functions on each of ~1000
    replicates for every subgroup costs minutes; the point estimates above
    (checked against these in tests) still come from scikit-learn.
    """
    yb, db = y[idx].astype(bool), d[idx].astype(bool)
    tp = (yb & db).sum(1).astype(float)
    fn = (yb & ~db).sum(1).astype(float)
    fp = (~yb & db).sum(1).astype(float)
    tn = (~yb & ~db).sum(1).astype(float)
    n = tp + fn + fp + tn
    with np.errstate(divide="ignore", invalid="ignore"):
        sens = tp / (tp + fn)
        spec = tn / (tn + fp)
        po = (tp + tn) / n
        pe = ((tp + fp) * (tp + fn) + (fn + tn) * (fp + tn)) / n**2
        return {
            "sensitivity": sens,
            "specificity": spec,
            "ppv": tp / (tp + fp),
            "npv": tn / (tn + fn),
            "f1": np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0),
            "kappa": (po - pe) / (1 - pe),
            "balanced_accuracy": (sens + spec) / 2,
        }


def binary_metrics(
    labels: np.ndarray,
    probs: np.ndarray,
    thresholds: Mapping[str, float],
    n_bootstrap: int = 1000,
    ci_level: float = 0.95,
    seed: int = 0,
    n_bins: int = 10,
) -> dict[str, Any]:
    """AUROC/AUPRC with bootstrap CIs, Brier, ECE, and per-operating-point metrics with CIs.

    ``thresholds`` maps an operating-point name to a threshold on ``probs``
    (decision: ``prob >= threshold``).
    """
    y, p = _check(labels, probs)
    idx = stratified_indices(y, n_bootstrap, seed)
    auroc_reps = auroc_replicates(y, p, idx)
    auprc_reps = average_precision_replicates(y, p, idx)
    out: dict[str, Any] = {
        "n": int(y.size),
        "n_positive": int(y.sum()),
        "n_negative": int(y.size - y.sum()),
        "prevalence": float(y.mean()),
        "auroc": _estimate(roc_auc_score(y, p), percentile_interval(auroc_reps, ci_level)),
        "auprc": _estimate(average_precision_score(y, p), percentile_interval(auprc_reps, ci_level)),
        "brier": float(brier_score_loss(y, p)),
        "ece": expected_calibration_error(p, y, n_bins=n_bins),
        "ci_level": float(ci_level),
        "n_bootstrap": int(n_bootstrap),
        "operating_points": {},
    }
    for name, thr in thresholds.items():
        d = decide(p, {"t": thr})["t"].astype(int)
        tn, fp, fn, tp = confusion_matrix(y, d, labels=[0, 1]).ravel()
        point = _op_point_estimates(y, d)
        reps = _op_bootstrap(y, d, idx)
        op: dict[str, Any] = {
            "threshold": float(thr),
            "tp": int(tp),
            "fp": int(fp),
            "tn": int(tn),
            "fn": int(fn),
        }
        for m in OP_METRICS:
            op[m] = _estimate(point[m], percentile_interval(reps[m], ci_level))
        out["operating_points"][name] = op
    return out


def _known(series: pd.Series) -> pd.Series:
    s = series.astype(str).str.strip()
    return ~s.str.lower().isin(UNKNOWN_GROUPS)


@dataclass(frozen=True)
class Subgroup:
    """A manifest column the test metrics are broken down by, and its name in reports (lower case)."""

    column: str
    label: str

    @property
    def key(self) -> str:
        """Its key in the evaluation report (``by_<column>``)."""
        return f"by_{self.column}"


#: The subgroups of every report: the evaluation's metrics, its report and model card, the flat
#: ``metrics/evaluate.json`` keys and the Prefect artifacts all read this one list.
SUBGROUPS: tuple[Subgroup, ...] = (Subgroup("body_part", "body part"), Subgroup("view", "view"))


def grouped_metrics(
    df: pd.DataFrame,
    by: str,
    thresholds: Mapping[str, float],
    n_bootstrap: int = 1000,
    ci_level: float = 0.95,
    seed: int = 0,
    n_bins: int = 10,
    label_col: str = "label",
    prob_col: str = "prob",
) -> dict[str, dict[str, Any]]:
    """``binary_metrics`` per value of column ``by`` (e.g. body part, view).

    Rows whose group is unknown (``""``/``"unknown"``) are left out; a group
    lacking either class is reported with its counts and ``skipped`` instead of
    metrics. Returns ``{}`` when the column is absent or wholly unknown.
    """
    if by not in df.columns:
        return {}
    known = df[_known(df[by])]
    out: dict[str, dict[str, Any]] = {}
    for group, sub in sorted(known.groupby(known[by].astype(str)), key=lambda kv: kv[0]):
        y = sub[label_col].to_numpy().astype(int)
        counts = {"n": int(y.size), "n_positive": int(y.sum())}
        if y.min() == y.max():
            out[group] = {**counts, "skipped": "needs both fractured and normal images"}
            continue
        out[group] = binary_metrics(
            y, sub[prob_col].to_numpy(), thresholds, n_bootstrap, ci_level, seed, n_bins
        )
    return out


def study_level(
    df: pd.DataFrame,
    agg: str = "max",
    study_col: str = "study_id",
    label_col: str = "label",
    prob_col: str = "prob",
) -> pd.DataFrame:
    """One row per study: a study is fractured if any view is; its score aggregates the views'.

    ``agg`` is ``"max"`` (a fracture seen on one view is enough) or ``"mean"``.
    Returns an empty frame when no study ids are known. Other columns keep the
    first view's value (body part is the same across a study's views).
    """
    if agg not in ("max", "mean"):
        raise MetricsError(f"agg must be 'max' or 'mean', got {agg!r}")
    if study_col not in df.columns or not _known(df[study_col]).any():
        return pd.DataFrame(columns=[study_col, label_col, prob_col, "n_views"])
    known = df[_known(df[study_col])]
    g = known.groupby(study_col, sort=True)
    out = g.agg(**{label_col: (label_col, "max"), prob_col: (prob_col, agg), "n_views": (prob_col, "size")})
    for col in ("body_part", "patient_id"):
        if col in known.columns:
            out[col] = g[col].first()
    return out.reset_index()


def type_metrics(
    true_types: Sequence[str], pred_types: Sequence[str], names: Sequence[str]
) -> dict[str, Any]:
    """Fracture-type confusion matrix (rows actual, columns predicted) and macro-F1 over ``names``."""
    t = [str(x) for x in true_types]
    pr = [str(x) for x in pred_types]
    if len(t) != len(pr):
        raise MetricsError(f"true and predicted types differ in length ({len(t)} vs {len(pr)})")
    names = list(names)
    if not t:
        return {
            "names": names,
            "confusion": [[0] * len(names) for _ in names],
            "macro_f1": float("nan"),
            "n": 0,
            "per_class_f1": {},
        }
    cm = confusion_matrix(t, pr, labels=names)
    present = sorted(set(t) & set(names), key=names.index)
    per_class = f1_score(t, pr, labels=names, average=None, zero_division=0.0)
    return {
        "names": names,
        "confusion": cm.astype(int).tolist(),
        # macro over the types that occur in the ground truth: an absent type has no defined recall.
        "macro_f1": float(f1_score(t, pr, labels=present, average="macro", zero_division=0.0)),
        "per_class_f1": {n: float(f) for n, f in zip(names, per_class, strict=True)},
        "n": len(t),
    }


def flat_summary(results: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, float]:
    """Flatten nested metrics to ``{"auroc.value": 0.91, ...}`` (numbers only) for ``dvc metrics``.

    Non-finite values are dropped (JSON has no NaN) and so are strings and lists.
    """
    flat: dict[str, float] = {}
    for k, v in results.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            flat.update(flat_summary(v, key, sep))
        elif isinstance(v, bool):
            continue
        elif isinstance(v, int | float | np.integer | np.floating) and math.isfinite(float(v)):
            flat[key] = int(v) if isinstance(v, int | np.integer) else round(float(v), 6)
    return flat
