"""Losses against direct computations: BCE, class-weighted BCE, focal, masked type loss."""

from __future__ import annotations

import math

import pytest
import torch

from bonefrac.config import ImbalanceParams
from bonefrac.training.losses import FractureLoss, build_loss, positive_weight


def _bce(z: float, y: float, w: float = 1.0) -> float:
    p = 1 / (1 + math.exp(-z))
    return -(w * y * math.log(p) + (1 - y) * math.log(1 - p))


LOGITS = torch.tensor([[2.0, 0.5, -0.5], [-1.0, 0.1, 0.2], [0.3, -2.0, 1.0], [-0.2, 0.0, 0.0]])
LABELS = torch.tensor([1.0, 0.0, 1.0, 0.0])
TYPES = torch.tensor([0, -1, -1, 1])  # row 2 fractured with unknown type, row 3 normal (type ignored)


def test_bce_and_weighted_bce_match_formula() -> None:
    z, y = LOGITS[:, 0].tolist(), LABELS.tolist()
    plain = FractureLoss("bce", type_weight=0.0)(LOGITS, LABELS, TYPES)
    assert float(plain.total) == pytest.approx(
        sum(_bce(a, b) for a, b in zip(z, y, strict=True)) / 4, rel=1e-6
    )
    weighted = FractureLoss("weighted_bce", pos_weight=3.0, type_weight=0.0)(LOGITS, LABELS, TYPES)
    expect = sum(_bce(a, b, 3.0) for a, b in zip(z, y, strict=True)) / 4
    assert float(weighted.total) == pytest.approx(expect, rel=1e-6)
    assert float(weighted.total) > float(plain.total)


def test_focal_matches_formula_and_reduces_to_bce() -> None:
    z, y = LOGITS[:, 0].tolist(), LABELS.tolist()
    gamma = 2.0
    expect = 0.0
    for a, b in zip(z, y, strict=True):
        p = 1 / (1 + math.exp(-a))
        pt = p if b == 1 else 1 - p
        expect += (1 - pt) ** gamma * _bce(a, b)
    focal = FractureLoss("focal", focal_gamma=gamma, type_weight=0.0)(LOGITS, LABELS, TYPES)
    assert float(focal.total) == pytest.approx(expect / 4, rel=1e-6)
    g0 = FractureLoss("focal", focal_gamma=0.0, type_weight=0.0)(LOGITS, LABELS, TYPES)
    assert float(g0.total) == pytest.approx(
        float(FractureLoss("bce")(LOGITS, LABELS, TYPES).fracture), rel=1e-6
    )
    assert float(focal.total) < float(g0.total)


def test_type_loss_only_on_fractured_with_known_type() -> None:
    parts = FractureLoss("bce", type_weight=0.5)(LOGITS, LABELS, TYPES)
    # only row 0 counts: cross-entropy of logits [0.5, -0.5] for class 0
    ce = -math.log(math.exp(0.5) / (math.exp(0.5) + math.exp(-0.5)))
    assert float(parts.type) == pytest.approx(ce, rel=1e-6)
    assert float(parts.total) == pytest.approx(float(parts.fracture) + 0.5 * ce, rel=1e-6)
    none = FractureLoss("bce")(LOGITS, torch.zeros(4), TYPES)
    assert float(none.type) == 0.0
    logits = LOGITS.clone().requires_grad_(True)
    FractureLoss("bce")(logits, torch.zeros(4), TYPES).total.backward()
    assert logits.grad is not None and torch.all(logits.grad[:, 1:] == 0)


def test_positive_weight_and_build() -> None:
    assert positive_weight([1, 0, 0, 0, 0]) == 4.0
    assert positive_weight([0, 0]) == 1.0
    loss = build_loss(ImbalanceParams(loss="weighted_bce"), [1, 0, 0], type_weight=0.3)
    assert float(loss.pos_weight) == 2.0 and loss.type_weight == 0.3
    assert float(build_loss(ImbalanceParams(loss="bce"), [1, 0, 0], 0.3).pos_weight) == 1.0
