"""Glue between the registry, the scorer and the gate: judge one registered challenger.

Kept out of the flows so the CLI (`bonefrac promote`) and the retrain flow
apply the very same rule.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bonefrac.config import PromotionParams
from bonefrac.registry import store
from bonefrac.registry.promotion import Decision, evaluate_gate, high_sensitivity_threshold
from bonefrac.registry.scoring import score_split


def judge(
    challenger_tag: str,
    cache_dir: str | Path,
    params: PromotionParams,
    seed: int = 0,
    challenger_scores: tuple[np.ndarray, np.ndarray] | None = None,
    champion_scores: np.ndarray | None = None,
) -> Decision:
    """Gate decision for ``challenger_tag`` against the current champion, on the cache's test split.

    Scores can be passed in (the retrain flow caches them per model and data
    version); otherwise both models are scored here on the same images.
    """
    challenger = store.load_bundle(challenger_tag)
    if challenger_scores is None:
        labels, probs, _ = score_split(challenger, cache_dir)
    else:
        labels, probs = challenger_scores
    champion = store.champion_record(challenger_tag.split(":")[0])
    champ_probs = None
    if champion is not None and champion.tag != challenger_tag:
        champ_probs = (
            champion_scores
            if champion_scores is not None
            else score_split(store.load_bundle(champion.tag), cache_dir)[1]
        )
    decision = evaluate_gate(
        labels, probs, high_sensitivity_threshold(challenger.operating_points), params, champ_probs, seed
    )
    decision.stats["challenger"] = challenger_tag
    decision.stats["champion"] = champion.tag if champion is not None and champ_probs is not None else None
    return decision


def apply(decision: Decision, challenger_tag: str) -> str:
    """Promote or reject in the registry; returns what happened, in words."""
    if decision.promote:
        previous = store.promote(challenger_tag, reason="; ".join(decision.reasons))
        return f"promoted {challenger_tag}" + (f" (archived {previous})" if previous else "")
    store.reject(challenger_tag, decision.reasons)
    return f"rejected {challenger_tag}"
