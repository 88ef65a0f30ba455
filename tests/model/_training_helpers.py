"""Shared fixtures for the training tests: tiny synthetic caches (no real data, no network)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from bonefrac.config import AugmentParams, ModelParams, TrainParams
from bonefrac.model.transforms import PreprocessSpec
from bonefrac.preprocess.cache import build_cache

TYPES = ["oblique", "transverse"]


def read_npy(path: str) -> np.ndarray:
    """A picklable ``read_fn`` for build_cache: the synthetic 'images' are .npy files."""
    return np.load(path)


def synthetic_image(rng: np.random.Generator, label: int, size: int, dims: int) -> np.ndarray:
    """A 'bone' (bright bar) with a dark gap across it when fractured, plus noise."""
    shape = (size,) * dims
    img = rng.normal(0.2, 0.05, shape).astype(np.float32)
    c = size // 2
    if dims == 2:
        img[:, c - 3 : c + 3] += 0.6
        if label:
            r = int(rng.integers(size // 4, 3 * size // 4))
            img[r : r + 2, c - 3 : c + 3] = 0.2
    else:
        img[:, :, c - 2 : c + 2] += 0.6
        if label:
            r = int(rng.integers(size // 4, 3 * size // 4))
            img[:, r : r + 2, c - 2 : c + 2] = 0.2
    return img * 1000.0  # stored units, not [0, 1]: preprocessing must window them


def make_tiny_cache(
    root: Path, n_train: int = 16, n_val: int = 8, size: int = 32, dims: int = 2, seed: int = 0
) -> Path:
    """Write ``n_train + n_val`` synthetic images and cache them; returns the cache dir."""
    rng = np.random.default_rng(seed)
    raw = root / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_train + n_val):
        label = i % 2
        p = raw / f"img{i:03d}.npy"
        np.save(p, synthetic_image(rng, label, size, dims))
        rows.append(
            {
                "image_id": f"img{i:03d}",
                "path": str(p),
                "label": label,
                "fracture_type": TYPES[(i // 2) % 2] if label else "",
                "split": "train" if i < n_train else "val",
            }
        )
    return build_cache(
        pd.DataFrame(rows),
        root / "cache",
        PreprocessSpec(
            spatial_dims=dims, volume_size=(size, size, size), **({"image_size": size} if dims == 2 else {})
        ),
        read_fn=read_npy,
    )


NO_AUG = AugmentParams(flip_prob=0.0, affine_prob=0.0, contrast_prob=0.0, noise_prob=0.0)


def tiny_params(
    arch: str = "custom_cnn",
    epochs: int = 3,
    batch_size: int = 8,
    dropout: float = 0.0,
    augment: AugmentParams | None = None,
    **train_kw,
) -> tuple[ModelParams, TrainParams]:
    mp = ModelParams(arch=arch, pretrained="none", dropout=dropout, multitask=True)
    kw = {
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": 3e-3,
        "warmup_epochs": 1,
        "early_stopping_patience": 50,
        "num_workers": 0,
        "threads": 1,
        "deterministic": True,
        "augment": augment or AugmentParams(),
    }
    tp = TrainParams(**{**kw, **train_kw})
    return mp, tp
