"""benchmarks.epoch_selection: each checkpoint rule reads validation numbers only and keeps the right epoch."""

from __future__ import annotations

from benchmarks.epoch_selection import RULES, score_rules


def _history(val_auroc, val_pointing, test_pointing, test_auroc):
    return [
        {"epoch": i + 1, "val_auroc": a, "val_pointing_tta": p, "test_pointing_tta": tp, "test_auroc": ta}
        for i, (a, p, tp, ta) in enumerate(zip(val_auroc, val_pointing, test_pointing, test_auroc, strict=True))
    ]


def test_each_rule_keeps_the_epoch_it_names():
    h = _history(
        val_auroc=[0.80, 0.90, 0.85, 0.88],
        val_pointing=[0.30, 0.35, 0.60, 0.50],
        test_pointing=[0.1, 0.2, 0.3, 0.4],
        test_auroc=[0.81, 0.82, 0.83, 0.84],
    )
    picks = {name: rule(h) for name, rule in RULES.items()}
    assert picks == {
        "best_val_auroc (the preset)": 1,
        "last_epoch": 3,
        "best_val_pointing": 2,
        "best_val_auroc_plus_pointing": 2,  # 1.45 at epoch 3 beats 1.25 and 1.38
        "best_val_auroc_second_half": 3,  # epochs 3-4: 0.85 vs 0.88
    }


def test_rules_ignore_the_test_numbers_and_scores_are_the_picked_epochs():
    h1 = _history([0.9, 0.8], [0.5, 0.4], [0.0, 1.0], [0.5, 0.99])
    h2 = _history([0.7, 0.8], [0.4, 0.5], [1.0, 0.0], [0.99, 0.5])
    scored = score_rules([h1, h2])
    preset = scored["best_val_auroc (the preset)"]
    assert preset["epochs"] == [1, 2]
    assert preset["test_pointing_tta"] == [0.0, 0.0] and preset["test_auroc"] == [0.5, 0.5]
    assert preset["pointing_mean_sd"] == [0.0, 0.0]
    last = scored["last_epoch"]
    assert last["test_pointing_tta"] == [1.0, 0.0] and last["pointing_mean_sd"] == [0.5, 0.5]
