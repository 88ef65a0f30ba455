"""ONNX export: same logits as PyTorch (parity), dynamic batch, and backend selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.integration._server import make_tiny_bundle

from bonefrac.inference.backends import OnnxRunner, TorchRunner, select_backend
from bonefrac.inference.onnx_export import OnnxExportError, check_parity, export_bundle, input_shape
from bonefrac.inference.predictor import Predictor
from bonefrac.model.bundle import ModelBundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> ModelBundle:
    torch.set_num_threads(1)
    return ModelBundle.load(make_tiny_bundle(tmp_path_factory.mktemp("m") / "model.pt", image_size=48))


@pytest.fixture(scope="module")
def onnx_file(bundle, tmp_path_factory):
    path, diff = export_bundle(bundle, tmp_path_factory.mktemp("onnx") / "model.onnx")
    assert diff < 1e-4
    return path


def test_parity_on_a_batch_of_different_size(bundle, onnx_file):
    x = torch.rand(input_shape(bundle, 5), generator=torch.Generator().manual_seed(3))
    torch_logits = TorchRunner(bundle.build_model())(x.numpy())
    onnx_logits = OnnxRunner(onnx_file)(x.numpy())
    assert onnx_logits.shape == (5, 1 + bundle.num_types)
    np.testing.assert_allclose(onnx_logits, torch_logits, atol=1e-4, rtol=1e-3)
    # The second output, the embedding the service's OOD check uses, matches eager PyTorch's.
    tl, te = TorchRunner(bundle.build_model()).with_embedding(x.numpy())
    ol, oe = OnnxRunner(onnx_file).with_embedding(x.numpy())
    assert oe.shape == te.shape == (5, 512)
    np.testing.assert_allclose(ol, tl, atol=1e-4, rtol=1e-3)
    np.testing.assert_allclose(oe, te, atol=1e-4 * max(1.0, float(np.abs(te).max())), rtol=1e-3)
    # Calibrated outputs agree with the Predictor's (one calibration path).
    ref = Predictor(bundle).predict_tensor(x)
    np.testing.assert_allclose(bundle.calibrate(onnx_logits).prob, ref.prob, atol=1e-5)


def test_parity_check_catches_a_different_model(bundle, onnx_file):
    other = bundle.build_model()
    with torch.no_grad():
        other.head[-1].bias.add_(1.0)
    with pytest.raises(OnnxExportError, match="disagrees"):
        check_parity(other, onnx_file, torch.rand(input_shape(bundle, 2)))


@pytest.mark.parametrize("preference", ["torch", "onnx", "auto"])
def test_select_backend(bundle, tmp_path, preference):
    choice = select_backend(bundle, preference=preference, device="cpu", cache_dir=tmp_path, batch_size=2)
    if preference != "auto":
        assert choice.name == preference
    else:  # measured: the chosen one is the faster of the two
        t = choice.timings_ms_per_image
        assert choice.name == min(t, key=t.get)
    d = choice.describe()
    assert d["backend"] == choice.name and d["device"] == "cpu" and d["reason"]
    out = choice.runner(np.zeros(input_shape(bundle, 3), np.float32))
    assert out.shape == (3, 1 + bundle.num_types)


# ------------------------------------------------------------------ every servable architecture (issue 16)
#: Every architecture a bundle (hence the service) can be built with, at a small input size. The two
#: EfficientNet-Lite0 networks carry their real ImageNet weights (efficientnet_lite_offline): random
#: weights keep activations small and can hide a numerically different export.
SERVABLE = [
    ("custom_cnn", 2), ("custom_cnn", 3), ("vgg16", 2), ("resnet18", 2), ("resnet50", 2), ("densenet121", 2),
    ("efficientnet_lite0", 2), ("monai_densenet3d", 3), ("monai_resnet3d", 3), ("mip_efficientnet3d", 3),
    ("efficientnet_lite0_dense", 2), ("efficientnet_lite0_dense_b5", 2), ("efficientnet_lite0_dense_x3", 2),
    ("efficientnet_lite0_dense_tta", 2), ("efficientnet_lite0_dense_s8_tta", 2),
    ("efficientnet_lite0_dense_tta_stitch", 2),
]  # fmt: skip
REAL_WEIGHTS = {
    "efficientnet_lite0", "mip_efficientnet3d",
    "efficientnet_lite0_dense", "efficientnet_lite0_dense_b5", "efficientnet_lite0_dense_x3",
    "efficientnet_lite0_dense_tta", "efficientnet_lite0_dense_s8_tta", "efficientnet_lite0_dense_tta_stitch",
}  # fmt: skip


def test_every_servable_arch_is_in_the_parity_test():
    from bonefrac.model.dense import DENSE_ARCHS
    from bonefrac.model.networks import ARCHS

    assert {a for a, _ in SERVABLE} == set(ARCHS) | set(DENSE_ARCHS)


def _servable_bundle(arch: str, dims: int) -> ModelBundle:
    from bonefrac.model.networks import build_model
    from bonefrac.model.transforms import PreprocessSpec

    torch.manual_seed(0)
    pretrained = "efficientnet_lite_offline" if arch in REAL_WEIGHTS else "none"
    types = [] if "_dense" in arch else ["a", "b"]  # the dense archs have no type head
    model = build_model(arch, num_types=len(types), pretrained=pretrained, spatial_dims=dims).eval()
    volume = (8, 32, 32) if arch.startswith("mip") else (16, 16, 16)
    spec = PreprocessSpec(spatial_dims=dims, image_size=64, volume_size=volume)
    return ModelBundle(arch=arch, state_dict=model.state_dict(), preprocess_spec=spec, type_names=types)


@pytest.mark.parametrize(("arch", "dims"), [c for c in SERVABLE if c != ("custom_cnn", 2)])  # 2D CNN: see above
def test_onnx_parity_every_servable_arch(arch, dims, tmp_path):
    """The service's own export (parity-checked at start-up) and then the same images through both runners."""
    torch.set_num_threads(1)
    bundle = _servable_bundle(arch, dims)
    path, diff = export_bundle(bundle, tmp_path / f"{arch}.onnx", parity_batch=2)
    assert diff < 1e-4
    if dims == 2:  # radiograph-like images through the contract's preprocessing, not only noise
        from tests._factories import make_array

        x = np.stack([bundle.preprocess(make_array((80 + 16 * i, 64), bit_depth=12, seed=i)).numpy() for i in range(3)])
    else:
        x = np.random.default_rng(1).random(input_shape(bundle, 3), dtype=np.float32)
    torch_logits, torch_emb = TorchRunner(bundle.build_model()).with_embedding(x)
    onnx_logits, onnx_emb = OnnxRunner(path, threads=1).with_embedding(x)
    assert np.abs(torch_logits).max() > 1e-3  # a real signal, not all zeros
    np.testing.assert_allclose(onnx_emb, torch_emb, atol=1e-4 * max(1.0, float(np.abs(torch_emb).max())), rtol=1e-3)
    np.testing.assert_allclose(onnx_logits, torch_logits, atol=1e-4, rtol=1e-3)
    np.testing.assert_allclose(bundle.calibrate(onnx_logits).prob, bundle.calibrate(torch_logits).prob, atol=1e-5)


def test_an_arch_onnx_cannot_export_is_refused_clearly_and_served_by_pytorch(bundle, tmp_path, monkeypatch):
    import bonefrac.inference.onnx_export as onnx_export

    def unsupported(*args, **kwargs):
        raise OnnxExportError("ONNX export of FractureNet failed: operator 'x' is not supported")

    monkeypatch.setattr(onnx_export, "export_onnx", unsupported)
    refusal = r"custom_cnn \(2D\) cannot be served through ONNX.*BONEFRAC_BACKEND=torch"
    with pytest.raises(OnnxExportError, match=refusal):
        select_backend(bundle, preference="onnx", device="cpu", cache_dir=tmp_path)
    choice = select_backend(bundle, preference="auto", device="cpu", cache_dir=tmp_path)
    assert choice.name == "torch" and "cannot be served through ONNX" in choice.reason
    assert choice.runner(np.zeros(input_shape(bundle, 2), np.float32)).shape == (2, 1 + bundle.num_types)
