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
