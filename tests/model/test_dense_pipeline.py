"""The dense arch as a pipeline model: trained by the train stage, a full-network bundle, its own map shown.

Tiny random radiographs at 64 px through the real (ImageNet) Lite0 trunk: the train stage's
feature cache, the head trained on it, the bundle scored from pixels, and the explain paths.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from bonefrac.config import DenseTrainParams, ModelParams, TrainParams
from bonefrac.evaluation.evaluate import explain
from bonefrac.explain.display import compute_cam
from bonefrac.explain.gallery import select_cases
from bonefrac.explain.heatmaps import map_methods
from bonefrac.inference.predictor import Predictor
from bonefrac.model.boxes import BoxError, parse_outlines, row_boxes, row_outlines
from bonefrac.model.bundle import ModelBundle
from bonefrac.model.calibrate import sigmoid
from bonefrac.model.dense import DenseFractureNet, box_target_map
from bonefrac.model.networks import build_model
from bonefrac.model.transforms import PreprocessSpec
from bonefrac.preprocess.cache import build_cache, load_cache
from bonefrac.training.dense import dense_targets
from bonefrac.training.loop import SUMMARY
from bonefrac.training.stage import run_training

SIZE = 64  # stride-16 grid 4×4, stride-32 grid 2×2


def _processed(tmp_path, n: int = 24):
    """A preprocessed cache of n stored 80×60 (h×w) images; fractured ones carry a bright box (in the manifest too)."""
    rng = np.random.default_rng(0)
    arrays, rows = {}, []
    for i in range(n):
        a = rng.normal(100, 20, size=(80, 60)).clip(0, 255).astype(np.float32)
        label = int(i % 2 == 0)
        boxes = []
        if label and i % 4 == 0:  # half the fractured images have a box (the other half: image loss only)
            x, y = int(rng.integers(0, 40)), int(rng.integers(0, 60))
            a[y : y + 16, x : x + 16] += 120
            boxes = [[float(x), float(y), 16.0, 16.0]]
        path = f"img{i:02d}.png"
        arrays[path] = a
        split = "train" if i < 16 else ("val" if i < 20 else "test")
        rows.append(
            {"image_id": f"i{i}", "path": path, "label": label, "split": split, "boxes": json.dumps(boxes),
             "width": 60, "height": 80, "body_part": "hand", "view": ""}
        )  # fmt: skip
    build_cache(pd.DataFrame(rows), tmp_path / "processed", PreprocessSpec(image_size=SIZE), read_fn=arrays.__getitem__)
    return tmp_path / "processed"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dense")
    cache = _processed(tmp)
    mp = ModelParams(arch="efficientnet_lite0_dense", pretrained="efficientnet_lite_offline", multitask=False)
    tp = TrainParams(epochs=2, batch_size=8, lr=2e-3, threads=1, dense=DenseTrainParams(feature_dtype="float32"))
    result = run_training(cache, tmp / "train", mp, tp, spatial_dims=2, type_names=[], seed=0,
                          features_dir=tmp / "features")  # fmt: skip
    return tmp, cache, result


def test_dense_bundle_scores_from_pixels_like_the_head_on_its_cache(trained):
    tmp, cache, result = trained
    bundle = ModelBundle.load(result.best_model_path)
    assert bundle.arch == "efficientnet_lite0_dense" and bundle.preprocess_spec.image_size == SIZE
    net = bundle.build_model()
    assert isinstance(net, DenseFractureNet)
    # The bundle holds the full network: trunk (frozen, ImageNet) and trained head.
    assert any(k.startswith("trunk.blocks.") for k in bundle.state_dict)
    assert any(k.startswith("head.out.") for k in bundle.state_dict)
    (feat_dir,) = [p for p in (tmp / "features").iterdir() if p.is_dir()]
    rows = np.load(feat_dir / "rows.npy")
    s16, s32 = np.load(feat_dir / "s16.npy")[0], np.load(feat_dir / "s32.npy")[0]
    with torch.no_grad():
        z_cache = net.head(torch.from_numpy(s16), torch.from_numpy(s32))[0][:, 0].numpy()
    images, _ = load_cache(cache)
    z_pixels = Predictor(bundle).logits(torch.from_numpy(np.asarray(images[rows], dtype=np.float32)))[:, 0]
    assert np.abs(z_pixels - z_cache).max() <= 1e-4
    # The head trained: its weights differ from a fresh build's (the trunk's do not).
    fresh = build_model("efficientnet_lite0_dense", 0, "efficientnet_lite_offline").state_dict()
    assert not torch.equal(fresh["head.out.weight"], bundle.state_dict["head.out.weight"])
    assert torch.equal(fresh["trunk.blocks.4.0.conv_pw.weight"], bundle.state_dict["trunk.blocks.4.0.conv_pw.weight"])
    assert torch.equal(fresh[B6_WEIGHT], bundle.state_dict[B6_WEIGHT])  # blocks.6 frozen by default
    summary = json.loads((result.out_dir / SUMMARY).read_text())
    assert summary["train_with_boxes"] == 4 and summary["feature_cache_passes"] == 20 + 16  # train mirrored


B6_WEIGHT = "head.blocks6.0.conv_pw.weight"


def test_train_late_blocks_trains_blocks6_on_the_same_trunk_cache(trained):
    """The FracAtlas preset's `train.dense.train_late_blocks: true`: blocks.6 learns with the head,
    on the trunk features already cached for the frozen run (same cache key: no second trunk pass)."""
    tmp, cache, _ = trained
    mp = ModelParams(arch="efficientnet_lite0_dense", pretrained="efficientnet_lite_offline", multitask=False)
    tp = TrainParams(epochs=1, batch_size=8, lr=2e-3, threads=1,
                     dense=DenseTrainParams(feature_dtype="float32", train_late_blocks=True))
    result = run_training(cache, tmp / "train_late", mp, tp, spatial_dims=2, type_names=[], seed=0,
                          features_dir=tmp / "features")  # fmt: skip
    assert len([p for p in (tmp / "features").iterdir() if p.is_dir()]) == 1
    bundle = ModelBundle.load(result.best_model_path)
    fresh = build_model("efficientnet_lite0_dense", 0, "efficientnet_lite_offline").state_dict()
    assert not torch.equal(fresh[B6_WEIGHT], bundle.state_dict[B6_WEIGHT])
    assert torch.equal(fresh["trunk.blocks.4.0.conv_pw.weight"], bundle.state_dict["trunk.blocks.4.0.conv_pw.weight"])


def test_box_targets_land_where_the_manifest_boxes_are():
    # Stored 80×60 (h×w) → 64 px square: scale 0.8, 48 px wide, 8 px of padding left and right.
    row = {"boxes": "[[40.0, 60.0, 10.0, 10.0]]", "height": 80, "width": 60}
    (box,) = row_boxes(row, SIZE)
    assert box == pytest.approx([40.0, 48.0, 8.0, 8.0])
    t = box_target_map([box], SIZE, SIZE // 16, grow=0.0)
    assert float(t[3, 2]) == 1.0 and float(t.sum()) == 1.0  # the box is inside cell (row 3, col 2)
    assert row_boxes({"boxes": "[]", "height": 80, "width": 60}, SIZE) == []


def test_outlines_are_read_from_the_boxes_and_mapped_like_them():
    """A box's fifth element is its outline: mapped onto the input square vertex by vertex with the
    box's own scale and padding; a 3D box's fifth number is not an outline."""
    # Stored 80×60 (h×w) → 64 px: scale 0.8, 8 px of padding left and right (as the box test above).
    row = {"boxes": "[[40.0, 60.0, 10.0, 10.0, [[40.0, 60.0, 50.0, 60.0, 40.0, 70.0]]], [0, 0, 5, 5]]",
           "height": 80, "width": 60}  # fmt: skip
    assert row_outlines(row, SIZE) == [[pytest.approx([40.0, 48.0, 48.0, 48.0, 40.0, 56.0])], []]
    assert parse_outlines("[[1, 2, 3, 4, 5, 6]]") == [[]]  # [x, y, z, w, h, d]
    assert parse_outlines("[[1, 2, 3, 4, [[0, 0, 1, 1]]]]") == [[]]  # two points are not a polygon
    assert row_outlines({"boxes": "[]", "height": 80, "width": 60}, SIZE) == []
    # Hostile cells: the row keeps its boxes and trains on them; nothing raises past row_outlines.
    for cell in ('[[1, 2, 3, 4, [5]]]', '[[1, 2, 3, 4, [[1, 2, 3]]]]', '[[1, 2, 3, 4, "x"]]'):
        assert row_outlines({"boxes": cell, "height": 80, "width": 60}, SIZE) == [[]]
    for cell in ('[[1, 2, 3, 4, [["a", 0, 1, 1, 2, 2]]]]', '[[1, 2, 3, 4, [[NaN, 0, 1, 1, 2, 2]]]]', "[[1, 2"):
        with pytest.raises(BoxError):
            parse_outlines(cell)
        assert row_outlines({"boxes": cell, "height": 80, "width": 60}, SIZE) == []


def test_the_train_stage_builds_outline_targets_only_when_asked():
    """``train.dense.box_profile: outline`` reads the outlines (a dropped setting would train the box)."""
    rows = pd.DataFrame([
        {"boxes": "[[0.0, 0.0, 48.0, 48.0, [[0.0, 0.0, 48.0, 0.0, 0.0, 48.0]]]]", "height": 64, "width": 64},
        {"boxes": "[]", "height": 64, "width": 64},
    ])  # fmt: skip
    area, has = dense_targets(rows, SIZE, 4, DenseTrainParams(box_grow_cells=0.0))
    traced, _ = dense_targets(rows, SIZE, 4, DenseTrainParams(box_grow_cells=0.0, box_profile="outline"))
    assert has.tolist() == [True, False] and float(area[1].sum()) == 0.0 == float(traced[1].sum())
    assert float(area[0, 2, 2]) == 1.0 and float(traced[0, 2, 2]) == 0.0  # the corner the triangle leaves out
    assert float(traced[0, 0, 0]) == 1.0


def test_the_map_shown_is_the_models_own(trained):
    _, cache, result = trained
    net = ModelBundle.load(result.best_model_path).build_model()
    images, index = load_cache(cache)
    x = torch.from_numpy(np.asarray(images[:4], dtype=np.float32))
    with torch.no_grad():
        own = sigmoid(net.evidence_map(x).numpy())
    expected = torch.nn.functional.interpolate(torch.from_numpy(own).float(), size=(SIZE, SIZE), mode="bilinear")
    assert map_methods(net) == ["evidence_map"]
    shown = compute_cam(net, x)  # what /explain, the viewer and `predict --gradcam` draw
    assert shown.shape == (4, SIZE, SIZE)
    np.testing.assert_allclose(shown, expected[:, 0].numpy(), atol=1e-6)
    # The evaluation report scores the same map against the boxes (no Grad-CAM for this network).
    test = index.assign(prob=np.linspace(0.1, 0.9, len(index)))
    decisions = test["prob"].to_numpy() > 0.5
    mapped: list[int] = []  # how many images each evidence-map call was given
    own_map = net.evidence_map
    net.evidence_map = lambda x: (mapped.append(x.shape[0]), own_map(x))[1]
    gallery, info = explain(net, images, test, decisions, 2, None, SIZE, 2, "high_sensitivity")
    assert info["methods"][0][0] == "evidence_map" and "gradcam" not in info["localisation"]
    assert info["localisation"]["n"] == 6  # fractured images with boxes (in every split here)
    # Each image's map is computed once: the gallery reuses the boxed fractures' maps.
    boxed = {i for i in range(len(test)) if test["label"].iat[i] == 1 and row_boxes(test.iloc[i], SIZE)}
    picks = select_cases(test["label"].to_numpy(), test["prob"].to_numpy(), decisions, 2)
    shown = {int(i) for idx in picks.values() for i in idx}
    assert len(gallery) == len(shown) and shown & boxed  # the gallery repeats some boxed images
    assert sum(mapped) == len(boxed | shown)
    # The gallery draws a boxed fracture's outline where its row carries one (gold), and no other.
    traced = next(i for i in sorted(shown & boxed))
    x, y, w, h = json.loads(test["boxes"].iat[traced])[0][:4]
    with_outline = test.copy()
    with_outline.loc[with_outline.index[traced], "boxes"] = json.dumps(
        [[x, y, w, h, [[x, y, x + w, y, x, y + h]]]])
    gallery2, _ = explain(net, images, with_outline, decisions, 2, None, SIZE, 2, "high_sensitivity")
    import io

    from PIL import Image

    def has_gold(item) -> bool:
        return bool(np.any(np.all(np.asarray(Image.open(io.BytesIO(item.png)).convert("RGB")) == [255, 215, 0], -1)))

    golden = {item.image_id for item in gallery2 if has_gold(item)}
    assert golden == {str(test["image_id"].iat[traced])}
    assert not any(has_gold(item) for item in gallery)
    # Other networks keep Grad-CAM.
    assert map_methods(build_model("efficientnet_lite0", 0)) == ["gradcam", "gradcam++"]


def test_head_ensemble_trains_each_member_and_averages_their_logits_and_maps(trained):
    """`efficientnet_lite0_dense_x3`: three heads on one trunk cache, seeds 0, 1, 2; the bundle's logit
    and map are the members' means (a dropped member, a shared seed or a max instead of a mean fails)."""
    tmp, cache, _ = trained
    mp = ModelParams(arch="efficientnet_lite0_dense_x3", pretrained="efficientnet_lite_offline", multitask=False)
    tp = TrainParams(epochs=1, batch_size=8, lr=2e-3, threads=1, dense=DenseTrainParams(feature_dtype="float32"))
    result = run_training(cache, tmp / "train_x3", mp, tp, spatial_dims=2, type_names=[], seed=0,
                          features_dir=tmp / "features")  # fmt: skip
    assert len([p for p in (tmp / "features").iterdir() if p.is_dir()]) == 1  # the same trunk cache
    bundle = ModelBundle.load(result.best_model_path)
    assert len(bundle.metadata["member_val_auroc"]) == 3
    fresh = build_model("efficientnet_lite0_dense_x3", 0, "efficientnet_lite_offline").state_dict()
    outs = [bundle.state_dict[f"head.members.{i}.out.weight"] for i in range(3)]
    assert all(not torch.equal(w, fresh[f"head.members.{i}.out.weight"]) for i, w in enumerate(outs))  # all trained
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])  # with different seeds
    net = bundle.build_model().eval()
    images, _ = load_cache(cache)
    x = torch.from_numpy(np.asarray(images[:6], dtype=np.float32))
    with torch.no_grad():
        s16, s32 = net.trunk(x)
        each = [m(s16, s32) for m in net.head.members]
        z, own_map = net(x), net.evidence_map(x)
    assert torch.allclose(z, torch.stack([e[0] for e in each]).mean(0), atol=1e-6)
    assert torch.allclose(own_map, torch.stack([e[1] for e in each]).mean(0), atol=1e-6)
    assert float(torch.stack([e[0] for e in each]).std(0).max()) > 1e-4  # the members disagree somewhere


def test_stride8_arch_trains_on_a_cached_blocks2_tap_and_maps_per_8px_cell(trained):
    """`efficientnet_lite0_dense_s8_tta`: the trunk cache stores blocks.2 (stride 8) too, in its own
    folder (same weights, one more map); the logit map is on the stride-8 grid (the dense loss
    would refuse stride-16 targets); the bundle from pixels matches the head on the cached maps and
    averages the image with its mirror. Fails if the tap is dropped, the cache key ignores the extra
    output (the two-map folder would be reused), the s8 level does not train or is skipped at inference."""
    tmp, cache, _ = trained
    arch = "efficientnet_lite0_dense_s8_tta"
    mp = ModelParams(arch=arch, pretrained="efficientnet_lite_offline", multitask=False)
    tp = TrainParams(epochs=2, batch_size=8, lr=2e-3, threads=1, dense=DenseTrainParams(feature_dtype="float32"))
    result = run_training(cache, tmp / "train_s8", mp, tp, spatial_dims=2, type_names=[], seed=0,
                          features_dir=tmp / "features")  # fmt: skip
    folders = [p for p in (tmp / "features").iterdir() if p.is_dir()]
    with_s8 = [p for p in folders if (p / "s8.npy").exists()]
    assert len(folders) >= 2 and len(with_s8) == 1  # a folder of its own beside the two-map cache
    rows = np.load(with_s8[0] / "rows.npy")
    s16, s32, s8 = (np.load(with_s8[0] / f"{k}.npy")[0] for k in ("s16", "s32", "s8"))
    assert s8.shape[1:] == (40, SIZE // 8, SIZE // 8)
    bundle = ModelBundle.load(result.best_model_path)
    fresh = build_model(arch, 0, "efficientnet_lite_offline").state_dict()
    assert not torch.equal(fresh["head.lat8.weight"], bundle.state_dict["head.lat8.weight"])  # the s8 level trained
    tta, plain = bundle.build_model().eval(), bundle.build_model().eval()
    plain.flip_tta = False
    images, _ = load_cache(cache)
    x = torch.from_numpy(np.asarray(images[rows], dtype=np.float32))
    with torch.no_grad():
        z_cache, m_cache = tta.head(*(torch.from_numpy(a) for a in (s16, s32, s8)))
        z, m = plain(x), plain.evidence_map(x)
        z_mirror, m_mirror = plain(x.flip(-1)), plain.evidence_map(x.flip(-1))
        z_tta, m_tta = tta(x), tta.evidence_map(x)
    assert m.shape == (len(rows), 1, SIZE // 8, SIZE // 8)
    assert torch.allclose(z, z_cache, atol=1e-4) and torch.allclose(m, m_cache, atol=1e-4)
    assert torch.allclose(z_tta, (z + z_mirror) / 2, atol=1e-5)
    assert torch.allclose(m_tta, (m + m_mirror.flip(-1)) / 2, atol=1e-5)
    assert compute_cam(tta, x[:2]).shape == (2, SIZE, SIZE)


def test_dense_target_and_loss_settings_reach_the_head_training(trained, monkeypatch):
    """`train.dense.box_profile`, `box_grow_cells`, `box_weight`, `peak_weight` and `keep_epoch` are
    what the train stage builds its dense targets and trains its head with (a dropped setting would
    train the defaults — flat targets grown half a cell, the box loss weighted 1, no peak loss, the
    best-AUROC epoch kept — whatever the params say)."""
    import bonefrac.model.dense as dense
    import bonefrac.training.dense as training_dense

    tmp, cache, _ = trained
    targets: list[tuple[str, float]] = []
    weights: list[tuple[float, float, str]] = []
    real_targets, real_train = dense.box_target_map, training_dense.train_head

    def spy_targets(*args, **kwargs):
        targets.append((kwargs.get("profile", "area"), kwargs.get("grow", 0.5)))
        return real_targets(*args, **kwargs)

    def spy_train(head, data, idx_tr, idx_va, cfg, **kwargs):
        weights.append((cfg.box_weight, cfg.peak_weight, cfg.keep))
        return real_train(head, data, idx_tr, idx_va, cfg, **kwargs)

    monkeypatch.setattr(dense, "box_target_map", spy_targets)
    monkeypatch.setattr(training_dense, "train_head", spy_train)
    mp = ModelParams(arch="efficientnet_lite0_dense", pretrained="efficientnet_lite_offline", multitask=False)
    settings = [("centre", 0.0, 3.0, 0.5, "last"), ("area", 0.5, 1.0, 0.0, "best_val_auroc")]
    monitors = []
    for profile, grow, weight, peak, keep in settings:
        tp = TrainParams(epochs=1, batch_size=8, lr=2e-3, threads=1, dense=DenseTrainParams(
            feature_dtype="float32", box_profile=profile, box_grow_cells=grow, box_weight=weight, peak_weight=peak,
            keep_epoch=keep))
        res = run_training(cache, tmp / f"train_{profile}", mp, tp, spatial_dims=2, type_names=[], seed=0,
                           features_dir=tmp / "features")  # fmt: skip
        monitors.append((res.monitor, ModelBundle.load(res.best_model_path).metadata["monitor"]))
    # what chose the kept epoch, alike in the result (the train flow's log line) and the bundle
    assert monitors == [("last epoch", "last epoch"), ("val/auroc", "val/auroc")]
    half = len(targets) // 2
    assert targets and set(targets[:half]) == {("centre", 0.0)} and set(targets[half:]) == {("area", 0.5)}
    assert weights == [(3.0, 0.5, "last"), (1.0, 0.0, "best_val_auroc")]


def test_evaluate_reads_the_training_sample_from_the_train_stages_trunk_cache(trained):
    """The evaluate stage's training sample (drift reference, OOD detector) costs the head alone:
    `trained_trunk_features` finds the folder the train stage wrote (the key the bundle records),
    rebuilds it byte for byte when it was deleted, and `CacheOutputs` scores from it only rows with
    every view the network needs (a TTA net: the mirror too, so validation rows take the full pass).
    Its numbers are the pixel pass's (this cache is float32). A plan that differs from training's
    (other rows, other mirrors) gives another key and no shared folder, and fails here."""
    from bonefrac.inference.cache_outputs import CacheOutputs
    from bonefrac.preprocess.cache import IMAGES_FILE
    from bonefrac.training.feature_cache import trained_trunk_features

    tmp, cache, result = trained
    bundle = ModelBundle.load(result.best_model_path)
    record = bundle.metadata["trunk_cache"]
    assert record["flip"] == "exact" and record["dtype"] == "float32"
    images, index = load_cache(cache)
    features = tmp / "features"
    messages: list[str] = []
    for arch, n_trunk in (("efficientnet_lite0_dense", 20), ("efficientnet_lite0_dense_tta", 16)):
        bundle.arch = arch  # one module layout: the TTA arch scores the same weights on both views
        predictor = Predictor(bundle)
        trunk = trained_trunk_features(
            predictor.model, record, images, cache / IMAGES_FILE, index, features, progress=messages.append
        )
        assert trunk is not None and trunk.root == features / record["key"] and not messages  # found, not rebuilt
        outputs = CacheOutputs(predictor, images, trunk=trunk)
        every = np.arange(len(index))
        logits, emb = outputs.logits(every), outputs.embeddings(every)
        assert outputs.n_computed == 24 and outputs.n_from_trunk == n_trunk  # train (+ val without TTA)
        direct = CacheOutputs(predictor, images)
        np.testing.assert_allclose(logits, direct.logits(every), atol=1e-4)
        np.testing.assert_allclose(emb, direct.embeddings(every), atol=1e-4)
    kept = np.load(trunk.root / "s16.npy").copy()
    import shutil

    shutil.rmtree(trunk.root)
    again = trained_trunk_features(predictor.model, record, images, cache / IMAGES_FILE, index, features,
                                   progress=messages.append)  # fmt: skip
    assert again is not None and messages and np.array_equal(np.load(again.root / "s16.npy"), kept)
    assert trained_trunk_features(predictor.model, {**record, "flip": "none"}, images, cache / IMAGES_FILE, index,
                                  features) is None  # another plan: not the train stage's maps  # fmt: skip
    assert trained_trunk_features(predictor.model, None, images, cache / IMAGES_FILE, index, features) is None
