"""Training losses: fracture (BCE, class-weighted BCE, focal) + fracture type (multi-task).

The fracture loss works on column 0 of the logits. The class weight of
``weighted_bce`` is ``n_negative / n_positive`` of the training split (BCE's
``pos_weight``): a FracAtlas-like 1:4.6 imbalance otherwise lets "always normal"
look good. Focal loss (Lin et al. 2017, torchvision's implementation) instead
down-weights the many easy negatives. The type loss is a cross-entropy over
columns 1.. and is computed only on fractured samples whose type is known
(``type_index >= 0``): a normal radiograph has no fracture type to learn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from bonefrac.config import ImbalanceParams


def positive_weight(labels: torch.Tensor | list[int]) -> float:
    """``n_negative / n_positive`` (1.0 when a class is absent, so nothing explodes)."""
    y = torch.as_tensor(labels, dtype=torch.float64)
    pos = float(y.sum())
    neg = float(len(y) - pos)
    return neg / pos if pos > 0 and neg > 0 else 1.0


@dataclass
class LossParts:
    total: torch.Tensor
    fracture: torch.Tensor
    type: torch.Tensor


class FractureLoss(nn.Module):
    """``fracture_loss + type_weight × type_loss`` on (N, 1 + T) logits."""

    def __init__(
        self,
        kind: str = "bce",
        pos_weight: float = 1.0,
        focal_gamma: float = 2.0,
        type_weight: float = 0.5,
    ) -> None:
        super().__init__()
        if kind not in ("bce", "weighted_bce", "focal"):
            raise ValueError(f"imbalance.loss must be bce | weighted_bce | focal, got {kind!r}")
        self.kind = kind
        self.focal_gamma = focal_gamma
        self.type_weight = type_weight
        self.register_buffer("pos_weight", torch.tensor([pos_weight if kind == "weighted_bce" else 1.0]))

    def fracture_loss(self, logit: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.to(logit.dtype)
        if self.kind == "focal":
            # alpha=-1: no extra class weighting; gamma does the re-weighting.
            return sigmoid_focal_loss(logit, target, alpha=-1, gamma=self.focal_gamma, reduction="mean")
        return F.binary_cross_entropy_with_logits(logit, target, pos_weight=self.pos_weight.to(logit.dtype))

    def type_loss(
        self, type_logits: torch.Tensor, label: torch.Tensor, type_index: torch.Tensor
    ) -> torch.Tensor:
        mask = (label > 0.5) & (type_index >= 0)
        if type_logits.shape[1] == 0 or not bool(mask.any()):
            # Zero that still depends on the logits, so every parameter gets a (zero) gradient
            # and DDP's all-reduce sees the same parameters on every rank.
            return type_logits.sum() * 0.0
        return F.cross_entropy(type_logits[mask], type_index[mask])

    def forward(self, logits: torch.Tensor, label: torch.Tensor, type_index: torch.Tensor) -> LossParts:
        logits = logits.float()  # losses in fp32 even under autocast
        frac = self.fracture_loss(logits[:, 0], label)
        typ = self.type_loss(logits[:, 1:], label, type_index)
        return LossParts(total=frac + self.type_weight * typ, fracture=frac, type=typ)


def build_loss(imbalance: ImbalanceParams, train_labels: list[int], type_weight: float) -> FractureLoss:
    """The loss the params ask for, class weight taken from the training labels."""
    return FractureLoss(
        kind=imbalance.loss,
        pos_weight=positive_weight(train_labels),
        focal_gamma=imbalance.focal_gamma,
        type_weight=type_weight,
    )
