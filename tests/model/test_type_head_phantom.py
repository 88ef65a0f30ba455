"""The fracture-type head learns the six phantom types (issue 14).

Fractured phantoms of every type are rendered at 256 px with the fracture site at the
image centre, cropped to the 96 px square around it and fed at 64 px, so a brief CPU
training sees the fracture at 2/3 of full resolution. The data go the pipeline's way
(cache -> CachedDataset -> FractureLoss type term -> bundle), so a type-label mapping or
loss-masking bug fails this test, as does a type loss weight of 0.

Measured (1 torch thread, preprocessing version 2): 15 epochs (480 optimiser steps at batch 8) give
macro-F1 0.614, 0.632 and 0.592 on 180 held-out crops (30 per type) for training seeds 0, 1, 2 on an
Intel Xeon machine; chance is ~0.17, and ``type_loss_weight=0`` gave 0.14 (at 10 epochs). The 10 epochs before gave
0.551 / 0.583 / 0.548 on an AMD EPYC machine but 0.494 / 0.530 / 0.593 on the Intel one (CI failed
at 0.494): too short a training for the bar to hold across machines' floating point. Lifting the
learning rate to 2e-3 instead was worse (0.525 / 0.565 / 0.471); 60 training crops per type at 10
epochs did as well as 15 epochs (0.588 / 0.651 / 0.609) at the same cost. Before that, batch 32 (80
steps, AUROC monitor on 5 validation crops per type) scored 0.50, 0.42 and 0.48. The epoch is
picked by the type-aware monitor on 15 validation crops per type (the AUROC monitor saturates at 1.0
within a few epochs and so keeps an early one). Resolution is what the head needs: the same 64 px
input rendered at 3/4 of this pixel density scored 0.42.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import f1_score

from bonefrac.config import AugmentParams, ModelParams, TrainParams
from bonefrac.data.phantom import render_phantom
from bonefrac.data.schema import FRACTURE_TYPES_PHANTOM
from bonefrac.model.bundle import ModelBundle
from bonefrac.model.transforms import PreprocessSpec
from bonefrac.preprocess.cache import build_cache, load_cache
from bonefrac.training.loop import train_model

pytestmark = pytest.mark.long

SIZE, CROP, INPUT = 256, 96, 64
N_TRAIN, N_VAL, N_TEST = 40, 15, 30  # per type
MIN_MACRO_F1 = 0.50  # chance ~0.17; measured 0.59-0.63 over three seeds (issue 14)


def _phantom_crops(root: Path) -> pd.DataFrame:
    raw = root / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rows, i = [], 0
    views = ("frontal", "lateral", "oblique")
    for split, n in (("train", N_TRAIN), ("val", N_VAL), ("test", N_TEST)):
        for j in range(n):
            kinds = [*FRACTURE_TYPES_PHANTOM, None] if j % 3 == 0 else list(FRACTURE_TYPES_PHANTOM)
            for kind in kinds:  # a few normals keep the fracture logit (and val AUROC) defined
                rng = np.random.default_rng([11, i])
                arr, _ = render_phantom(rng, SIZE, kind, views[i % 3], 8, site_range=(0.5, 0.5))
                h, w = arr.shape
                y0, x0 = (h - CROP) // 2, (w - CROP) // 2
                path = raw / f"{i}.npy"
                np.save(path, arr[y0 : y0 + CROP, x0 : x0 + CROP])
                rows.append({
                    "image_id": str(i), "path": str(path), "label": int(kind is not None),
                    "fracture_type": kind or "", "split": split,
                })
                i += 1
    return pd.DataFrame(rows)


def test_type_head_learns_phantom_types(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cache = build_cache(_phantom_crops(tmp_path), tmp_path / "cache", PreprocessSpec(image_size=INPUT), read_fn=np.load)
    names = sorted(FRACTURE_TYPES_PHANTOM)
    mp = ModelParams(arch="efficientnet_lite0", pretrained="efficientnet_lite_offline", dropout=0.1, multitask=True)
    tp = TrainParams(
        epochs=15, batch_size=8, lr=1e-3, warmup_epochs=1, early_stopping_patience=100, threads=1,
        type_loss_weight=1.0, finetune={"strategy": "full"}, monitor="val_auroc_type_f1",
        augment=AugmentParams(flip_prob=0.5, affine_prob=0.0, contrast_prob=0.0, noise_prob=0.0),
    )
    result = train_model(cache, tmp_path / "model", mp, tp, 2, names, seed=0, resume=False)

    images, index = load_cache(cache)
    test = index[(index["split"] == "test") & (index["label"] == 1)]
    model = ModelBundle.load(result.best_model_path).build_model().eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(np.asarray(images[test["cache_row"].to_numpy()], dtype=np.float32)))
    pred = np.array(names)[logits[:, 1:].argmax(1).numpy()]
    truth = test["fracture_type"].to_numpy()
    assert sorted(set(truth)) == names and len(truth) == N_TEST * len(names)
    macro_f1 = f1_score(truth, pred, labels=names, average="macro", zero_division=0.0)
    assert macro_f1 >= MIN_MACRO_F1, f"type macro-F1 {macro_f1:.3f} (chance ~0.17)"
