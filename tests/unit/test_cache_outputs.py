"""One forward pass per cached image for the whole evaluate stage (:class:`CacheOutputs`).

The stage's evaluation, drift reference and OOD detector share the network's outputs: the
numbers must be the network's own (the same as a direct forward pass), each row must be
computed once however many callers ask, rows must be read a small batch at a time (at
512 px a whole training sample as float32 is gigabytes), and outputs of one network must
never be offered as another's.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from tests.integration._server import make_tiny_bundle
from tests.unit.test_split_drift import PARAMS, _cache

from bonefrac.inference.cache_outputs import BATCH_SIZE, CacheOutputs
from bonefrac.inference.predictor import PredictionError, Predictor
from bonefrac.model.bundle import ModelBundle
from bonefrac.model.networks import forward_with_embedding
from bonefrac.monitoring.features import EmbeddingReducer
from bonefrac.monitoring.ood import build_ood_detector
from bonefrac.monitoring.reference import load_reference
from bonefrac.monitoring.split_drift import REFERENCE_SUBDIR, split_drift


class _CountingRows:
    """A stand-in for the cache's memory map that records how many rows each read takes."""

    def __init__(self, images: np.ndarray) -> None:
        self.images, self.reads = images, []

    def __getitem__(self, rows):
        self.reads.append(len(rows))
        return self.images[rows]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> ModelBundle:
    return ModelBundle.load(make_tiny_bundle(tmp_path_factory.mktemp("m") / "model.pt", image_size=48))


def test_outputs_are_the_networks_own_each_row_computed_once_in_small_batches(bundle):
    images = np.random.default_rng(0).random((30, 1, 48, 48), dtype=np.float32).astype(np.float16)
    rows = _CountingRows(images)
    outputs = CacheOutputs(Predictor(bundle), rows)
    first = outputs.logits([7, 3, 7, 20])  # repeats and any order
    assert outputs.n_computed == 3 and first.shape == (4, 1 + bundle.num_types)
    np.testing.assert_array_equal(first[0], first[2])

    emb = outputs.embeddings(range(30))
    assert outputs.n_computed == 30  # 27 new rows; 7, 3 and 20 were not recomputed
    assert max(rows.reads) <= BATCH_SIZE and sum(rows.reads) == 30

    model = bundle.build_model()
    with torch.no_grad():
        ref_logits = forward_with_embedding(model, torch.from_numpy(images[[7, 3, 7, 20]].astype(np.float32)))[0]
        all_emb = forward_with_embedding(model, torch.from_numpy(images.astype(np.float32)))[1]
    np.testing.assert_allclose(first, ref_logits.numpy().reshape(4, -1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(emb, all_emb.flatten(1).numpy(), rtol=1e-4, atol=1e-5)
    assert outputs.logits([]).shape == (0, 1 + bundle.num_types)


def test_outputs_of_one_network_are_refused_for_another(bundle):
    outputs = CacheOutputs(Predictor(bundle), np.zeros((2, 1, 48, 48), dtype=np.float16))
    recalibrated = copy.copy(bundle)
    recalibrated.operating_points = {"high_sensitivity": 0.2}  # the evaluation's calibrated copy: same network
    outputs.check_network(recalibrated)
    other = copy.copy(bundle)
    other.state_dict = {k: v + 1.0 if v.is_floating_point() else v for k, v in bundle.state_dict.items()}
    with pytest.raises(PredictionError, match="other weights"):
        outputs.check_network(other)


def test_drift_reference_and_ood_detector_share_one_pass_over_the_training_sample(tmp_path, bundle):
    """The evaluate stage's order: drift (train sample + test), then OOD (same train sample + val)."""
    import bonefrac.preprocess.cache as cache_mod

    cache = _cache(tmp_path, {"train": 40, "test": 24, "val": 16}, bundle)
    images = cache_mod.load_cache(cache)[0]
    outputs = CacheOutputs(Predictor(bundle), images)
    metrics, _ = split_drift(cache, bundle, PARAMS, tmp_path / "drift", outputs=outputs, seed=3)
    assert outputs.n_computed == 64  # 40 train + 24 test, the reference's PCA fit and projection share them
    fresh, _ = split_drift(cache, bundle, PARAMS, tmp_path / "drift2", seed=3)  # without sharing: same verdict
    assert fresh == metrics

    reducer = EmbeddingReducer.fit(outputs.embeddings(range(40)), 3)
    det = build_ood_detector(cache, tmp_path / "ood.json", bundle=bundle, reducer=reducer, outputs=outputs)
    assert outputs.n_computed == 80  # only the 16 validation rows were new
    alone = build_ood_detector(cache, tmp_path / "ood2.json", bundle=bundle, reducer=reducer)
    assert det.groups["embedding"].threshold == pytest.approx(alone.groups["embedding"].threshold, rel=1e-6)


def test_a_sampled_reference_and_the_ood_detector_draw_the_same_training_rows(tmp_path, bundle):
    from bonefrac.monitoring.reference import build_reference
    from bonefrac.preprocess.cache import load_cache

    cache = _cache(tmp_path, {"train": 40, "val": 16}, bundle)
    outputs = CacheOutputs(Predictor(bundle), load_cache(cache)[0])
    kw = {"bundle": bundle, "max_rows": 25, "seed": 4, "outputs": outputs}
    ref = build_reference(cache, tmp_path / "ref", embedding_dims=3, **kw)
    assert outputs.n_computed == 25 and len(ref.table) == 25
    build_ood_detector(cache, tmp_path / "ood.json", reducer=ref.reducer, **kw)
    assert outputs.n_computed == 25 + 16  # the OOD fit reused the reference's 25 training rows


def test_the_evaluate_flow_hands_its_outputs_to_the_drift_reference_and_the_ood_detector(tmp_path, bundle, monkeypatch):
    """The stage's own helpers (flows/evaluate.py): after the evaluation's val + test passes, the drift
    report runs the network on the 40 training rows only and the OOD fit on none. Every forward pass of
    any :class:`CacheOutputs` is counted, so a helper that made its own would show."""
    import yaml
    from flows.evaluate import _attach_serving_facts, _drift_report

    import bonefrac.inference.cache_outputs as cache_outputs
    from bonefrac.config import load_params
    from bonefrac.preprocess.cache import load_cache

    passed: list[int] = []

    def counting(model, x):
        passed.append(len(x))
        return forward_with_embedding(model, x)

    monkeypatch.setattr(cache_outputs, "forward_with_embedding", counting)
    cache = _cache(tmp_path, {"train": 40, "test": 24, "val": 16}, bundle)
    proj = tmp_path / "proj"
    proj.mkdir()
    paths = {"processed": str(cache), "metrics": str(proj / "metrics"), "reports": str(proj / "reports")}
    (proj / "params.yaml").write_text(yaml.safe_dump({"paths": paths, "drift": PARAMS.model_dump()}))
    monkeypatch.chdir(proj)
    p = load_params("params.yaml")
    model_path = proj / "model.pt"
    bundle.save(model_path)
    outputs = CacheOutputs(Predictor(bundle), load_cache(cache)[0])
    outputs.logits(range(40, 80))  # what run_evaluation computes: test and val
    assert sum(passed) == 40
    line = _drift_report(p, model_path, cache, proj / "drift", outputs)
    assert sum(passed) == 80 and "drift test vs train" in line  # + the 40 training rows, once
    reducer = load_reference(proj / "drift" / REFERENCE_SUBDIR).reducer
    _attach_serving_facts(model_path, cache, "phantom", reducer, outputs)
    assert sum(passed) == 80  # the OOD detector reused them all
    assert "embedding" in ModelBundle.load(model_path).metadata["ood"]["groups"]
