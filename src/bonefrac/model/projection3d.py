"""A 3D network from two 2D projections (``model.arch: mip_efficientnet3d``).

Measured on the 3D phantoms (120 training volumes, 32×64×64, 1 CPU thread):
MONAI's ResNet-18 (half width), a narrow CustomCNN and a slice-preserving small 3D
CNN, all trained from scratch, stayed at chance (val AUROC ~0.5 after 8–12
epochs) although the fracture gap is plain to see. So this net does what a
radiologist does with a CT of a long bone: it looks at maximum-intensity
projections. The volume (N, 1, D, H, W) is projected along H and along W
(bone is the brightest tissue, so a gap through the cortex shows in the MIP as it
does on a radiograph), each projection is upsampled 2x and fed to the same
ImageNet-pretrained 2D EfficientNet-Lite0, and the two pooled feature vectors
are concatenated. The 2D backbone brings what pretraining learnt to 3D data at the
cost of two small 2D forward passes.

``volume`` is a 1×1×1 convolution initialised to the identity: the only 3D
activation in the net, so Grad-CAM (which needs maps in the input's
dimensionality) is taken there (it then weights the input voxels by their
gradient, i.e. a saliency map). A parameter-free ``nn.Identity`` would not do:
its output needs no gradient, so the backward hook MONAI's Grad-CAM relies on
never fires.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ProjectionNet3D(nn.Module):
    """(N, 1, D, H, W) on [0, 1] → (N, 2 × net.num_features): MIPs along H and W through ``net``."""

    def __init__(self, net: nn.Module, num_features: int, adapter: nn.Module) -> None:
        super().__init__()
        self.volume = nn.Conv3d(1, 1, 1)
        nn.init.ones_(self.volume.weight)
        nn.init.zeros_(self.volume.bias)
        self.adapter = adapter  # grayscale [0, 1] -> what the 2D backbone expects
        self.net = net
        self.num_features = 2 * num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"expected a (N, 1, D, H, W) volume, got {tuple(x.shape)}")
        x = self.volume(x)
        views = [x.amax(dim=3), x.amax(dim=4)]  # (N, 1, D, W), (N, 1, D, H)
        feats = [self.net(self.adapter(F.interpolate(v, scale_factor=2.0, mode="bilinear"))) for v in views]
        return torch.cat(feats, dim=1)
