"""Drift: image features, quiet on one distribution, fires on exposure/noise shifts, HTML + JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from bonefrac.config import DriftParams
from bonefrac.monitoring.drift import DriftError, run_drift, shared_feature_columns
from bonefrac.monitoring.features import (
    EmbeddingReducer,
    features_from_prediction_log,
    image_features,
    model_outputs,
)
from bonefrac.monitoring.prediction_log import image_statistics

PARAMS = DriftParams(stattest_threshold=0.05, drift_share=0.5, embedding_dims=2)


def _radiograph(
    rng: np.random.Generator, exposure: float = 1.0, noise: float = 4.0, size: int = 48
) -> np.ndarray:
    """An 8-bit 'radiograph': dark background, a bright bone band; exposure scales it, noise is added."""
    h = w = size
    img = np.full((h, w), 40.0) + rng.normal(0, 3, size=(h, w))
    c = w // 2 + int(rng.integers(-4, 5))
    img[:, c - 5 : c + 5] = 170.0 + rng.normal(0, 5)
    img = img * exposure + rng.normal(0, noise, size=(h, w))
    return np.clip(img, 0, 255).astype(np.uint8)


def _table(rng: np.random.Generator, n: int, **kw: float) -> pd.DataFrame:
    return pd.DataFrame([image_features(_radiograph(rng, **kw), 8) for _ in range(n)])


def test_image_features_match_the_prediction_log_scaling() -> None:
    arr = _radiograph(np.random.default_rng(0))
    f = image_features(arr, 8)
    from bonefrac.data.imageio import DecodedImage

    decoded = DecodedImage(
        array=arr.astype(np.float32),
        bit_depth=8,
        channels=1,
        format="png",
        modality="XR",
        spatial_dims=2,
        meta={"value_range": [0.0, 255.0]},
    )
    for k, v in image_statistics(decoded).items():
        assert f[k] == pytest.approx(v, abs=1e-6)
    assert f["aspect"] == 1.0 and f["bit_depth"] == 8 and f["intensity_p01"] <= f["intensity_p50"]
    # the same pixels stored as 16-bit are darker on the nominal scale: exposure stays visible
    assert image_features(arr.astype(np.uint16), 16)["intensity_mean"] < f["intensity_mean"]


def test_no_drift_between_two_draws_of_one_distribution() -> None:
    rng = np.random.default_rng(1)
    res = run_drift(_table(rng, 80), _table(rng, 60), PARAMS)
    assert not res.dataset_drift
    assert res.drift_share < PARAMS.drift_share


def test_drift_on_noise_change() -> None:
    rng = np.random.default_rng(2)
    res = run_drift(_table(rng, 80), _table(rng, 60, noise=18.0), PARAMS)
    assert res.dataset_drift, [(f.column, f.p_value) for f in res.features]
    assert "intensity_std" in res.drifted_columns
    # constant size / bit depth in both tables: reported, not counted in the share
    uninformative = {f.column for f in res.features if not f.informative}
    assert uninformative == {"width", "height", "aspect", "bit_depth"}


def test_drift_on_exposure_change_writes_html_and_json(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    res = run_drift(_table(rng, 80), _table(rng, 60, exposure=1.35), PARAMS, tmp_path)
    assert res.dataset_drift, [(f.column, f.p_value) for f in res.features]
    assert "intensity_mean" in res.drifted_columns
    html = (tmp_path / "drift_report.html").read_text()
    assert len(html) > 1000 and "<html" in html.lower()
    summary = json.loads((tmp_path / "drift_summary.json").read_text())
    assert summary["dataset_drift"] is True
    assert {f["column"] for f in summary["features"]} >= {"intensity_mean", "intensity_std", "bit_depth"}
    by_col = {f["column"]: f for f in summary["features"]}
    assert by_col["intensity_std"]["p_value"] < PARAMS.stattest_threshold
    assert by_col["bit_depth"]["method"] == "z"


def test_bit_depth_change_is_a_categorical_drift(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    ref = _table(rng, 60)
    cur = _table(rng, 40)
    cur["bit_depth"] = 16
    res = run_drift(ref, cur, PARAMS)
    assert "bit_depth" in res.drifted_columns
    assert next(f for f in res.features if f.column == "bit_depth").informative
    assert not res.dataset_drift  # one drifted feature of six is not a dataset-level drift
    assert res.html_path == ""  # nothing written without out_dir


def test_prediction_log_is_compared_on_shared_columns(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    ref = _table(rng, 50)
    ref["score"] = rng.uniform(size=len(ref))
    ref["emb_0"] = rng.normal(size=len(ref))
    log = _table(rng, 30).drop(columns=["intensity_p50", "aspect"])
    log["probability"] = rng.uniform(size=len(log))
    cur = features_from_prediction_log(log)
    cols = shared_feature_columns(ref, cur)
    assert "score" in cols and "aspect" in cols
    assert "intensity_p50" not in cols and "emb_0" not in cols
    assert not run_drift(ref, cur, PARAMS).dataset_drift


def test_bad_inputs_are_clear_errors() -> None:
    rng = np.random.default_rng(5)
    ref = _table(rng, 20)
    with pytest.raises(DriftError, match="no feature column"):
        run_drift(ref, pd.DataFrame({"x": [1, 2, 3]}), PARAMS)
    with pytest.raises(DriftError, match="at least"):
        run_drift(ref, ref.head(2), PARAMS)


def test_embedding_from_the_penultimate_layer_and_pca() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    x = np.random.default_rng(6).uniform(size=(10, 1, 16, 16)).astype(np.float32)
    from bonefrac.model.bundle import ModelBundle
    from bonefrac.model.calibrate import CalibrationMap
    from bonefrac.model.transforms import PreprocessSpec

    bundle = ModelBundle("seq", {}, PreprocessSpec(image_size=32), calibration=CalibrationMap.from_temperature(2.0))
    scores, emb = model_outputs(bundle, x, batch_size=4, model=model)
    with torch.no_grad():
        feats = model[:3](torch.from_numpy(x)).numpy()
        logits = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(emb, feats, rtol=1e-5)
    np.testing.assert_allclose(scores, 1 / (1 + np.exp(-logits[:, 0] / 2.0)), rtol=1e-5)
    red = EmbeddingReducer.fit(emb, dims=2)
    assert red.to_frame(emb).shape == (10, 2)
    assert list(red.to_frame(emb).columns) == ["emb_0", "emb_1"]


def test_reference_features_keep_one_decoded_image_at_a_time() -> None:
    """A drift reference or OOD fit over 1,000 radiographs must not hold them all decoded at once
    (~1.2 GB of float32 on FracAtlas): each full-resolution array is released after its statistics
    are taken. Fails if the decode-everything-first list comes back; undecodable files are named by
    position and error type only."""
    import gc
    import weakref

    from bonefrac.monitoring.features import image_features
    from bonefrac.monitoring.reference import map_decoded

    alive: list[weakref.ref] = []
    most_alive = 0

    class Decoded:
        def __init__(self, seed: int) -> None:
            self.array = np.random.default_rng(seed).integers(0, 255, (64, 48)).astype(np.float32)
            self.bit_depth = 8
            alive.append(weakref.ref(self.array))

    def read(path: str) -> Decoded:
        if path.endswith("patient_Jane_Doe.png"):
            raise OSError(f"cannot identify image file {path!r}")
        return Decoded(len(alive))

    def stats(arr: np.ndarray, bit_depth: int, value_range: object) -> dict[str, float]:
        nonlocal most_alive
        gc.collect()
        most_alive = max(most_alive, sum(r() is not None for r in alive))
        return image_features(arr, bit_depth, value_range)

    paths = [f"/x/{i}.png" for i in range(6)] + ["/x/patient_Jane_Doe.png"]
    rows, skipped = map_decoded(paths, stats, read)
    assert most_alive == 1
    assert [r is None for r in rows] == [False] * 6 + [True]
    assert rows[0]["height"] == 64 and rows[0]["width"] == 48
    assert skipped == ["image 7 of 7: OSError"]
