"""The Predictor runs the network; preprocessing and calibration are the bundle's own."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _evaluation_helpers import TinyNet, tiny_bundle

from bonefrac.inference.predictor import PredictionError, Predictor
from bonefrac.model.bundle import ModelBundle
from bonefrac.model.calibrate import CalibrationMap, sigmoid, type_probabilities
from bonefrac.model.transforms import FastPercentileWindow, PreprocessSpec


@pytest.fixture()
def predictor() -> Predictor:
    torch.manual_seed(0)
    net = TinyNet(num_types=3)
    cal = CalibrationMap(method="platt", slope=0.5, intercept=-0.7)
    bundle = tiny_bundle(net, ["a", "b", "c"], calibration=cal, operating_points={"lo": 0.2, "hi": 0.8})
    return Predictor(bundle, model=net)


def test_predict_tensor_applies_calibration_thresholds_and_softmax(predictor: Predictor) -> None:
    x = torch.rand(5, 1, 32, 32)
    out = predictor.predict_tensor(x)
    with torch.no_grad():
        raw = predictor.model(x).numpy()
    assert np.allclose(out.logit, raw[:, 0], atol=1e-6)
    assert np.allclose(out.prob, sigmoid(0.5 * raw[:, 0] - 0.7), atol=1e-6)
    assert np.allclose(out.raw_prob, sigmoid(raw[:, 0]), atol=1e-6)
    assert set(out.decisions) == {"lo", "hi"}
    assert (out.decisions["lo"] == (out.prob >= 0.2)).all() and (out.decisions["hi"] == (out.prob >= 0.8)).all()
    assert out.type_probs is not None and out.type_probs.shape == (5, 3)
    assert np.allclose(out.type_probs.sum(1), 1.0)
    assert np.allclose(out.type_probs, type_probabilities(raw[:, 1:]))


def test_predict_arrays_uses_the_shared_preprocessing(predictor: Predictor) -> None:
    rng = np.random.default_rng(0)
    arrays = [rng.random((50, 70)).astype(np.float32) * 4000, rng.random((40, 30)).astype(np.float32)]
    out = predictor.predict_arrays(arrays)
    # Written out by hand with the bundle's non-default window (2–98 %): a predictor that
    # ignored the bundle's spec and used the defaults (0.5–99.5 %) would differ.
    from monai.transforms import Resize, SpatialPad

    def by_hand(a: np.ndarray) -> torch.Tensor:  # preprocessing version 2: resize, window, pad
        r = Resize(spatial_size=32, size_mode="longest", mode="area")(a[None])
        w = FastPercentileWindow(lower=2.0, upper=98.0, b_min=0.0, b_max=1.0, clip=True, dtype=np.float32)(r)
        return torch.as_tensor(SpatialPad(spatial_size=(32, 32))(w))

    x = torch.stack([by_hand(a) for a in arrays])
    assert np.allclose(out.logit, predictor.predict_tensor(x).logit, atol=1e-5)
    default = torch.stack([PreprocessSpec(image_size=32).apply(a) for a in arrays])
    assert not np.allclose(predictor.predict_tensor(default).logit, out.logit, atol=1e-5)


def test_batching_does_not_change_results(predictor: Predictor) -> None:
    x = torch.rand(7, 1, 32, 32)
    full = predictor.predict_tensor(x).logit
    predictor.batch_size = 3
    assert np.allclose(predictor.predict_tensor(x).logit, full, atol=1e-6)


def test_embed_hooks_the_head_input_or_uses_features(predictor: Predictor) -> None:
    x = torch.rand(4, 1, 32, 32)
    emb = predictor.embed(x)
    with torch.no_grad():
        want = predictor.model.pool(predictor.model.body(x)).flatten(1).numpy()
    assert emb.shape == (4, 8) and np.allclose(emb, want, atol=1e-6)

    from bonefrac.model.networks import build_model

    net = build_model("custom_cnn", num_types=0)
    bundle = ModelBundle(arch="custom_cnn", state_dict=net.state_dict(), preprocess_spec=PreprocessSpec(image_size=32))
    p2 = Predictor(bundle)  # rebuilt from the bundle through the model registry
    assert np.allclose(p2.embed(x), net.eval().features(x).detach().numpy(), atol=1e-5)


def test_bad_input_is_a_clear_error(predictor: Predictor) -> None:
    with pytest.raises(PredictionError, match=r"\(N, 1, H, W\)"):
        predictor.predict_tensor(torch.rand(2, 3, 32, 32))
    with pytest.raises(PredictionError, match="NaN"):
        predictor.predict_tensor(torch.full((1, 1, 32, 32), float("nan")))
    with pytest.raises(PredictionError, match="2D image"):
        predictor.predict_arrays([np.zeros((4, 4, 4))])
    with pytest.raises(PredictionError, match="no images"):
        predictor.predict_arrays([])
