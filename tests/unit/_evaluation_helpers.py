"""Shared helpers for the evaluation tests: a tiny network obeying the model contract."""

from __future__ import annotations

import torch
from torch import nn

from bonefrac.model.bundle import ModelBundle
from bonefrac.model.calibrate import IDENTITY, CalibrationMap
from bonefrac.model.transforms import PreprocessSpec


class TinyNet(nn.Module):
    """(N, 1, H, W) → (N, 1 + T) logits; has ``gradcam_layer`` but no ``features`` method."""

    def __init__(self, num_types: int = 0, spatial_dims: int = 2, width: int = 8) -> None:
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        pool = nn.AdaptiveMaxPool2d(1) if spatial_dims == 2 else nn.AdaptiveMaxPool3d(1)
        self.body = nn.Sequential(
            conv(1, width, 3, padding=1), nn.ReLU(), conv(width, width, 3, padding=1), nn.ReLU()
        )
        self.pool = pool
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(width, 1 + num_types))
        self.gradcam_layer = "body.3"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.body(x)))


def tiny_bundle(
    model: nn.Module,
    type_names: list[str] | None = None,
    image_size: int = 32,
    calibration: CalibrationMap = IDENTITY,
    operating_points: dict[str, float] | None = None,
) -> ModelBundle:
    """A bundle whose preprocessing is *not* the default (so a consumer that drops it is caught)."""
    return ModelBundle(
        arch="tiny",
        state_dict=model.state_dict(),
        preprocess_spec=PreprocessSpec(image_size=image_size, lower_percentile=2.0, upper_percentile=98.0),
        type_names=type_names or [],
        calibration=calibration,
        operating_points=operating_points or {},
    )
