"""Promotion gate: paired bootstrap vs a direct computation; accepted and rejected decisions with reasons."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from bonefrac.config import PromotionParams
from bonefrac.evaluation.bootstrap import stratified_indices
from bonefrac.registry.promotion import (
    PromotionError,
    evaluate_gate,
    high_sensitivity_threshold,
    paired_bootstrap_auroc_diff,
    sensitivity_at,
)

PARAMS = PromotionParams(auroc_margin=0.02, min_sensitivity=0.9, bootstrap_samples=200, alpha=0.05)


def _scores(y: np.ndarray, separation: float, seed: int) -> np.ndarray:
    """Probabilities whose AUROC grows with ``separation``."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=y.size) + separation * y
    return 1.0 / (1.0 + np.exp(-z))


@pytest.fixture
def labels() -> np.ndarray:
    return np.array([0] * 150 + [1] * 100)


def test_paired_bootstrap_matches_direct_computation(labels: np.ndarray) -> None:
    a, b = _scores(labels, 2.0, 1), _scores(labels, 1.0, 2)
    idx = stratified_indices(labels, 25, seed=3)
    point, diffs = paired_bootstrap_auroc_diff(labels, a, b, indices=idx)
    assert point == pytest.approx(roc_auc_score(labels, a) - roc_auc_score(labels, b))
    direct = [roc_auc_score(labels[i], a[i]) - roc_auc_score(labels[i], b[i]) for i in idx]
    np.testing.assert_allclose(diffs, direct)
    # pairing: identical models give exactly zero in every replicate
    _, same = paired_bootstrap_auroc_diff(labels, a, a.copy(), n_bootstrap=20)
    assert np.all(same == 0.0)
    # two correlated models (same images are hard for both): pairing narrows the spread
    rng = np.random.default_rng(11)
    shared = rng.normal(size=labels.size)
    c = shared + 2.0 * labels
    d = shared + 1.7 * labels + 0.3 * rng.normal(size=labels.size)
    idx = stratified_indices(labels, 100, seed=5)
    _, paired = paired_bootstrap_auroc_diff(labels, c, d, indices=idx)
    unpaired = np.array([roc_auc_score(labels[i], c[i]) for i in idx]) - np.array(
        [roc_auc_score(labels[j], d[j]) for j in stratified_indices(labels, 100, seed=6)]
    )
    assert paired.std() < 0.5 * unpaired.std()


def test_first_model_promoted_when_sensitive_enough(labels: np.ndarray) -> None:
    probs = _scores(labels, 3.0, 0)
    thr = float(np.quantile(probs[labels == 1], 0.05))  # ~95% sensitivity
    d = evaluate_gate(labels, probs, thr, PARAMS, champion_probs=None)
    assert d.promote
    assert any("no champion yet" in r for r in d.reasons)
    assert d.stats["sensitivity"] >= 0.9 and d.stats["champion"] is None


def test_better_challenger_is_promoted(labels: np.ndarray) -> None:
    champ, chal = _scores(labels, 1.0, 5), _scores(labels, 2.5, 6)
    thr = float(np.quantile(chal[labels == 1], 0.05))
    d = evaluate_gate(labels, chal, thr, PARAMS, champion_probs=champ)
    assert d.promote, d.reasons
    assert any(r.startswith("non-inferior") for r in d.reasons)
    assert d.stats["auroc_diff_lower"] > -PARAMS.auroc_margin
    assert d.stats["auroc_diff"] == pytest.approx(
        roc_auc_score(labels, chal) - roc_auc_score(labels, champ)
    )


def test_worse_challenger_rejected_for_non_inferiority(labels: np.ndarray) -> None:
    champ, chal = _scores(labels, 2.5, 7), _scores(labels, 0.8, 8)
    thr = float(np.quantile(chal[labels == 1], 0.05))
    d = evaluate_gate(labels, chal, thr, PARAMS, champion_probs=champ)
    assert not d.promote
    assert any(r.startswith("not shown non-inferior") for r in d.reasons)
    assert d.stats["auroc_diff_lower"] <= -PARAMS.auroc_margin


def test_insensitive_challenger_rejected_even_with_better_auroc(labels: np.ndarray) -> None:
    champ, chal = _scores(labels, 1.0, 9), _scores(labels, 2.5, 10)
    thr = float(np.quantile(chal[labels == 1], 0.5))  # misses half the fractures
    d = evaluate_gate(labels, chal, thr, PARAMS, champion_probs=champ)
    assert not d.promote
    assert any("below the minimum" in r for r in d.reasons)
    assert any(r.startswith("non-inferior") for r in d.reasons)  # the other condition still reported
    assert d.stats["sensitivity"] == pytest.approx(sensitivity_at(labels, chal, thr))


def test_bad_inputs_are_clear_errors(labels: np.ndarray) -> None:
    with pytest.raises(PromotionError, match="both"):
        evaluate_gate(np.ones(10), np.linspace(0, 1, 10), 0.5, PARAMS)
    with pytest.raises(PromotionError, match="length"):
        evaluate_gate(labels, np.zeros(3), 0.5, PARAMS)
    with pytest.raises(PromotionError, match="high_sensitivity"):
        high_sensitivity_threshold({"youden": 0.4})
    assert high_sensitivity_threshold({"high_sensitivity": 0.25}) == 0.25


def test_chance_level_first_model_is_rejected_by_the_auroc_floor(labels: np.ndarray) -> None:
    """An empty store used to need only sensitivity: a model that calls everything positive got in."""
    chance = np.random.default_rng(12).uniform(size=labels.size)  # AUROC ~0.5
    d = evaluate_gate(labels, chance, 0.0, PARAMS, champion_probs=None)  # threshold 0: sensitivity 1.0
    assert d.stats["sensitivity"] == 1.0 and abs(d.stats["auroc_challenger"] - 0.5) < 0.1
    assert not d.promote
    floor = [r for r in d.reasons if "floor" in r]
    assert len(floor) == 1 and "not above the floor 0.700" in floor[0], d.reasons
    assert d.stats["auroc_challenger_lower"] < PARAMS.min_auroc_lower
    # the floor, and only the floor, rejected it
    assert evaluate_gate(labels, chance, 0.0, PARAMS.model_copy(update={"min_auroc_lower": 0.0})).promote


def test_floor_is_a_bootstrap_lower_bound_not_the_point_estimate(labels: np.ndarray) -> None:
    probs = _scores(labels, 1.2, 13)  # AUROC ~0.8 with a CI of a few points
    point = roc_auc_score(labels, probs)
    floor = point - 0.01  # under the point estimate, above its lower bound
    params = PARAMS.model_copy(update={"min_auroc_lower": floor, "bootstrap_samples": 60})
    d = evaluate_gate(labels, probs, float(np.quantile(probs[labels == 1], 0.05)), params)
    assert not d.promote and d.stats["auroc_challenger_lower"] < floor < point
    direct = np.quantile(
        [roc_auc_score(labels[i], probs[i]) for i in stratified_indices(labels, 60, 0)], PARAMS.alpha
    )
    assert d.stats["auroc_challenger_lower"] == pytest.approx(direct)


def test_presets_set_the_floor() -> None:
    from pathlib import Path

    from bonefrac.config import load_params

    root = Path(__file__).resolve().parents[2]
    assert load_params(root / "params.yaml").promotion.min_auroc_lower == 0.70
    fracatlas = __import__("yaml").safe_load((root / "params" / "fracatlas.yaml").read_text())
    assert fracatlas["promotion"]["min_auroc_lower"] == 0.75
