"""Unit tests of the CT-like volume phantom (bonefrac.data.phantom3d)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bonefrac.config import PhantomParams
from bonefrac.data.phantom import generate_phantom_dataset
from bonefrac.data.phantom3d import (
    Phantom3DError,
    generate_volume,
    load_volume,
    save_volume,
)
from bonefrac.data.schema import FRACTURE_TYPES_PHANTOM, RECORD_COLUMNS

SHAPE = (24, 48, 48)


def test_volume_shape_dtype_and_hu_ranges() -> None:
    vol = generate_volume(np.random.default_rng(0), SHAPE, None, region="tibia")
    a = vol.array
    assert a.shape == SHAPE and a.dtype == np.int16
    assert a.min() <= -900  # air around the limb
    assert a.max() >= 900  # cortical bone
    soft = np.median(a[a > -300])
    assert -150 < soft < 300  # most of the limb is soft tissue
    assert vol.boxes == [] and vol.body_part == "tibia"


def test_nifti_round_trip_keeps_array_and_spacing(tmp_path: Path) -> None:
    vol = generate_volume(np.random.default_rng(1), SHAPE, "oblique")
    path = tmp_path / "v.nii.gz"
    save_volume(vol, path)
    img = nib.load(str(path))
    assert img.shape == (SHAPE[2], SHAPE[1], SHAPE[0])  # NIfTI: x, y, z
    assert np.allclose(img.header.get_zooms(), (vol.spacing[2], vol.spacing[1], vol.spacing[0]))
    assert img.header.get_data_dtype() == np.int16
    arr, affine = load_volume(path)
    assert np.array_equal(arr, vol.array)
    assert np.allclose(affine, vol.affine)
    assert np.allclose(np.abs(np.diag(affine)[:3]), img.header.get_zooms())


def test_saved_volume_bytes_do_not_depend_on_file_name_or_time(tmp_path: Path) -> None:
    """DVC output: gzip must not record the (temp) file name or the clock."""
    vol = generate_volume(np.random.default_rng(1), SHAPE, "oblique")
    save_volume(vol, tmp_path / "a.nii.gz")
    save_volume(vol, tmp_path / "sub" / "b.nii.gz")
    assert (tmp_path / "a.nii.gz").read_bytes() == (tmp_path / "sub" / "b.nii.gz").read_bytes()


@pytest.mark.parametrize("kind", FRACTURE_TYPES_PHANTOM)
def test_fracture_changes_lie_inside_the_box(kind: str) -> None:
    """Fractured (pieces kept in place) minus intact twin: every strongly changed voxel is boxed."""
    broken = generate_volume(np.random.default_rng(2), SHAPE, kind, region="forearm", displace=False)
    intact = generate_volume(np.random.default_rng(2), SHAPE, None, region="forearm")
    diff = np.abs(broken.array.astype(np.int32) - intact.array.astype(np.int32))
    assert diff.max() > 300, f"{kind}: no visible fracture"
    inside = np.zeros(SHAPE, bool)
    assert broken.boxes
    for x, y, z, w, h, d in broken.boxes:
        assert w > 0 and h > 0 and d > 0
        assert x + w <= SHAPE[2] and y + h <= SHAPE[1] and z + d <= SHAPE[0] and min(x, y, z) >= 0
        inside[z:z + d, y:y + h, x:x + w] = True
    assert diff[~inside].max() < 100, f"{kind}: change outside the box"
    assert inside.mean() < 0.5


def test_displaced_fracture_box_contains_the_broken_zone() -> None:
    """Moving the pieces only adds to the box: it still holds the zone boxed without displacement."""
    for kind in ("transverse", "comminuted", "segmental"):
        moved = generate_volume(np.random.default_rng(3), SHAPE, kind, region="femur")
        still = generate_volume(np.random.default_rng(3), SHAPE, kind, region="femur", displace=False)
        assert len(moved.boxes) == len(still.boxes) > 0
        assert not np.array_equal(moved.array, still.array)
        for (x, y, z, w, h, d), (x2, y2, z2, w2, h2, d2) in zip(moved.boxes, still.boxes, strict=True):
            assert x <= x2 and y <= y2 and z <= z2
            assert x + w >= x2 + w2 and y + h >= y2 + h2 and z + d >= z2 + d2


def test_bad_requests() -> None:
    with pytest.raises(Phantom3DError, match="fracture type"):
        generate_volume(np.random.default_rng(0), SHAPE, "crushed")
    with pytest.raises(Phantom3DError, match="region"):
        generate_volume(np.random.default_rng(0), SHAPE, None, region="hand")
    with pytest.raises(Phantom3DError, match="shape"):
        generate_volume(np.random.default_rng(0), (4, 48, 48), None)


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_volume_dataset_manifest_and_determinism(tmp_path: Path) -> None:
    params = PhantomParams(n_patients=7, fracture_fraction=0.85, spatial_dims=3, volume_shape=SHAPE, seed=5)
    df = generate_phantom_dataset(tmp_path / "a", params)
    generate_phantom_dataset(tmp_path / "b", params)
    assert _hashes(tmp_path / "a") == _hashes(tmp_path / "b")
    on_disk = pd.read_csv(tmp_path / "a" / "manifest.csv", keep_default_na=False)
    assert list(on_disk.columns) == RECORD_COLUMNS == list(df.columns)
    assert set(on_disk["fracture_type"]) == {"", *FRACTURE_TYPES_PHANTOM}
    for _, r in on_disk.iterrows():
        assert r["path"].endswith(".nii.gz") and (tmp_path / "a" / r["path"]).is_file()
        boxes = json.loads(r["boxes"])
        assert (len(boxes) > 0) == (r["label"] == 1)
        assert all(len(b) == 6 for b in boxes)
        arr, _ = load_volume(tmp_path / "a" / r["path"])
        assert arr.shape == SHAPE
