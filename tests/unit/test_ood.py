"""Per-image OOD warning: phantom test images pass, real radiographs and non-radiographs warn.

The detector is fitted as the pipeline would: training split for the Gaussians, a held-out
(validation) split for the thresholds, and the model's embedding through the drift
reference's PCA. The model is the default arch at the default input size (EfficientNet-Lite0
with its ImageNet weights at 128 px, as the phantom pipeline starts it; not fine-tuned here,
which takes minutes): a small random CNN's embedding of 64-px inputs does not tell FracAtlas
from phantoms, so it would not test the embedding check. FracAtlas images are used when the
dataset is on this machine.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bonefrac.data.imageio import read_image
from bonefrac.data.phantom import FRACTURE_TYPES_PHANTOM, REGIONS, render_phantom
from bonefrac.model.transforms import PreprocessSpec
from bonefrac.monitoring.features import EmbeddingReducer
from bonefrac.monitoring.ood import IMAGE_STAT_COLUMNS, OODDetector, OODError, image_ood_features

FRACATLAS = Path(os.environ.get("BONEFRAC_FRACATLAS", "/work/shared/data/fracatlas"))
SPEC = PreprocessSpec(image_size=128)


def _phantoms(folder: Path, n: int, seed: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    views = ["frontal", "lateral", "oblique"]
    for i in range(n):
        kind = None if i % 2 else FRACTURE_TYPES_PHANTOM[i % len(FRACTURE_TYPES_PHANTOM)]
        bits = (8, 16)[i % 2]
        arr, _ = render_phantom(rng, 256, kind, views[i % 3], bits, region=REGIONS[i % len(REGIONS)])
        p = folder / f"p{i:03d}.png"
        Image.fromarray(arr).save(p)
        out.append(p)
    return out


@pytest.fixture(scope="module")
def model():
    import torch

    from bonefrac.model.networks import build_model

    torch.manual_seed(0)
    torch.set_num_threads(1)
    return build_model("efficientnet_lite0", num_types=3, spatial_dims=2, pretrained="efficientnet_lite_offline").eval()


def _embed(model, paths: list[Path]) -> tuple[list, np.ndarray]:
    import torch

    from bonefrac.model.networks import forward_with_embedding

    imgs = [read_image(str(p)) for p in paths]
    with torch.no_grad():
        _, emb = forward_with_embedding(model, torch.stack([SPEC.apply(im.array) for im in imgs]))
    return imgs, emb.numpy()


def _rows(imgs, emb, reducer) -> pd.DataFrame:
    return pd.DataFrame(
        [
            image_ood_features(im.array, im.bit_depth, (im.meta or {}).get("value_range"), e, reducer)
            for im, e in zip(imgs, emb, strict=True)
        ]
    )


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("ood")
    train_imgs, train_emb = _embed(model, _phantoms(root / "train", 48, seed=1))
    held_imgs, held_emb = _embed(model, _phantoms(root / "val", 24, seed=2))
    reducer = EmbeddingReducer.fit(train_emb, 4)  # params.yaml drift.embedding_dims
    held = _rows(held_imgs, held_emb, reducer)
    det = OODDetector.fit(_rows(train_imgs, train_emb, reducer), held, reducer=reducer)
    return det, reducer, root, held


def _score(det, model, paths):
    """As the service scores: image statistics, and the raw embedding projected by the detector's own PCA."""
    imgs, emb = _embed(model, paths)
    feats = _rows(imgs, emb, None).to_dict("records")
    return [det.score(f, e) for f, e in zip(feats, emb, strict=True)]


def test_phantom_test_images_do_not_warn(fitted, model):
    det, _, root, _ = fitted
    verdicts = _score(det, model, _phantoms(root / "test", 16, seed=3))
    assert set(det.groups) == {"image", "embedding"}
    assert all(v["skipped"] == [] for v in verdicts)  # both checks ran: the embedding came through the PCA
    assert not any(v["flag"] for v in verdicts), [v["reason"] for v in verdicts if v["flag"]]
    assert all(v["score"] <= 1.0 and v["fired"] == [] and "within the range" in v["reason"] for v in verdicts)


def test_thresholds_come_from_the_held_out_rows(fitted):
    """Each group's threshold is the held-out 99th percentile of distances times the margin, not a constant."""
    det, _, _, held = fitted
    for g in det.groups.values():
        d = g.distance(held[g.columns].to_numpy(dtype=np.float64))
        assert g.threshold == pytest.approx(np.quantile(d, det.meta["quantile"]) * det.meta["margin"])
    farther = held.copy()
    farther[det.groups["embedding"].columns] *= 3.0  # a wider held-out set: a higher embedding threshold
    same = OODDetector.fit(held, held).groups
    assert OODDetector.fit(held, farther).groups["embedding"].threshold > same["embedding"].threshold


def test_non_radiographs_warn(fitted, model, tmp_path):
    det, _, _, _ = fitted
    rng = np.random.default_rng(0)
    noise = tmp_path / "noise.png"
    Image.fromarray(rng.integers(0, 256, (300, 500), dtype=np.uint8)).save(noise)
    bright = tmp_path / "bright.png"  # an overexposed, flat gradient (a constant image is refused at decode)
    Image.fromarray(np.tile(np.linspace(200, 255, 256).astype(np.uint8), (256, 1))).save(bright)
    for v in _score(det, model, [noise, bright]):
        assert v["flag"] and v["score"] > 1.0 and "unlike the training images" in v["reason"]


@pytest.mark.skipif(not (FRACATLAS / "images").is_dir(), reason="FracAtlas not available on this machine")
def test_fracatlas_radiographs_warn_against_a_phantom_model(fitted, model):
    """Every FracAtlas radiograph warns; the embedding check fires on its own on most of them (the
    image statistics fire on all: another detector size and exposure), and the reason names both."""
    det, _, _, _ = fitted
    paths = sorted((FRACATLAS / "images" / "Fractured").glob("*.jpg"))[:4]
    paths += sorted((FRACATLAS / "images" / "Non_fractured").glob("*.jpg"))[:4]
    verdicts = _score(det, model, paths)
    assert all(v["flag"] for v in verdicts), [(p.name, v["score"]) for p, v in zip(paths, verdicts, strict=True)]
    by_embedding = [v for v in verdicts if "embedding" in v["fired"]]
    assert len(by_embedding) >= 6, [v["ratios"] for v in verdicts]  # 7 of 8 when written (ratios 1.01-1.43)
    assert all("internal features (embedding)" in v["reason"] for v in by_embedding)


def test_saved_detector_scores_the_same_and_skips_missing_groups(fitted, tmp_path):
    det, _, _, _ = fitted
    again = OODDetector.load(det.save(tmp_path / "ood.json"))
    assert again.reducer is not None and np.array_equal(again.reducer.components, det.reducer.components)
    row = {c: float(g) for c, g in zip(det.groups["image"].columns, det.groups["image"].mean, strict=True)}
    a, b = det.score(row), again.score(row)  # no emb_*: the embedding group is skipped, not guessed
    assert a == b and a["skipped"] == ["embedding"] and not a["flag"] and a["group"] == "image"
    emb = np.ones(det.reducer.components.shape[1])
    assert again.score(row, emb) == det.score(row, emb) and "embedding" in det.score(row, emb)["ratios"]
    assert det.score(row, np.ones(7))["skipped"] == ["embedding"]  # another model's width: skipped, not guessed
    with pytest.raises(OODError):
        det.score({"width": 3.0})
    with pytest.raises(OODError):
        OODDetector.load(tmp_path / "missing.json")
    with pytest.raises(OODError):
        OODDetector.fit(pd.DataFrame({c: [0.1, 0.2] for c in IMAGE_STAT_COLUMNS}), pd.DataFrame({"x": [1]}))


def test_build_ood_detector_from_a_cache(tmp_path, model):
    """The pipeline's way: train rows of the preprocessed cache fit, val rows set the thresholds."""
    from bonefrac.model.bundle import ModelBundle
    from bonefrac.monitoring.ood import build_ood_detector

    paths = _phantoms(tmp_path / "raw", 36, seed=11)
    cache = tmp_path / "cache"
    cache.mkdir()
    arrays = [read_image(str(p)).array for p in paths]
    np.save(cache / "images.npy", np.stack([SPEC.apply(a).numpy() for a in arrays]).astype(np.float16))
    split = ["train"] * 24 + ["val"] * 12
    pd.DataFrame({"path": [str(p) for p in paths], "split": split, "cache_row": range(36), "label": 0}).to_csv(
        cache / "index.csv", index=False
    )
    bundle = ModelBundle(
        arch="efficientnet_lite0", state_dict=model.state_dict(), preprocess_spec=SPEC, type_names=["a", "b", "c"]
    )
    _, emb = _embed(model, paths[:24])
    det = build_ood_detector(cache, tmp_path / "ood.json", bundle=bundle, reducer=EmbeddingReducer.fit(emb, 4))
    assert set(det.groups) == {"image", "embedding"} and det.meta["n_train"] == 24 and det.meta["n_heldout"] == 12
    assert det.reducer is not None  # the PCA travels with the detector (the service has no reference folder)
    assert OODDetector.load(tmp_path / "ood.json").groups["image"].threshold == det.groups["image"].threshold
