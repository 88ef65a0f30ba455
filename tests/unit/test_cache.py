"""The preprocessed cache: one float16 memmap + index, atomic, same tensors as the spec's transform."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bonefrac.model.transforms import PreprocessSpec
from bonefrac.preprocess.cache import CacheError, build_cache, cache_spec, load_cache

SPEC = PreprocessSpec(image_size=32, volume_size=(8, 16, 16), lower_percentile=1.0, upper_percentile=99.0)


def read_png(path: str) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.float32)


def read_nifti(path: str) -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.load(path).get_fdata(), dtype=np.float32)


def _pngs(tmp_path: Path, n: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        h, w = 40 + 7 * i, 64 - 3 * i  # different sizes and aspect ratios
        arr = (rng.random((h, w)) * (255 if i % 2 else 65535)).astype(np.uint8 if i % 2 else np.uint16)
        p = tmp_path / f"im{i}.png"
        Image.fromarray(arr).save(p)
        rows.append(
            {
                "image_id": f"im{i}",
                "path": str(p),
                "label": i % 2,
                "fracture_type": "",
                "split": ["train", "val", "test"][i % 3],
            }
        )
    return pd.DataFrame(rows)


@pytest.mark.parametrize("workers", [1, 2])
def test_cache_2d_matches_the_spec_transform(tmp_path: Path, workers: int) -> None:
    df = _pngs(tmp_path, 5)
    out = build_cache(df, tmp_path / "cache", SPEC, read_fn=read_png, workers=workers)
    images, index = load_cache(out)
    assert isinstance(images, np.memmap) or images.base is not None  # memory-mapped, not loaded
    assert images.dtype == np.float16 and images.shape == (5, 1, 32, 32)
    assert list(index["cache_row"]) == list(range(5))
    assert list(index["split"]) == list(df["split"]) and list(index["image_id"]) == list(df["image_id"])
    assert index["fracture_type"].tolist() == [""] * 5  # empty stays "", not NaN
    for i, p in enumerate(df["path"]):
        ref = SPEC.apply(read_png(p)).numpy()
        np.testing.assert_allclose(images[i].astype(np.float32), ref, atol=1e-3)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert cache_spec(out) == SPEC  # the whole spec travels on to the model bundle
    assert not [f for f in out.iterdir() if f.name.startswith(".")]  # no temp files left


def test_cache_3d_nifti(tmp_path: Path) -> None:
    import nibabel as nib

    rows = []
    for i in range(2):
        vol = np.random.default_rng(i).random((10, 20, 24)).astype(np.float32) * 3000
        p = tmp_path / f"v{i}.nii.gz"
        nib.save(nib.Nifti1Image(vol, np.eye(4)), p)
        rows.append({"path": str(p), "label": i, "split": "train"})
    images, index = load_cache(
        build_cache(
            pd.DataFrame(rows), tmp_path / "c3", SPEC.model_copy(update={"spatial_dims": 3}), read_fn=read_nifti
        )
    )
    assert images.shape == (2, 1, 8, 16, 16) and images.dtype == np.float16
    assert len(index) == 2


def test_cache_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="'path' column"):
        build_cache(pd.DataFrame({"x": [1]}), tmp_path / "c", SPEC, read_fn=read_png)
    bad = pd.DataFrame({"path": [str(tmp_path / "missing.png")], "split": ["train"]})
    with pytest.raises(CacheError, match=r"missing\.png"):
        build_cache(bad, tmp_path / "c", SPEC, read_fn=read_png)
    assert not (tmp_path / "c" / "images.npy").exists()  # a failed build leaves no half-written cache
    with pytest.raises(CacheError, match=r"images\.npy is missing"):
        load_cache(tmp_path / "c")
