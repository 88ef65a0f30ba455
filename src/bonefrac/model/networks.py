"""The model registry: one name (``model.arch``) → one :class:`FractureNet`.

Every network has the same contract, whatever its backbone: input ``(N, 1, ...)``
grayscale on [0, 1]; output ``(N, 1 + num_types)`` logits, column 0 the fracture
logit, columns 1.. the fracture-type logits (multi-task head). Backbones built
for 3-channel ImageNet input get the channel repeat and ImageNet normalisation
*inside* the model, so pipeline, CLI and service feed the same 1-channel tensor.

Each FractureNet also knows its ``gradcam_layer`` (module name for Grad-CAM)
and its ``block_groups`` (backbone blocks from input to output), which the
fine-tuning strategies use for discriminative learning rates and gradual unfreezing.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from bonefrac.errors import BonefracError
from bonefrac.model.custom_cnn import CustomCNN
from bonefrac.model.imagenet import IMAGENET_MEAN, IMAGENET_STD, GrayToImageNet
from bonefrac.model.pretrained import (
    PretrainedWeightsError,
    efficientnet_lite0_state_dict,
    load_matching,
    read_checkpoint_state_dict,
    torchvision_imagenet_state_dict,
)
from bonefrac.model.projection3d import ProjectionNet3D

__all__ = [
    "ARCHS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "FractureNet",
    "GrayToImageNet",
    "ModelError",
    "build_model",
    "forward_with_embedding",
]

log = logging.getLogger(__name__)

PRETRAINED_KEYWORDS = ("none", "imagenet", "efficientnet_lite_offline")


class ModelError(BonefracError, ValueError):
    """An unknown architecture or an impossible combination (e.g. a 2D net on volumes)."""


class FractureNet(nn.Module):
    """``input_adapter`` → ``backbone`` (pooled features) → ``head`` (dropout + linear)."""

    def __init__(
        self,
        arch: str,
        backbone: nn.Module,
        num_features: int,
        num_types: int,
        dropout: float,
        spatial_dims: int,
        gradcam_layer: str,
        block_groups: list[list[str]],
        input_adapter: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.arch = arch
        self.spatial_dims = spatial_dims
        self.num_types = num_types
        self.input_adapter = input_adapter or nn.Identity()
        self.backbone = backbone
        self.head = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(num_features, 1 + num_types))
        self.gradcam_layer = gradcam_layer
        # Module names (relative to this FractureNet) of the backbone's blocks, input → output.
        self.block_groups = block_groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(self.input_adapter(x)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (N, F): for embeddings / drift monitoring."""
        return self.backbone(self.input_adapter(x))

    def forward_with_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the pooled features (the head's input) from one pass: see :func:`forward_with_embedding`."""
        f = self.features(x)
        return self.head(f), f.flatten(1)

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def blocks(self) -> list[list[nn.Module]]:
        """The backbone's blocks from input to output (each a list of modules)."""
        mods = dict(self.named_modules())
        return [[mods[n] for n in group] for group in self.block_groups]


def forward_with_embedding(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits (N, 1 + T), embedding (N, F))`` from one forward pass: the model's embedding.

    The embedding is the pooled feature vector the classification head reads (FractureNet: the
    head's input; the dense archs: the pooled stride-32 map of the late blocks). It is the one
    definition used by the drift reference, the per-image OOD check and the served model (eager
    and ONNX: a second output of the export), so all of them project the same vector on the
    reference's PCA axes. A network without ``forward_with_embedding`` falls back to the input
    of its last linear layer (a forward pre-hook), which is the same vector for a FractureNet.
    """
    own = getattr(model, "forward_with_embedding", None)
    if callable(own):
        return own(x)
    last = None
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            last = mod
    if last is None:
        raise ModelError(f"{type(model).__name__} has no embedding: no forward_with_embedding and no linear layer")
    captured: list[torch.Tensor] = []
    handle = last.register_forward_pre_hook(lambda _m, inputs: captured.append(inputs[0]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return logits, captured[-1].flatten(1)


@dataclass(frozen=True)
class _Built:
    backbone: nn.Module
    num_features: int
    gradcam_layer: str
    block_groups: list[list[str]]
    rgb: bool  # needs GrayToImageNet


def _prefixed(names: list[list[str]]) -> list[list[str]]:
    return [[f"backbone.{n}" for n in g] for g in names]


def _need_2d(arch: str, spatial_dims: int) -> None:
    if spatial_dims != 2:
        raise ModelError(
            f"{arch} is a 2D network; for volumes (spatial_dims=3) use monai_densenet3d, monai_resnet3d or custom_cnn"
        )


def _custom_cnn(spatial_dims: int) -> _Built:
    net = CustomCNN(spatial_dims=spatial_dims)
    groups = [["stem"]] + [[f"stages.{i}"] for i in range(len(net.stages))]
    last = f"backbone.stages.{len(net.stages) - 1}"
    return _Built(net, net.num_features, last, _prefixed(groups), rgb=False)


class _VGGFeatures(nn.Module):
    def __init__(self, features: nn.Sequential) -> None:
        super().__init__()
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)
        for m in self.modules():  # torchvision VGG's own initialisation of the conv layers
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x)).flatten(1)


def _vgg16(spatial_dims: int) -> _Built:
    from torchvision.models.vgg import cfgs, make_layers

    _need_2d("vgg16", spatial_dims)
    # Keep VGG-16's 13 conv layers (what transfers; named ``features.N`` as in torchvision, so
    # its ImageNet weights load) and replace the 120 M-parameter 4096-wide FC classifier by global
    # average pooling: the head sees 512 features. Building torchvision's whole VGG would spend
    # ~10 s initialising the classifier only to throw it away.
    net = _VGGFeatures(make_layers(cfgs["D"], batch_norm=False))
    # Blocks end at each max-pool: features[0:5], [5:10], [10:17], [17:24], [24:31].
    bounds = [0, 5, 10, 17, 24, 31]
    groups = [[f"features.{i}" for i in range(a, b)] for a, b in itertools.pairwise(bounds)]
    return _Built(net, 512, "backbone.features.29", _prefixed(groups), rgb=True)


def _resnet(name: str, spatial_dims: int) -> _Built:
    from torchvision import models as tvm

    _need_2d(name, spatial_dims)
    net = getattr(tvm, name)(weights=None)
    nfeat = net.fc.in_features
    net.fc = nn.Identity()
    groups = [["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]]
    return _Built(net, nfeat, "backbone.layer4", _prefixed(groups), rgb=True)


def _densenet121(spatial_dims: int) -> _Built:
    from torchvision.models import densenet121

    _need_2d("densenet121", spatial_dims)
    net = densenet121(weights=None)
    nfeat = net.classifier.in_features
    net.classifier = nn.Identity()
    groups = [
        ["features.conv0", "features.norm0"],
        ["features.denseblock1", "features.transition1"],
        ["features.denseblock2", "features.transition2"],
        ["features.denseblock3", "features.transition3"],
        ["features.denseblock4", "features.norm5"],
    ]
    return _Built(net, nfeat, "backbone.features.denseblock4", _prefixed(groups), rgb=True)


def _efficientnet_lite0(spatial_dims: int) -> _Built:
    import timm

    _need_2d("efficientnet_lite0", spatial_dims)
    # num_classes=0: timm returns the pooled 1280 features.
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    groups = [["conv_stem", "bn1"], *([f"blocks.{i}"] for i in range(len(net.blocks))), ["conv_head", "bn2"]]
    # Grad-CAM on blocks.5 (the last stage's 192-channel output, stride 32), not conv_head
    # (the 1280-channel 1×1 expansion on the same grid): measured on phantoms with
    # off-centre fractures (tests/model/test_gradcam_phantom.py), blocks.5 doubles the
    # energy inside the fracture box. The stride-16 blocks.4 localises about as well for
    # Grad-CAM but makes MONAI's Grad-CAM++ no better than a uniform map.
    return _Built(net, net.num_features, "backbone.blocks.5", _prefixed(groups), rgb=True)


def _monai_densenet3d(spatial_dims: int) -> _Built:
    from monai.networks.nets import DenseNet

    if spatial_dims != 3:
        raise ModelError("monai_densenet3d is a 3D network (spatial_dims=3); for radiographs use a 2D arch")
    # A compact DenseNet (3 dense blocks, growth 16): total stride 16, so 32×64×64 volumes
    # end at 2×4×4 and the net stays CPU-trainable; DenseNet-121's 4 blocks need ≥ 64³ input.
    net = DenseNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        init_features=32,
        growth_rate=16,
        block_config=(6, 12, 8),
    )
    nfeat = net.class_layers.out.in_features
    net.class_layers.out = nn.Identity()
    groups = [
        ["features.conv0", "features.norm0"],
        ["features.denseblock1", "features.transition1"],
        ["features.denseblock2", "features.transition2"],
        ["features.denseblock3", "features.norm5"],
    ]
    return _Built(net, nfeat, "backbone.features.denseblock3", _prefixed(groups), rgb=False)


def _monai_resnet3d(spatial_dims: int) -> _Built:
    from monai.networks.nets import resnet18

    if spatial_dims != 3:
        raise ModelError("monai_resnet3d is a 3D network (spatial_dims=3); for radiographs use a 2D arch")
    # ResNet-18 layout at half width (widen_factor=0.5): full width is 33 M parameters in 3D,
    # too many for a few hundred volumes and a CPU; half width is ~8 M.
    net = resnet18(
        spatial_dims=3,
        n_input_channels=1,
        conv1_t_size=7,
        conv1_t_stride=2,
        feed_forward=False,
        widen_factor=0.5,
    )
    groups = [["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]]
    nfeat = int(net.layer4[-1].conv2.out_channels)
    return _Built(net, nfeat, "backbone.layer4", _prefixed(groups), rgb=False)


def _mip_efficientnet3d(spatial_dims: int) -> _Built:
    import timm

    if spatial_dims != 3:
        raise ModelError("mip_efficientnet3d is a 3D network (spatial_dims=3); for radiographs use a 2D arch")
    eff = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    net = ProjectionNet3D(eff, eff.num_features, GrayToImageNet())
    groups = [["net.conv_stem", "net.bn1"], *([f"net.blocks.{i}"] for i in range(len(eff.blocks))),
              ["net.conv_head", "net.bn2"]]
    return _Built(net, net.num_features, "backbone.volume", _prefixed(groups), rgb=False)


ARCHS: dict[str, Callable[[int], _Built]] = {
    "custom_cnn": _custom_cnn,
    "vgg16": _vgg16,
    "resnet18": lambda d: _resnet("resnet18", d),
    "resnet50": lambda d: _resnet("resnet50", d),
    "densenet121": _densenet121,
    "efficientnet_lite0": _efficientnet_lite0,
    "monai_densenet3d": _monai_densenet3d,
    "monai_resnet3d": _monai_resnet3d,
    "mip_efficientnet3d": _mip_efficientnet3d,
}


def _load_pretrained(model: FractureNet, arch: str, pretrained: str) -> None:
    if pretrained == "none":
        return
    if pretrained == "imagenet" and arch not in ("efficientnet_lite0", "mip_efficientnet3d"):
        state = torchvision_imagenet_state_dict(arch)
        # Strict on the backbone: the classifier keys are dropped, everything else must fit.
        own = model.backbone.state_dict()
        state = {k: v for k, v in state.items() if k in own}
        missing = [k for k in own if k not in state]
        bad = [k for k in state if state[k].shape != own[k].shape]
        if missing or bad:
            raise PretrainedWeightsError(
                f"ImageNet weights for {arch} do not fit: missing {missing[:5]}, shape mismatch {bad[:5]}"
            )
        model.backbone.load_state_dict(state, strict=True)
        log.info("loaded torchvision ImageNet weights for %s", arch)
        return
    if pretrained in ("imagenet", "efficientnet_lite_offline"):
        if arch not in ("efficientnet_lite0", "mip_efficientnet3d"):
            raise PretrainedWeightsError(
                f"pretrained='efficientnet_lite_offline' is for efficientnet_lite0, not {arch!r}"
            )
        # mip_efficientnet3d: the 2D EfficientNet inside the projection net gets the weights.
        target = model.backbone if arch == "efficientnet_lite0" else model.backbone.net
        state = efficientnet_lite0_state_dict(target.state_dict())
        result = target.load_state_dict(state, strict=True)
        assert not result.missing_keys and not result.unexpected_keys
        log.info("loaded offline ImageNet EfficientNet-Lite0 weights (%d tensors)", len(state))
        return
    n = load_matching(model, read_checkpoint_state_dict(pretrained), pretrained)
    log.info("initialised %s from %s (%d tensors)", arch, pretrained, n)


def build_model(
    arch: str,
    num_types: int,
    pretrained: str = "none",
    dropout: float = 0.0,
    spatial_dims: int = 2,
) -> nn.Module:
    """Build ``arch`` with a 1 + ``num_types`` logit head; load ``pretrained`` weights.

    ``pretrained``: ``none``; ``imagenet`` (torchvision's weights mechanism; for
    efficientnet_lite0 the offline package weights); ``efficientnet_lite_offline``;
    or a path to a bundle / checkpoint / state_dict.

    A dense arch (:data:`bonefrac.model.dense.DENSE_ARCHS`) returns a
    :class:`~bonefrac.model.dense.DenseFractureNet`: the same input/output contract,
    plus its own evidence map.
    """
    from bonefrac.model.dense import DENSE_ARCHS, build_dense_net

    if arch not in ARCHS and arch not in DENSE_ARCHS:
        raise ModelError(f"unknown model.arch {arch!r}; choose one of {sorted([*ARCHS, *DENSE_ARCHS])}")
    if num_types < 0:
        raise ModelError(f"num_types must be >= 0, got {num_types}")
    if arch in DENSE_ARCHS:
        if spatial_dims != 2 or num_types:
            raise ModelError(
                f"{arch} is a 2D fracture/no-fracture network: it takes no volumes (spatial_dims=3) "
                "and has no fracture-type head (set model.multitask: false)"
            )
        if pretrained not in ("none", "imagenet", "efficientnet_lite_offline"):
            raise ModelError(f"{arch} starts from ImageNet Lite0 ('efficientnet_lite_offline') or 'none'")
        return build_dense_net(arch, "none" if pretrained == "none" else "efficientnet_lite_offline")
    built = ARCHS[arch](spatial_dims)
    model = FractureNet(
        arch=arch,
        backbone=built.backbone,
        num_features=built.num_features,
        num_types=num_types,
        dropout=dropout,
        spatial_dims=spatial_dims,
        gradcam_layer=built.gradcam_layer,
        block_groups=built.block_groups,
        input_adapter=GrayToImageNet() if built.rgb else None,
    )
    _load_pretrained(model, arch, pretrained)
    return model
