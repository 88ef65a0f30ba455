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

Imports only torch/timm and the model layer's own ImageNet helpers.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bonefrac.model.imagenet import GrayToImageNet, lite0_backbone

PoolMode = Literal["lse", "topk", "max", "mean"]

#: Channels of Lite0's stage outputs the trunk returns (blocks.4 at stride 16, blocks.5 at 32).
S16_CHANNELS = 112
S32_CHANNELS = 192
#: Channels of ``blocks.2`` (stride 8): the optional fine tap of a stride-8 dense head.
S8_CHANNELS = 40


class _Lite0(nn.Module):
    """ImageNet EfficientNet-Lite0 for grayscale input: ``input_adapter`` + ``backbone`` (timm)."""

    def __init__(self, pretrained: str) -> None:
        super().__init__()
        if pretrained not in ("none", "imagenet", "efficientnet_lite_offline"):
            raise ValueError(f"the dense archs start from ImageNet Lite0 or from scratch, not {pretrained!r}")
        self.input_adapter = GrayToImageNet()
        self.backbone = lite0_backbone(pretrained != "none")


def _lite0(pretrained: str) -> nn.Module:
    return _Lite0(pretrained)


class FrozenTrunk(nn.Module):
    """Grayscale [0, 1] ``(N, 1, H, W)`` → (stride-16 ``blocks.4``, stride-32 ``blocks.<last_block>``) features,
    plus the stride-8 ``blocks.2`` map with ``tap8``.

    ``last_block=5`` is what the feature cache stores; ``6`` also freezes Lite0's last stage
    (320 ch), for heads that train nothing of the backbone; ``4`` stops at the stride-16 map
    (the stride-32 output is ``None``: a head that trains ``blocks.5`` computes it).

    Always in eval mode (BatchNorm running statistics, no dropout): its outputs are cached.
    """

    def __init__(
        self,
        pretrained: str = "efficientnet_lite_offline",
        last_block: int = 5,
        lite0: nn.Module | None = None,
        tap8: bool = False,
    ) -> None:
        super().__init__()
        self.tap8 = tap8
        if last_block not in (4, 5, 6):
            raise ValueError(f"last_block must be 4, 5 or 6, got {last_block}")
        net = lite0 if lite0 is not None else _lite0(pretrained)
        bb = net.backbone
        self.input_adapter = net.input_adapter
        self.conv_stem = bb.conv_stem
        self.bn1 = bb.bn1
        self.blocks = nn.Sequential(*[bb.blocks[i] for i in range(last_block + 1)])
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    @classmethod
    def from_lite0(cls, lite0: nn.Module, last_block: int, tap8: bool = False) -> FrozenTrunk:
        """The trunk sharing the modules of an already built Lite0 ``FractureNet``."""
        return cls(last_block=last_block, lite0=lite0, tap8=tap8)

    def train(self, mode: bool = True) -> FrozenTrunk:
        return super().train(False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """``(s16, s32)``, or ``(s16, s32, s8)`` with ``tap8`` (``blocks.2``, stride 8, 40 ch)."""
        x = self.bn1(self.conv_stem(self.input_adapter(x)))
        for i in range(3):
            x = self.blocks[i](x)
        s8 = x
        for i in range(3, 5):
            x = self.blocks[i](x)
        s16, s32 = x, None
        if len(self.blocks) > 5:
            s32 = x
            for i in range(5, len(self.blocks)):
                s32 = self.blocks[i](s32)
        return (s16, s32, s8) if self.tap8 else (s16, s32)


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
    when the stride-32 input already is its (frozen) output. ``blocks5``: Lite0's stage 5,
    trained too: the stride-32 map is then computed from the stride-16 input (the ``s32``
    argument is ignored and may be ``None``). The FPN merge projects the
    stride-32 and stride-16 maps to ``width`` channels, adds them after a 2× bilinear
    upsample, refines with a 3×3 conv, and a 1×1 conv gives one fracture logit per
    stride-16 cell. The image logit pools the map (:func:`pool_logit_map`).

    ``s8_channels > 0`` adds one more FPN level: the merged stride-16 map, upsampled 2×, plus
    a projection of the frozen stride-8 ``blocks.2`` map, refined by a second 3×3 conv; the
    logit map is then per stride-8 cell. Why: a median FracAtlas fracture box is ~33 px at
    512 px input, two stride-16 cells; the stride-16 map's peak lands within one cell of the
    box on ~64 % of boxed test fractures but inside it on ~40 % (grouped CV), so the grid, not
    the recognition, loses the remaining hits.
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
        blocks5: nn.Module | None = None,
        s8_channels: int = 0,
    ) -> None:
        super().__init__()
        self.blocks5 = blocks5
        self.blocks6 = blocks6 if blocks6 is not None else nn.Identity()
        self.lat32 = nn.Conv2d(s32_channels, width, 1)
        self.lat16 = nn.Conv2d(s16_channels, width, 1)
        self.smooth = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        self.s8_channels = s8_channels
        if s8_channels:
            self.lat8 = nn.Conv2d(s8_channels, width, 1)
            self.smooth8 = nn.Sequential(
                nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
            )
        self.drop = nn.Dropout2d(dropout)
        self.out = nn.Conv2d(width, 1, 1)
        # Start with a low prior (~2 % of cells fractured): stable dense BCE from the first step.
        nn.init.constant_(self.out.bias, -4.0)
        self.pool, self.lse_r, self.topk = pool, lse_r, topk

    def late(self, s16: torch.Tensor, s32: torch.Tensor | None) -> torch.Tensor:
        """The stride-32 map after the head's Lite0 blocks (``blocks.5`` where held, ``blocks.6``)."""
        if self.blocks5 is not None:
            s32 = self.blocks5(s16)
        return self.blocks6(s32)

    def forward(
        self, s16: torch.Tensor, s32: torch.Tensor | None, s8: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_after_late(s16, self.late(s16, s32), s8)

    def forward_after_late(
        self, s16: torch.Tensor, late32: torch.Tensor, s8: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The FPN and logit map from the late blocks' output (precomputed when those blocks are frozen).

        ``s8``: the stride-8 map, required by (and only by) a head built with ``s8_channels``."""
        if (s8 is not None) != bool(self.s8_channels):
            raise ValueError(f"this head {'needs' if self.s8_channels else 'takes no'} stride-8 features")
        top = self.lat32(late32)
        up = F.interpolate(top, size=s16.shape[-2:], mode="bilinear", align_corners=False)
        fmap = self.smooth(self.lat16(s16) + up)
        if s8 is not None:
            up = F.interpolate(fmap, size=s8.shape[-2:], mode="bilinear", align_corners=False)
            fmap = self.smooth8(self.lat8(s8) + up)
        logit_map = self.out(self.drop(fmap))
        image = pool_logit_map(logit_map, self.pool, self.lse_r, self.topk)
        return image[:, None], logit_map


def shift_image(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``x`` ``(N, C, H, W)`` with its content moved by ``(dy, dx)`` px (down/right when positive), same
    size: the edge rows/columns are repeated into the gap, the ones pushed out are cut off."""
    h, w = x.shape[-2:]
    x = F.pad(x, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)), mode="replicate")
    return x[..., max(-dy, 0) : max(-dy, 0) + h, max(-dx, 0) : max(-dx, 0) + w]


def stitch_shifts(stride: int) -> tuple[tuple[int, int], ...]:
    """The four input shifts whose stride-``stride`` maps interleave into one stride-``stride/2`` map
    (row-major: (-s, -s), (-s, +s), (+s, -s), (+s, +s) with ``s = stride / 4``)."""
    if stride % 4:
        raise ValueError(f"shift-and-stitch needs a map stride divisible by 4, got {stride}")
    s = stride // 4
    return ((s, s), (s, -s), (-s, s), (-s, -s))


def stitch_maps(maps: list[torch.Tensor]) -> torch.Tensor:
    """Four ``(N, 1, h, w)`` maps of the :func:`stitch_shifts` inputs → one ``(N, 1, 2h, 2w)`` map.

    Shift-and-stitch (Long et al., FCN, 2015): moving the input's content by ``+s`` px puts the
    cell whose footprint is centred at ``stride·(i + ½)`` on the content at ``stride·i + stride/2 - s``,
    so the shifts ``±stride/4`` sample the same head at the centres of a grid twice as fine, in the
    footprint convention every display of the map already uses (a cell of the fine map centred at
    ``stride/2·(k + ½)``). Why: a stride-16 map can only peak at a cell centre, and a median
    FracAtlas box (~33 px at 512 px) spans about two cells: on about one boxed fracture in five the
    peak lands within 8 px of the box but outside it.
    """
    if len(maps) != 4:
        raise ValueError(f"stitching needs the four shifted maps, got {len(maps)}")
    n, c, h, w = maps[0].shape
    fine = maps[0].new_zeros(n, c, 2 * h, 2 * w)
    # content moved +s (down/right) → the cell sees what lies s px up/left of its centre: the fine cell 2i
    for (dy, dx), m in zip(stitch_shifts(4), maps, strict=True):
        fine[..., (0 if dy > 0 else 1) :: 2, (0 if dx > 0 else 1) :: 2] = m
    return fine


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
    kind: Literal["dense", "gap"],
    train_blocks6: bool = False,
    pretrained: str = "efficientnet_lite_offline",
    train_blocks5: bool = False,
    **kw,
) -> nn.Module:
    """A head for the trunk's features; ``train_blocks6``: include Lite0's pretrained ``blocks.6``.

    Without it the stride-32 input must already be ``blocks.6``'s output (a trunk with
    ``last_block=6``); with it, the trunk stops at ``blocks.5`` (what the cache stores).
    ``train_blocks5`` (dense only; implies ``train_blocks6``): ``blocks.5`` too, on the
    stride-16 input (a trunk with ``last_block=4``).
    """
    lite = _lite0(pretrained) if (train_blocks6 or train_blocks5) else None
    b6 = lite.backbone.blocks[6] if lite is not None else None
    if kind == "dense":
        b5 = lite.backbone.blocks[5] if train_blocks5 and lite is not None else None
        return DenseFractureHead(b6, blocks5=b5, **kw)
    if train_blocks5:
        raise ValueError("train_blocks5 is for the dense head")
    if kind == "gap":
        neck = None
        if b6 is not None:
            width = kw.pop("width", 128)
            neck = nn.Sequential(b6, nn.Conv2d(320, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
            kw["width"] = width
        return GlobalPoolHead(neck, **kw)
    raise ValueError(f"unknown head kind {kind!r}; choose dense or gap")


class HeadEnsemble(nn.Module):
    """Dense heads trained apart (different seeds) on the same trunk: their mean logit and mean map.

    Why: heads trained with different seeds disagree on single images, and one head costs a few
    minutes on the cached trunk features against the trunk pass the cache already paid for, so
    averaging a few may buy AUROC at little training cost (not yet measured on FracAtlas: the
    benchmark's seed variants ``dense_lse_box_b6_s1``/``_s2`` are there for it). The image
    logit is the mean of the members' pooled logits (what each was trained and validated on);
    the map is the mean of their logit maps, i.e. the evidence all members share.
    """

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    @property
    def blocks5(self) -> nn.Module | None:
        """The members' ``blocks.5`` (frozen at the trunk cache: equal weights), if they hold one."""
        return getattr(self.members[0], "blocks5", None)

    def forward(
        self, s16: torch.Tensor, s32: torch.Tensor | None, s8: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        outs = [m(s16, s32, s8) for m in self.members]
        return torch.stack([o[0] for o in outs]).mean(0), torch.stack([o[1] for o in outs]).mean(0)


def _cat_views(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    """One batch from the views' tensors of one trunk output (``None`` where the trunk has no such output)."""
    if any(t is None for t in parts):
        return None
    return parts[0] if len(parts) == 1 else torch.cat(parts)  # type: ignore[arg-type]


class DenseFractureNet(nn.Module):
    """Trunk + head, end to end from pixels: ``(N, 1, H, W)`` on [0, 1] → ``(N, 1)`` fracture logits.

    The :class:`~bonefrac.model.networks.FractureNet` contract (so a bundle holds the full
    network and every stage scores it from pixels), plus one capability: :meth:`evidence_map`,
    the map the image logit is pooled from (dense head: a fracture logit per stride-16 cell;
    gap head: the class-activation map). Display and localisation scoring show *that* map,
    not a post-hoc Grad-CAM (``bonefrac.explain.heatmaps`` routes on this method).
    """

    def __init__(
        self, trunk: FrozenTrunk, head: nn.Module, arch: str = "", flip_tta: bool = False, stitch: bool = False
    ) -> None:
        super().__init__()
        self.trunk, self.head = trunk, head
        self.arch = arch
        self.num_types = 0
        self.spatial_dims = 2
        self.flip_tta = flip_tta
        self.stitch = stitch

    def _outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image logits, logit map, embedding) from one pass; with ``flip_tta`` the image and its
        left-right mirror go through as one batch and their logits and maps (mirrored back) are
        averaged, as the cross-validation benchmark's "+ TTA" scores the cached mirror view.
        The embedding is the unmirrored image's (drift and OOD statistics do not change with TTA)."""
        n = x.shape[0]
        feats = self.trunk(torch.cat([x, x.flip(-1)]) if self.flip_tta else x)
        if not self.flip_tta:
            return self.outputs_from_trunk(feats)
        return self.outputs_from_trunk(tuple(f[:n] for f in feats), tuple(f[n:] for f in feats))

    def outputs_from_trunk(
        self, feats: Sequence[torch.Tensor | None], mirror_feats: Sequence[torch.Tensor | None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What :meth:`_outputs` returns, from the frozen trunk's outputs instead of pixels.

        ``feats``: the trunk's ``(s16, s32[, s8])`` on the images; ``mirror_feats``: on their
        left-right mirrors, required with ``flip_tta``. Why: the train stage already ran the
        trunk over every training image and its mirror (the feature cache), and the evaluate
        stage needs the same network's outputs on a sample of them (the drift reference and
        the OOD detector); from the cached maps that costs the head alone.
        """
        if self.flip_tta and mirror_feats is None:
            raise ValueError("a flip-TTA network needs the trunk's outputs on the mirrored images too")
        views = [feats, mirror_feats] if self.flip_tta else [feats]
        n = feats[0].shape[0]
        s16, s32, s8 = (_cat_views([v[i] if len(v) > i else None for v in views]) for i in range(3))
        head = self.head
        if hasattr(head, "late") and hasattr(head, "forward_after_late"):
            late = head.late(s16, s32)
            z, m = head.forward_after_late(s16, late, s8)
            emb = late.mean(dim=(2, 3))
        else:
            z, m = head(s16, s32, *([s8] if s8 is not None else []))
            emb = s32.mean(dim=(2, 3))
        if self.flip_tta:
            z, m, emb = (z[:n] + z[n:]) / 2, (m[:n] + m[n:].flip(-1)) / 2, emb[:n]
        return z, m, emb

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._outputs(x)[0]

    def forward_with_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image logits and :meth:`features` from one pass (the drift/OOD embedding; an ONNX output)."""
        z, _, emb = self._outputs(x)
        return z, emb

    def evidence_map(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 1, h, w)`` logit map on the head's grid (stride 16 for the dense head, 8 with its stride-8 level).

        With ``stitch`` the map is the same head's shift-and-stitch map on a grid twice as fine
        (:func:`stitch_maps`; four shifted passes, each with the flip TTA where set): the image logit
        stays the unshifted pass's (:meth:`forward`), so scores, calibration and operating points
        do not change, only where the map can peak."""
        if not self.stitch:
            return self._outputs(x)[1]
        stride = 8 if self.trunk.tap8 else 16
        return stitch_maps([self._outputs(shift_image(x, dy, dx))[1] for dy, dx in stitch_shifts(stride)])

    # the historical name (benchmarks)
    evidence = evidence_map

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled stride-32 features ``(N, C)`` after the late blocks: embeddings for drift monitoring."""
        return self._outputs(x)[2]


@dataclass(frozen=True)
class DenseArch:
    """What a dense arch name means: where the frozen trunk stops and the head's settings.

    The name fixes the module layout (what a bundle's state_dict holds), so a bundle
    rebuilds from its arch name alone; which late blocks *train* is a training setting.
    """

    pool: PoolMode = "lse"
    lse_r: float = 5.0
    topk: int = 4
    width: int = 64
    dropout: float = 0.1
    trunk_last_block: int = 5  # 5: the head holds blocks.6; 4: it holds blocks.5 and blocks.6
    members: int = 1  # > 1: a HeadEnsemble of this many heads (trained with seeds seed, seed + 1, ...)
    flip_tta: bool = False  # score the image and its mirror, average logits and maps (2 trunk passes)
    s8_tap: bool = False  # one more FPN level on blocks.2: a logit per stride-8 cell (the trunk cache stores it)
    stitch: bool = False  # the evidence map by shift-and-stitch (4 shifted passes; a grid twice as fine)


#: The registry of dense archs (``model.arch``); :func:`bonefrac.model.networks.build_model` builds them.
DENSE_ARCHS: dict[str, DenseArch] = {
    # Lite0 stem..blocks.5 frozen (the feature cache), head = blocks.6 + FPN over blocks.4/blocks.6,
    # log-sum-exp pooling of a stride-16 logit map.
    "efficientnet_lite0_dense": DenseArch(),
    # Lite0 stem..blocks.4 frozen, head = blocks.5 + blocks.6 + FPN (blocks.5 can train too).
    "efficientnet_lite0_dense_b5": DenseArch(trunk_last_block=4),
    # Three heads of the first kind on one trunk, logits and maps averaged (HeadEnsemble).
    "efficientnet_lite0_dense_x3": DenseArch(members=3),
    # The first kind, scored with flip test-time augmentation (same module layout and training).
    "efficientnet_lite0_dense_tta": DenseArch(flip_tta=True),
    # The TTA kind with a stride-8 level (blocks.2 tapped from the frozen trunk): a logit per 8-px cell.
    "efficientnet_lite0_dense_s8_tta": DenseArch(flip_tta=True, s8_tap=True),
    # The TTA kind whose evidence map is shift-and-stitched to stride 8 (same weights, logits and training).
    "efficientnet_lite0_dense_tta_stitch": DenseArch(flip_tta=True, stitch=True),
}


def build_dense_net(arch: str, pretrained: str = "efficientnet_lite_offline") -> DenseFractureNet:
    """The full network of a dense arch; ``pretrained`` loads ImageNet Lite0 into trunk and late blocks."""
    spec = DENSE_ARCHS[arch]
    lite = _lite0(pretrained)
    trunk = FrozenTrunk.from_lite0(lite, spec.trunk_last_block, tap8=spec.s8_tap)

    def one_head(i: int) -> DenseFractureHead:  # each member starts from its own copy of the ImageNet blocks
        b5 = lite.backbone.blocks[5] if spec.trunk_last_block == 4 else None
        b6 = lite.backbone.blocks[6]
        if i > 0:
            b5, b6 = copy.deepcopy(b5), copy.deepcopy(b6)
        return DenseFractureHead(
            b6, pool=spec.pool, lse_r=spec.lse_r, topk=spec.topk, width=spec.width, dropout=spec.dropout,
            blocks5=b5, s8_channels=S8_CHANNELS if spec.s8_tap else 0,
        )  # fmt: skip

    head: nn.Module = one_head(0) if spec.members == 1 else HeadEnsemble([one_head(i) for i in range(spec.members)])
    return DenseFractureNet(trunk, head, arch=arch, flip_tta=spec.flip_tta, stitch=spec.stitch)


BoxProfile = Literal["area", "centre", "outline"]


def outline_mask(polygons: list[list[float]], image_size: int) -> np.ndarray:
    """``(image_size, image_size)`` float32 mask, 1 at the input's pixels whose centres lie inside any of
    ``polygons`` (``[x1, y1, x2, y2, ...]`` in the square input's pixels, pixel ``i`` spanning
    ``[i, i + 1)``; matplotlib's point-in-polygon), 0 elsewhere. A polygon thinner than a pixel may
    cover none."""
    from matplotlib.path import Path as Polygon

    mask = np.zeros((image_size, image_size), dtype=np.float32)
    for p in polygons:
        xy = np.asarray(p, dtype=np.float64).reshape(-1, 2)
        (x0, y0), (x1, y1) = np.floor(xy.min(0)).clip(0).astype(int), np.ceil(xy.max(0)).clip(0).astype(int)
        ys, xs = np.mgrid[y0 : min(y1, image_size), x0 : min(x1, image_size)]
        if xs.size:
            inside = Polygon(xy).contains_points(np.column_stack([xs.ravel() + 0.5, ys.ravel() + 0.5]))
            mask[ys.ravel()[inside], xs.ravel()[inside]] = 1.0
    return mask


def mask_coverage(mask: np.ndarray, grid: int, flip: bool = False) -> torch.Tensor:
    """``(grid, grid)`` share of each cell that a pixel ``mask`` covers (its mean per cell); ``flip``
    mirrors it first, so the flipped target is the unflipped one's mirror, cell for cell."""
    t = torch.from_numpy(mask)
    t = t.flip(-1) if flip else t
    return F.adaptive_avg_pool2d(t[None, None], grid)[0, 0]


def box_target_map(
    boxes: list[list[float]],
    image_size: int,
    grid: int,
    grow: float = 0.5,
    flip: bool = False,
    profile: BoxProfile = "area",
    outlines: list[list[list[float]]] | None = None,
) -> torch.Tensor:
    """Soft ``(grid, grid)`` target from boxes ``[x, y, w, h]`` in the (padded, square) input's pixels.

    ``area``: each cell's target is the share of its area the box union covers, after growing
    each box by ``grow`` cells on every side (a 12 px fracture must still light a 16 px cell
    fully), rescaled so the image's hottest cell is 1. ``centre``: that share times a Gaussian
    of the cell centre's distance to the box centre, ``exp(-2 (dx/half_w)² - 2 (dy/half_h)²)``
    (0.14 at the box's edge; half sides at least half a cell). Why: with flat box targets a
    FracAtlas model's map is a plateau over the grown box, and its peak lands just outside the
    radiologist's box on about one fracture in five (the box's hottest value 98 % of the peak,
    median over the misses); a target that peaks at the centre teaches the map to peak there.
    ``outline``: where a box carries the fracture's outline (``outlines``, one list of polygons per
    box, :func:`bonefrac.model.boxes.row_outlines`), the share of each cell the outlines' union
    covers instead of the box; boxes without one, or whose outline covers no pixel, keep ``area``.
    Why: a FracAtlas outline covers a median 61 % of its box, so a box target also teaches the
    box's corners — bone or soft tissue beside the fracture line — as evidence.
    ``flip`` mirrors the boxes horizontally. Empty ``boxes`` → all zeros.
    """
    t = torch.zeros(grid, grid)
    if not boxes:
        return t
    if profile not in ("area", "centre", "outline"):
        raise ValueError(f"unknown box target profile {profile!r}; choose area, centre or outline")
    if profile == "outline":
        outlines = list(outlines or [])
        if len(outlines) not in (0, len(boxes)):
            raise ValueError(f"{len(outlines)} outlines for {len(boxes)} boxes")
        # a box whose outline covers no pixel centre (thinner than a pixel) trains on its box instead;
        # each outline is rasterised once, and the traced ones' union is the target
        masks = [outline_mask(o, image_size) if o else None for o in outlines]
        traced = [m is not None and bool(m.any()) for m in masks]
        if any(traced):
            t = mask_coverage(np.maximum.reduce([m for m, has in zip(masks, traced, strict=True) if has]), grid, flip)
        boxes = [b for b, has in zip(boxes, traced or [False] * len(boxes), strict=True) if not has]
        profile = "area"
    cell = image_size / grid
    edges = torch.arange(grid + 1, dtype=torch.float32) * cell
    lo, hi = edges[:-1], edges[1:]
    centres = (lo + hi) / 2
    for x, y, w, h in (b[:4] for b in boxes):
        if flip:
            x = image_size - x - w
        x0, x1 = x - grow * cell, x + w + grow * cell
        y0, y1 = y - grow * cell, y + h + grow * cell
        ox = (torch.minimum(hi, torch.tensor(x1)) - torch.maximum(lo, torch.tensor(x0))).clamp(min=0) / cell
        oy = (torch.minimum(hi, torch.tensor(y1)) - torch.maximum(lo, torch.tensor(y0))).clamp(min=0) / cell
        if profile == "centre":
            hw, hh = max(w / 2, cell / 2), max(h / 2, cell / 2)
            ox = ox * torch.exp(-2 * ((centres - (x + w / 2)) / hw) ** 2)
            oy = oy * torch.exp(-2 * ((centres - (y + h / 2)) / hh) ** 2)
        t = torch.maximum(t, oy[:, None] * ox[None, :])
    m = t.max()
    return t / m if m > 0 else t


def dense_loss(
    logit_map: torch.Tensor,
    target: torch.Tensor,
    has_map: torch.Tensor,
    gamma: float = 0.0,
    peak_weight: float = 0.0,
) -> torch.Tensor:
    """Class-balanced per-image dense BCE (optionally focal), averaged over images with a map target.

    ``logit_map`` ``(N, 1, H, W)``; ``target`` ``(N, H, W)`` in [0, 1]; ``has_map`` ``(N,)`` bool
    (fractured images without boxes get no dense loss). Within an image, the positive mass
    (target-weighted) and the negative mass are each averaged, so a 2-cell fracture is not
    drowned by 574 background cells; an all-zero target (a normal image) counts its negatives only.

    ``peak_weight`` adds, on images with a positive target, :func:`peak_loss` — a cross-entropy
    between the map's softmax over cells and the normalised target. Per-cell BCE scores every
    cell on its own, so a fracture cell at p = 0.6 and a joint elsewhere at p = 0.7 cost little;
    the pointing game (and the reader) asks which cell is *highest*, a comparison only a loss over
    the whole map sees. It is invariant to a shift of all logits, so it does not pull against the
    image-level loss or the LSE pooling.
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
    loss = (pos * has_pos + neg).mean()
    if peak_weight > 0:
        loss = loss + peak_weight * (peak_loss(z, t) * has_pos).sum() / has_pos.shape[0]
    return loss


def peak_loss(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per image, the cross-entropy of the cells' softmax against the target's share of each cell.

    ``z``, ``target`` ``(N, H, W)``; returns ``(N,)``, 0 for an all-zero target. Divided by
    ``log(H·W)`` (the loss of a uniform map), so 1 means "no better than chance" at any map size
    and one weight serves 512 and 640 px alike.
    """
    logp = torch.log_softmax(z.flatten(1), dim=1)
    mass = target.flatten(1)
    q = mass / mass.sum(1, keepdim=True).clamp(min=1e-6)
    return -(q * logp).sum(1) / math.log(logp.shape[1])
