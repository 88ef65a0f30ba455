"""bonefrac's own small CNN for grayscale radiographs (and volumes); design in docs/custom_cnn.md.

In short: a 1-channel input (no fake RGB), a gentle stem (3×3, stride 2) so
thin fracture lines survive the first downsampling, four residual stages
(32→64→128→256 channels, ~2.8 M parameters: trainable from scratch on a few
thousand images on a CPU), GroupNorm (its statistics do not depend on the batch,
so batches of 8–32 on a CPU, 2-volume batches in 3D and DDP shards all behave
alike and train == eval), and average + max global pooling (a fracture is a
small, local finding that a plain average would dilute).
"""

from __future__ import annotations

import torch
from torch import nn

DEFAULT_WIDTHS = (32, 64, 128, 256)
DEFAULT_DEPTHS = (2, 2, 2, 2)


def _conv(dims: int) -> type[nn.Module]:
    return nn.Conv2d if dims == 2 else nn.Conv3d


def _norm(channels: int) -> nn.GroupNorm:
    # 8 groups (or fewer for narrow layers): batch-independent normalisation.
    return nn.GroupNorm(num_groups=min(8, channels), num_channels=channels)


class ResidualBlock(nn.Module):
    """Pre-activation-free basic block: conv-GN-SiLU-conv-GN + shortcut, then SiLU."""

    def __init__(self, cin: int, cout: int, stride: int, dims: int) -> None:
        super().__init__()
        conv = _conv(dims)
        self.conv1 = conv(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(cout)
        self.conv2 = conv(cout, cout, 3, padding=1, bias=False)
        self.norm2 = _norm(cout)
        self.act = nn.SiLU(inplace=True)
        self.shortcut: nn.Module
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(conv(cin, cout, 1, stride=stride, bias=False), _norm(cout))
        else:
            self.shortcut = nn.Identity()
        # Zero-init the last norm's scale: each block starts as identity, which lets the
        # network train stably from scratch without warm-up tricks (Goyal et al. 2017).
        nn.init.zeros_(self.norm2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class AvgMaxPool(nn.Module):
    """Concatenate global average and global max pooling → (N, 2C)."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(2)
        return torch.cat([flat.mean(dim=2), flat.amax(dim=2)], dim=1)


class CustomCNN(nn.Module):
    """Feature extractor: (N, 1, ...) on [0, 1] → (N, 2 × widths[-1]) pooled features."""

    def __init__(
        self,
        spatial_dims: int = 2,
        widths: tuple[int, ...] = DEFAULT_WIDTHS,
        depths: tuple[int, ...] = DEFAULT_DEPTHS,
        stem_width: int = 24,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        conv = _conv(spatial_dims)
        self.stem = nn.Sequential(
            conv(1, stem_width, 3, stride=2, padding=1, bias=False), _norm(stem_width), nn.SiLU(inplace=True)
        )
        stages = []
        cin = stem_width
        for i, (w, d) in enumerate(zip(widths, depths, strict=True)):
            blocks = [ResidualBlock(cin, w, stride=1 if i == 0 else 2, dims=spatial_dims)]
            blocks += [ResidualBlock(w, w, stride=1, dims=spatial_dims) for _ in range(d - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.pool = AvgMaxPool(spatial_dims)
        self.num_features = 2 * widths[-1]
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Centre the [0, 1] input; GroupNorm after the stem handles the scale.
        x = self.stem(x - 0.5)
        return self.pool(self.stages(x))
