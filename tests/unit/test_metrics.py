"""Metrics agree with a direct scikit-learn computation; CIs behave like CIs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from bonefrac.evaluation.bootstrap import stratified_indices
from bonefrac.evaluation.metrics import (
    MetricsError,
    _op_bootstrap,
    binary_metrics,
    flat_summary,
    grouped_metrics,
    study_level,
    type_metrics,
)


def _scores(
    n: int, seed: int = 0, prevalence: float = 0.3, sep: float = 1.5
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    y[:2] = [0, 1]
    logit = rng.normal(size=n) + sep * (2 * y - 1) / 2
    return y, 1 / (1 + np.exp(-logit))


def test_point_estimates_match_sklearn() -> None:
    y, p = _scores(300)
    thr = {"a": 0.3, "b": 0.7}
    m = binary_metrics(y, p, thr, n_bootstrap=50, seed=1)
    assert m["auroc"]["value"] == pytest.approx(skm.roc_auc_score(y, p))
    assert m["auprc"]["value"] == pytest.approx(skm.average_precision_score(y, p))
    assert m["brier"] == pytest.approx(skm.brier_score_loss(y, p))
    assert m["n"] == 300 and m["n_positive"] == int(y.sum())
    for name, t in thr.items():
        d = (p >= t).astype(int)
        op = m["operating_points"][name]
        tn, fp, fn, tp = skm.confusion_matrix(y, d).ravel()
        assert (op["tp"], op["fp"], op["tn"], op["fn"]) == (tp, fp, tn, fn)
        assert op["sensitivity"]["value"] == pytest.approx(skm.recall_score(y, d))
        assert op["specificity"]["value"] == pytest.approx(skm.recall_score(y, d, pos_label=0))
        assert op["ppv"]["value"] == pytest.approx(skm.precision_score(y, d))
        assert op["npv"]["value"] == pytest.approx(skm.precision_score(y, d, pos_label=0))
        assert op["f1"]["value"] == pytest.approx(skm.f1_score(y, d))
        assert op["kappa"]["value"] == pytest.approx(skm.cohen_kappa_score(y, d))
        assert op["balanced_accuracy"]["value"] == pytest.approx(skm.balanced_accuracy_score(y, d))


def test_vectorised_bootstrap_formulas_match_sklearn() -> None:
    y, p = _scores(120, seed=3)
    d = (p >= 0.5).astype(int)
    idx = stratified_indices(y, 5, seed=0)
    reps = _op_bootstrap(y, d, idx)
    for r, i in enumerate(idx):
        yi, di = y[i], d[i]
        assert reps["sensitivity"][r] == pytest.approx(skm.recall_score(yi, di))
        assert reps["specificity"][r] == pytest.approx(skm.recall_score(yi, di, pos_label=0))
        assert reps["ppv"][r] == pytest.approx(skm.precision_score(yi, di))
        assert reps["f1"][r] == pytest.approx(skm.f1_score(yi, di))
        assert reps["kappa"][r] == pytest.approx(skm.cohen_kappa_score(yi, di))
        assert reps["balanced_accuracy"][r] == pytest.approx(skm.balanced_accuracy_score(yi, di))


def test_ci_contains_point_and_narrows_with_n() -> None:
    widths = []
    for n in (80, 2000):
        y, p = _scores(n, seed=5)
        m = binary_metrics(y, p, {"op": 0.5}, n_bootstrap=300, seed=2)
        for est in (m["auroc"], m["auprc"], m["operating_points"]["op"]["sensitivity"]):
            assert est["ci_low"] <= est["value"] <= est["ci_high"]
        widths.append(m["auroc"]["ci_high"] - m["auroc"]["ci_low"])
    assert widths[1] < widths[0] / 2


def test_bootstrap_is_reproducible_and_stratified() -> None:
    y, p = _scores(100, seed=9)
    a = binary_metrics(y, p, {}, n_bootstrap=100, seed=4)
    b = binary_metrics(y, p, {}, n_bootstrap=100, seed=4)
    assert a["auroc"] == b["auroc"]
    idx = stratified_indices(y, 20, seed=0)
    assert (y[idx].sum(1) == y.sum()).all()


def test_single_class_is_a_clear_error() -> None:
    with pytest.raises(MetricsError, match="both classes"):
        binary_metrics(np.zeros(10), np.linspace(0, 1, 10), {}, n_bootstrap=10)


def test_grouped_metrics_skips_single_class_groups_and_unknowns() -> None:
    y, p = _scores(200, seed=1)
    parts = np.where(np.arange(200) % 2 == 0, "hand", "leg").astype(object)
    parts[:10] = "unknown"
    df = pd.DataFrame({"label": y, "prob": p, "body_part": parts})
    df.loc[df.index[-5:], "body_part"] = "hip"
    df.loc[df.index[-5:], "label"] = 0
    g = grouped_metrics(df, "body_part", {"op": 0.5}, n_bootstrap=20)
    assert set(g) == {"hand", "leg", "hip"}
    assert g["hip"]["n"] == 5 and "skipped" in g["hip"]
    hand = df[df.body_part == "hand"]
    assert g["hand"]["n"] == len(hand)
    assert g["hand"]["auroc"]["value"] == pytest.approx(skm.roc_auc_score(hand.label, hand.prob))
    assert grouped_metrics(df, "view", {}, n_bootstrap=10) == {}


def test_study_level_aggregates_views() -> None:
    df = pd.DataFrame(
        {
            "study_id": ["s1", "s1", "s2", "s2", "", "s3"],
            "label": [0, 1, 0, 0, 1, 1],
            "prob": [0.2, 0.6, 0.1, 0.3, 0.9, 0.8],
            "body_part": ["hand", "hand", "leg", "leg", "hip", "hip"],
        }
    )
    s = study_level(df, agg="max").set_index("study_id")
    assert list(s.index) == ["s1", "s2", "s3"]
    assert s.loc["s1", "label"] == 1 and s.loc["s1", "prob"] == pytest.approx(0.6)
    assert s.loc["s2", "n_views"] == 2 and s.loc["s2", "prob"] == pytest.approx(0.3)
    assert study_level(df, agg="mean").set_index("study_id").loc["s1", "prob"] == pytest.approx(0.4)
    assert study_level(df.assign(study_id=""), agg="max").empty
    with pytest.raises(MetricsError):
        study_level(df, agg="median")


def test_type_metrics_match_sklearn() -> None:
    names = ["transverse", "oblique", "spiral"]
    t = ["transverse", "oblique", "spiral", "spiral", "oblique", "transverse"]
    pr = ["transverse", "spiral", "spiral", "spiral", "oblique", "oblique"]
    m = type_metrics(t, pr, names)
    assert m["confusion"] == skm.confusion_matrix(t, pr, labels=names).tolist()
    assert m["macro_f1"] == pytest.approx(skm.f1_score(t, pr, labels=names, average="macro"))
    assert m["n"] == 6


def test_flat_summary_is_numbers_only() -> None:
    y, p = _scores(60)
    flat = flat_summary(binary_metrics(y, p, {"high_sensitivity": 0.2}, n_bootstrap=20), prefix="test")
    assert "test.auroc.value" in flat and "test.operating_points.high_sensitivity.sensitivity.ci_low" in flat
    assert all(isinstance(v, int | float) for v in flat.values())


def test_vectorised_ranking_replicates_match_sklearn() -> None:
    from bonefrac.evaluation.bootstrap import auroc_replicates, average_precision_replicates

    y, p = _scores(90, seed=11)
    p = np.round(p, 1)  # many ties: both metrics must treat a tie run as one threshold
    idx = stratified_indices(y, 8, seed=3)
    au, ap = auroc_replicates(y, p, idx), average_precision_replicates(y, p, idx)
    for r, i in enumerate(idx):
        assert au[r] == pytest.approx(skm.roc_auc_score(y[i], p[i]))
        assert ap[r] == pytest.approx(skm.average_precision_score(y[i], p[i]))
