"""The training loop on tiny synthetic caches: outputs, determinism, early stopping, learning, 3D."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _training_helpers import NO_AUG, TYPES, make_tiny_cache, tiny_params
from sklearn.metrics import roc_auc_score

from bonefrac.config import FinetuneParams, ImbalanceParams
from bonefrac.model.bundle import ModelBundle
from bonefrac.model.transforms import PreprocessSpec
from bonefrac.preprocess.cache import load_cache
from bonefrac.training.loop import train_model
from bonefrac.training.stage import run_training


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_cache(tmp_path_factory.mktemp("tiny"), n_train=16, n_val=8, size=32)


def test_outputs_and_same_seed_same_metrics(cache: Path, tmp_path: Path) -> None:
    mp, tp = tiny_params(epochs=2, dropout=0.3, imbalance=ImbalanceParams(sampler="weighted", loss="focal"))
    a = train_model(cache, tmp_path / "a", mp, tp, 2, TYPES, seed=7, dvclive_dir=tmp_path / "live")
    b = train_model(cache, tmp_path / "b", mp, tp, 2, TYPES, seed=7)
    c = train_model(cache, tmp_path / "c", mp, tp, 2, TYPES, seed=8)
    keys = ["train/loss", "val/loss", "val/auroc"]
    assert [[r[k] for k in keys] for r in a.history] == [[r[k] for k in keys] for r in b.history]
    assert [r["train/loss"] for r in a.history] != [r["train/loss"] for r in c.history]
    wa, wb = (ModelBundle.load(r.best_model_path).state_dict for r in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    # outputs: bundle, summary, checkpoint, DVCLive curves
    assert a.finished and a.epochs_completed == 2 and a.best_model_path == tmp_path / "a" / "best_model.pt"
    bundle = ModelBundle.load(a.best_model_path)
    assert bundle.arch == "custom_cnn" and bundle.type_names == TYPES and bundle.calibration.method == "identity"
    assert bundle.operating_points == {} and bundle.metadata["best_epoch"] == a.best_epoch
    assert bundle.preprocess_spec == PreprocessSpec(image_size=32, volume_size=(32, 32, 32))  # the cache's spec
    summary = json.loads((tmp_path / "a" / "train_summary.json").read_text())
    assert summary["best_val_auroc"] == a.best_val_auroc and len(summary["history"]) == 2
    assert (tmp_path / "a" / "last.ckpt").exists()
    metrics = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert metrics["step"] == 1 and "auroc" in metrics["val"]
    tsv = (tmp_path / "live" / "plots" / "metrics" / "val" / "auroc.tsv").read_text().strip().splitlines()
    assert len(tsv) == 3  # header + one row per epoch

    # the bundle reproduces the recorded validation AUROC
    images, index = load_cache(cache)
    val = index[index["split"] == "val"]
    model = bundle.build_model()
    with torch.no_grad():
        x = torch.from_numpy(np.asarray(images[val["cache_row"].to_numpy()], dtype=np.float32))
        probs = torch.sigmoid(model(x)[:, 0]).numpy()
    assert roc_auc_score(val["label"].astype(int), probs) == pytest.approx(a.best_val_auroc, abs=1e-6)


def test_the_train_stage_writes_the_same_bytes_in_another_folder(cache: Path, tmp_path: Path) -> None:
    """The train stage's DVC outputs carry no absolute path, time or unseeded randomness.

    The same cache bytes in two folders (the second deeper, with a space in its name), trained by
    the stage's entry (:func:`run_training`) with the pipeline's network (pretrained
    EfficientNet-Lite0, as ``test_pipeline_e2e`` trains it), write the same ``best_model.pt`` and
    DVCLive files byte for byte. The end-to-end test's second checkout relies on this and does
    not retrain.
    """
    mp, tp = tiny_params(arch="efficientnet_lite0", epochs=2)
    mp = mp.model_copy(update={"pretrained": "efficientnet_lite_offline"})
    outs: list[dict[str, bytes]] = []
    for root in (tmp_path / "a", tmp_path / "elsewhere" / "with a longer name"):
        here = root / "cache"
        shutil.copytree(cache, here)
        run_training(here, root / "models" / "train", mp, tp, 2, TYPES, seed=7, features_dir=root / "features",
                     dvclive_dir=root / "dvclive")
        files = [root / "models" / "train" / "best_model.pt", *sorted((root / "dvclive").rglob("*"))]
        outs.append({f.relative_to(root).as_posix(): f.read_bytes() for f in files if f.is_file()})
        assert not [k for k, v in outs[-1].items() if str(root).encode() in v], "an output names its folder"
    assert "dvclive/metrics.json" in outs[0] and any(k.startswith("dvclive/plots/metrics/") for k in outs[0])
    assert outs[0].keys() == outs[1].keys()
    assert [k for k in outs[0] if outs[0][k] != outs[1][k]] == []


def test_early_stopping(cache: Path, tmp_path: Path) -> None:
    # lr so small nothing changes: AUROC cannot improve after epoch 0, patience 1 stops at epoch 1
    mp, tp = tiny_params(epochs=6, augment=NO_AUG, early_stopping_patience=1, lr=1e-12)
    r = train_model(cache, tmp_path / "o", mp, tp, 2, TYPES, seed=0)
    assert r.stopped_early and r.finished and r.epochs_completed == 2 and r.best_epoch == 0


def test_learns_the_synthetic_task(tmp_path: Path) -> None:
    cache = make_tiny_cache(tmp_path, n_train=48, n_val=16, size=32, seed=3)
    mp, tp = tiny_params(
        epochs=8, batch_size=16, augment=NO_AUG, lr=3e-3, finetune=FinetuneParams(strategy="full")
    )
    r = train_model(cache, tmp_path / "o", mp, tp, 2, TYPES, seed=0)
    assert r.history[-1]["train/loss"] < r.history[0]["train/loss"]
    assert r.best_val_auroc >= 0.85


def test_gradual_unfreezing_3d_volumes(tmp_path: Path) -> None:
    cache = make_tiny_cache(tmp_path, n_train=6, n_val=4, size=16, dims=3)
    mp, tp = tiny_params(
        epochs=2, batch_size=3, finetune=FinetuneParams(strategy="gradual", unfreeze_every=1)
    )
    r = train_model(cache, tmp_path / "o", mp, tp, 3, TYPES, seed=0)
    assert [row["trainable_blocks"] for row in r.history] == [0, 1]
    bundle = ModelBundle.load(r.best_model_path)
    assert bundle.spatial_dims == 3 and bundle.preprocess_spec.volume_size == (16, 16, 16)
    with pytest.raises(Exception, match="3D data"):
        train_model(cache, tmp_path / "p", mp, tp, 2, TYPES, seed=0)


def test_type_aware_monitor_picks_the_epoch_by_auroc_and_type_f1(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``train.monitor: val_auroc_type_f1`` keeps the epoch with the best mean(val AUROC, type macro-F1).

    Validation is scripted so that AUROC peaks at epoch 0 and the type head at epoch 1 (as on
    phantoms, where the type head keeps learning after the fracture AUROC has levelled off).
    """
    import bonefrac.training.loop as loop

    real = loop.evaluate_split
    script = iter([(0.90, 0.10), (0.85, 0.60), (0.80, 0.20)] * 2)

    def scripted(*args, **kwargs):
        out = real(*args, **kwargs)
        out["auroc"], out["type_macro_f1"] = next(script)
        return out

    monkeypatch.setattr(loop, "evaluate_split", scripted)
    picked = {}
    for monitor in ("val_auroc", "val_auroc_type_f1"):
        mp, tp = tiny_params(epochs=3, augment=NO_AUG, monitor=monitor)
        r = train_model(cache, tmp_path / monitor, mp, tp, 2, TYPES, seed=3)
        assert [h["val/type_macro_f1"] for h in r.history] == [0.10, 0.60, 0.20]
        picked[monitor] = (r.best_epoch, ModelBundle.load(r.best_model_path).metadata["monitor"])
    assert picked == {"val_auroc": (0, "val/auroc"), "val_auroc_type_f1": (1, "val/auroc_type_f1")}


def test_monitor_falls_back_without_types() -> None:
    """No type head, or no typed fracture in val: the type-aware monitor ranks on AUROC alone."""
    import pandas as pd

    from bonefrac.training.loop import _monitor_name, _monitored

    both = pd.DataFrame({"label": [0, 1]})
    assert _monitor_name("val_auroc_type_f1", both, []) == "val/auroc"
    assert _monitor_name("val_auroc_type_f1", both, TYPES) == "val/auroc_type_f1"
    assert _monitor_name("val_auroc_type_f1", pd.DataFrame({"label": [1, 1]}), TYPES) == "val/neg_loss"
    assert _monitored("val/auroc_type_f1", {"auroc": 0.8, "loss": 1.0}) == 0.8
    assert _monitored("val/auroc_type_f1", {"auroc": 0.8, "type_macro_f1": 0.4, "loss": 1.0}) == pytest.approx(0.6)
    assert _monitored("val/neg_loss", {"auroc": float("nan"), "loss": 1.5}) == -1.5
