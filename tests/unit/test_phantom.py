"""Unit tests of the radiograph phantom generator (bonefrac.data.phantom) and the contact sheet."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bonefrac.config import PhantomParams
from bonefrac.data import phantom
from bonefrac.data.contact_sheet import ContactSheetError, make_contact_sheet
from bonefrac.data.phantom import (
    PhantomError,
    generate_phantom_dataset,
    render_phantom,
    render_phantom_detail,
)
from bonefrac.data.schema import FRACTURE_TYPES_PHANTOM, RECORD_COLUMNS

# 8 studies, 6 of them fractured: every type once, plus normals.
SMALL = {"n_patients": 8, "views_per_study": 2, "fracture_fraction": 0.75, "size": 64, "seed": 3}


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    root = tmp_path_factory.mktemp("phantom")
    df = generate_phantom_dataset(root, PhantomParams(**SMALL))
    return root, df


def test_same_seed_gives_identical_bytes_and_other_seed_differs(
    small_dataset: tuple[Path, pd.DataFrame], tmp_path: Path,
) -> None:
    root, _ = small_dataset
    again = tmp_path / "again"
    generate_phantom_dataset(again, PhantomParams(**SMALL))
    assert _hashes(root) == _hashes(again)
    other = tmp_path / "other"
    generate_phantom_dataset(other, PhantomParams(**{**SMALL, "seed": 4}))
    h1, h2 = _hashes(root), _hashes(other)
    differing = [k for k in h1 if k.endswith(".png") and h1[k] != h2.get(k)]
    assert len(differing) == sum(k.endswith(".png") for k in h1)


def test_manifest_has_record_columns_and_consistent_rows(small_dataset: tuple[Path, pd.DataFrame]) -> None:
    root, df = small_dataset
    on_disk = pd.read_csv(root / "manifest.csv", keep_default_na=False)
    assert list(on_disk.columns) == RECORD_COLUMNS
    assert list(df.columns) == RECORD_COLUMNS
    assert len(df) == SMALL["n_patients"] * SMALL["views_per_study"]
    assert df["image_id"].is_unique
    for _, r in on_disk.iterrows():
        assert not Path(r["path"]).is_absolute() and (root / r["path"]).is_file()
        boxes = json.loads(r["boxes"])
        if r["label"] == 1:
            assert r["fracture_type"] in FRACTURE_TYPES_PHANTOM and boxes
        else:
            assert r["fracture_type"] == "" and boxes == []
        assert r["hardware"] == 0
        assert r["body_part"] in phantom.REGIONS
        assert r["view"] in ("frontal", "lateral")


def test_every_class_present(small_dataset: tuple[Path, pd.DataFrame]) -> None:
    _, df = small_dataset
    assert set(df["fracture_type"]) == {"", *FRACTURE_TYPES_PHANTOM}
    assert set(df["label"]) == {0, 1}


def test_views_of_a_study_share_ids_and_label(small_dataset: tuple[Path, pd.DataFrame]) -> None:
    _, df = small_dataset
    for _, g in df.groupby("study_id"):
        assert len(g) == SMALL["views_per_study"]
        assert g["patient_id"].nunique() == 1
        assert g["label"].nunique() == 1 and g["fracture_type"].nunique() == 1
        assert set(g["view"]) == {"frontal", "lateral"}
    # Pseudonyms, not row numbers of anything real.
    assert df["patient_id"].str.match(r"^PHP\d{5}$").all()


def test_boxes_inside_the_stored_image(small_dataset: tuple[Path, pd.DataFrame]) -> None:
    root, df = small_dataset
    for _, r in df[df["label"] == 1].iterrows():
        with Image.open(root / r["path"]) as im:
            w_img, h_img = im.size
        for x, y, w, h in json.loads(r["boxes"]):
            assert w > 0 and h > 0
            assert min(x, y) >= 0 and x + w <= w_img and y + h <= h_img


def test_bit_depths_dtype_and_range() -> None:
    img8, _ = render_phantom(np.random.default_rng(1), 96, None, "frontal", 8)
    assert img8.dtype == np.uint8 and img8.ndim == 2 and img8.shape[0] == 96
    assert int(img8.max()) - int(img8.min()) > 100
    img16, _ = render_phantom(np.random.default_rng(1), 96, None, "frontal", 16)
    assert img16.dtype == np.uint16
    assert img16.max() > 1000 and int(img16.max()) <= 65535
    with pytest.raises(PhantomError, match="bit_depth"):
        render_phantom(np.random.default_rng(1), 96, None, "frontal", 12)


def test_16_bit_files_are_written_as_16_bit_png(tmp_path: Path) -> None:
    df = generate_phantom_dataset(tmp_path, PhantomParams(**{**SMALL, "n_patients": 2, "bit_depths": [16]}))
    for p in df["path"]:
        with Image.open(tmp_path / p) as im:
            arr = np.asarray(im)
        assert arr.dtype == np.uint16 or im.mode.startswith("I")
        assert arr.max() > 255


@pytest.mark.parametrize("kind", FRACTURE_TYPES_PHANTOM)
def test_boxes_cover_every_pixel_the_fracture_changes(kind: str) -> None:
    """Fractured (fragments kept in place) minus intact twin: every changed pixel is in a box."""
    for seed in range(3):
        rng = np.random.default_rng(seed)
        _, broken = render_phantom_detail(rng, 128, kind, "frontal", 8, displace=False)
        _, intact = render_phantom_detail(np.random.default_rng(seed), 128, None, "frontal", 8)
        diff = np.abs(broken.image - intact.image)
        assert diff.max() > 0.1, f"{kind}: the fracture is not visible"
        inside = np.zeros(diff.shape, bool)
        for x, y, w, h in broken.boxes:
            inside[y:y + h, x:x + w] = True
        assert broken.boxes and intact.boxes == []
        assert diff[~inside].max() < 0.03, f"{kind} seed {seed}: change outside the box"
        # The box is about the fracture, not the whole bone.
        assert inside.mean() < 0.35


@pytest.mark.parametrize("kind", FRACTURE_TYPES_PHANTOM)
def test_displaced_fracture_sites_lie_in_their_boxes(kind: str) -> None:
    _, rend = render_phantom_detail(np.random.default_rng(11), 128, kind, "lateral", 16)
    assert rend.sites
    for sx, sy in rend.sites:
        assert any(x <= sx <= x + w and y <= sy <= y + h for x, y, w, h in rend.boxes)


def test_fracture_type_does_not_change_the_rest_of_the_image() -> None:
    """The random stream is consumed the same way with or without a fracture (twin images)."""
    a, _ = render_phantom(np.random.default_rng(5), 96, None, "lateral", 8)
    b, _ = render_phantom(np.random.default_rng(5), 96, "transverse", "lateral", 8)
    assert a.shape == b.shape
    assert 0 < (a != b).mean() < 0.5


def test_bad_requests_raise_clear_errors() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(PhantomError, match="fracture type"):
        render_phantom(rng, 64, "crushed", "frontal", 8)
    with pytest.raises(PhantomError, match="view"):
        render_phantom(rng, 64, None, "axial", 8)
    with pytest.raises(PhantomError, match="region"):
        render_phantom(rng, 64, None, "frontal", 8, region="skull")


def test_interrupted_run_leaves_no_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    generate_phantom_dataset(tmp_path, PhantomParams(**{**SMALL, "n_patients": 2}))
    assert (tmp_path / "manifest.csv").exists()
    calls = {"n": 0}
    real = phantom.render_view

    def flaky(*args: object, **kwargs: object) -> phantom.PhantomRender:
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(phantom, "render_view", flaky)
    with pytest.raises(KeyboardInterrupt):
        generate_phantom_dataset(tmp_path, PhantomParams(**{**SMALL, "n_patients": 3}))
    assert not (tmp_path / "manifest.csv").exists()
    assert not list((tmp_path / "images").glob("*.tmp"))


def test_contact_sheet(small_dataset: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    root, df = small_dataset
    out = make_contact_sheet(df, root, tmp_path / "sheet.png", n=8, tile=64, columns=4)
    with Image.open(out) as im:
        assert im.size[0] == 4 * 64 and im.mode == "RGB"
        arr = np.asarray(im)
    assert (arr[..., 0] > 200).any() and arr.std() > 10  # red boxes and real content
    with pytest.raises(ContactSheetError, match="empty"):
        make_contact_sheet(df.iloc[:0], root, tmp_path / "none.png")
    with pytest.raises(ContactSheetError, match="path"):
        make_contact_sheet(df.drop(columns=["path"]), root, tmp_path / "none.png")


# sha256 of SMALL's oblique study (PHS0000000, both views) as the generator wrote it before
# oblique_azimuth_deg existed: the default data set (and so dvc.lock's generate output) must not move.
_OBLIQUE_BEFORE = {
    "PHS0000000-fro.png": "e264d799a5ab31f3cfd063d1c1f402fa6349aa38e87c0ad1db386e6fee17245b",
    "PHS0000000-lat.png": "baa1307f6b33adfd86f67dfca04f94ddecf8e04e9010f7fb298607e08fd58ee8",
    "PHS0000100-lat.png": "90ac27395dfce029f571e7b05357104f04efca79bac6589fc307934172c278d6",
}


def test_oblique_azimuth_default_keeps_data_and_setting_moves_only_oblique_planes(
    small_dataset: tuple[Path, pd.DataFrame], tmp_path: Path,
) -> None:
    root, _ = small_dataset
    now = _hashes(root / "images")
    assert {k: now[k] for k in _OBLIQUE_BEFORE} == _OBLIQUE_BEFORE
    generate_phantom_dataset(tmp_path, PhantomParams(**{**SMALL, "oblique_azimuth_deg": (25, 65)}))
    moved = {k for k, h in _hashes(tmp_path / "images").items() if h != now[k]}
    assert moved == {"PHS0000000-fro.png", "PHS0000000-lat.png"}  # the oblique study, nothing else
    # The plane stays visibly oblique in both views: projected line >= 12 deg (transverse's range).
    for i in range(200):
        base = phantom.sample_fracture(np.random.default_rng(i), "oblique")
        fr = phantom.sample_fracture(np.random.default_rng(i), "oblique", (25, 65))
        assert fr == replace(base, azimuth=fr.azimuth) and 25 <= np.degrees(fr.azimuth) <= 65
        for view in ("frontal", "lateral"):
            beta = np.radians(phantom.VIEWS[view])
            assert np.degrees(np.arctan(abs(np.tan(fr.obliquity) * np.cos(beta - fr.azimuth)))) > 12
        other = phantom.sample_fracture(np.random.default_rng(i), "transverse", (25, 65))
        assert other == phantom.sample_fracture(np.random.default_rng(i), "transverse")
    with pytest.raises(ValueError, match="oblique_azimuth_deg"):
        PhantomParams(oblique_azimuth_deg=(65, 25))
