"""FracAtlas from ../shared: the release layout read right (fast, ~20 images) and all of it (slow).

Nothing here names a particular FracAtlas file: the small copy takes the first
images of each folder in sorted order, and the checks recompute what they expect
from the release's own dataset.csv and COCO file.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from tests._factories import displayed_box_to_stored_by_pil

from bonefrac.data.ingest import ingest
from bonefrac.data.sources import FRACATLAS_BODY_PARTS, FRACATLAS_VIEWS

FRACATLAS = Path(
    os.environ.get("BONEFRAC_FRACATLAS", Path(__file__).resolve().parents[3] / "shared/data/fracatlas")
)
if not (FRACATLAS / "dataset.csv").is_file():
    FRACATLAS = Path("/work/shared/data/fracatlas")
pytestmark = pytest.mark.skipif(not (FRACATLAS / "dataset.csv").is_file(), reason="FracAtlas not available")

COCO = "annotations/coco_fracture_masks.json"


def _coco(root: Path) -> dict:
    return json.loads((root / COCO).read_text())


def _orientation(path: Path) -> int | None:
    with Image.open(path) as f:
        return f.getexif().get(0x0112)


def _expected_boxes(root: Path, coco: dict) -> dict[str, list[list[float]]]:
    """COCO boxes scaled to the stored file size, recomputed independently of the adapter.

    A file whose EXIF orientation turns it by 90° and whose COCO size is the turned one was
    annotated as shown turned: its box is taken back to stored pixels by PIL's own transpose.
    """
    by_id = {im["id"]: im for im in coco["images"]}
    out: dict[str, list[list[float]]] = {}
    for ann in coco["annotations"]:
        im = by_id[ann["image_id"]]
        folder = (
            "Fractured" if (root / "images" / "Fractured" / im["file_name"]).exists() else "Non_fractured"
        )
        path = root / "images" / folder / im["file_name"]
        with Image.open(path) as f:
            w, h = f.size
        orientation = _orientation(path)
        turned = orientation in (5, 6, 7, 8) and (im["width"] > im["height"]) != (w > h)
        sx, sy = ((h, w) if turned else (w, h))[0] / im["width"], ((h, w) if turned else (w, h))[1] / im["height"]
        x, y, bw, bh = ann["bbox"]
        box = [x * sx, y * sy, bw * sx, bh * sy]
        if turned:
            box = displayed_box_to_stored_by_pil(box, (w, h), orientation)
        out.setdefault(Path(im["file_name"]).stem, []).append(box)
    return out


def _expected_outlines(root: Path, coco: dict) -> dict[str, list[list[float] | None]]:
    """Each annotation's polygon scaled to the stored file size; ``None`` for a file EXIF turned
    (checked against its box instead: PIL's transpose works on whole pixels, not points)."""
    by_id = {im["id"]: im for im in coco["images"]}
    out: dict[str, list[list[float] | None]] = {}
    for ann in coco["annotations"]:
        im = by_id[ann["image_id"]]
        path = next(p for p in (root / "images" / d / im["file_name"] for d in ("Fractured", "Non_fractured"))
                    if p.exists())  # fmt: skip
        with Image.open(path) as f:
            w, h = f.size
        (poly,) = ann["segmentation"]
        scaled = [v * (w / im["width"] if k % 2 == 0 else h / im["height"]) for k, v in enumerate(poly)]
        out.setdefault(Path(im["file_name"]).stem, []).append(None if _orientation(path) not in (None, 1) else scaled)
    return out


def _assert_outline(box: list, want_box: list[float], want_outline: list[float] | None, tol: float) -> None:
    """A manifest box carries its fracture's outline (fifth element): the COCO polygon in the box's
    pixels, inside the box."""
    assert len(box) == 5, "every FracAtlas annotation has a polygon"
    (outline,) = box[4]
    if want_outline is not None:
        assert outline == pytest.approx(want_outline, abs=0.01)
    xs, ys = outline[0::2], outline[1::2]
    x, y, bw, bh = want_box
    assert x - tol <= min(xs) and max(xs) <= x + bw + tol and y - tol <= min(ys) and max(ys) <= y + bh + tol


@pytest.fixture(scope="module")
def small_copy(tmp_path_factory) -> Path:
    """~20 images in the release layout (symlinks, filtered CSV and COCO) plus one listed-but-missing."""
    root = tmp_path_factory.mktemp("fracatlas_small")
    table = pd.read_csv(FRACATLAS / "dataset.csv", dtype=str)
    coco = _coco(FRACATLAS)
    annotated = {im["file_name"] for im in coco["images"]}
    picked: list[str] = []
    for folder, n in (("Fractured", 8), ("Non_fractured", 12)):
        (root / "images" / folder).mkdir(parents=True)
        names = sorted(p.name for p in (FRACATLAS / "images" / folder).iterdir())
        if folder == "Fractured":  # annotated images, and every annotated one EXIF turns
            names = [x for x in names if x in annotated]
            turned = [x for x in names[n:] if _orientation(FRACATLAS / "images" / folder / x) not in (None, 1)]
            names = names[:n] + turned
        for name in names[: n + len(turned) if folder == "Fractured" else n]:
            (root / "images" / folder / name).symlink_to(FRACATLAS / "images" / folder / name)
            picked.append(name)
    sub = table[table["image_id"].isin(picked)]
    ghost = sub[sub["fractured"] == "0"].iloc[[0]].copy()
    ghost["image_id"] = "ghost_listed_but_missing.jpg"
    pd.concat([sub, ghost]).to_csv(root / "dataset.csv", index=False)
    keep = [im for im in coco["images"] if im["file_name"] in picked]
    ids = {im["id"] for im in keep}
    (root / "annotations").mkdir()
    (root / COCO).write_text(
        json.dumps(
            {**coco, "images": keep, "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]}
        )
    )
    return root


def test_small_fracatlas_layout(small_copy, tmp_path, caplog):
    table_csv = pd.read_csv(small_copy / "dataset.csv", dtype=str).set_index("image_id")
    with caplog.at_level(logging.INFO):
        t = ingest("fracatlas", small_copy, tmp_path / "manifest.csv").set_index("image_id")
    n_fractured = len(list((small_copy / "images" / "Fractured").iterdir()))
    assert n_fractured >= 8
    assert len(t) == n_fractured + 12 + 1
    assert t["label"].sum() == n_fractured
    # folder is the label
    for _, row in t.drop(index="ghost_listed_but_missing").iterrows():
        assert ("/Fractured/" in row["path"]) == bool(row["label"])
    # the listed-but-missing file is kept and marked
    ghost = t.loc["ghost_listed_but_missing"]
    assert not ghost["decodes_ok"] and "file not found" in ghost["decode_error"]
    # body part and view from the one-hot columns, hardware copied
    for iid, row in t.drop(index="ghost_listed_but_missing").iterrows():
        src = table_csv.loc[f"{iid}.jpg"]
        parts = [p for p in FRACATLAS_BODY_PARTS if src[p] == "1"]
        assert row["body_part"] == (parts[0] if len(parts) == 1 else "mixed" if parts else "unknown")
        assert row["view"] == "+".join(v for v in FRACATLAS_VIEWS if src[v] == "1")
        assert row["hardware"] == int(src["hardware"])
        assert row["patient_id"] == "" and row["study_id"] == ""  # FracAtlas has none
    # boxes come from the COCO file, in stored pixels
    expected = _expected_boxes(small_copy, _coco(small_copy))
    outlines = _expected_outlines(small_copy, _coco(small_copy))
    assert expected, "the small copy must contain annotated images"
    for iid, row in t.iterrows():
        got = json.loads(row["boxes"])
        want = expected.get(iid, [])
        assert len(got) == len(want)
        tol = 1.0 if got and _orientation(Path(row["path"])) not in (None, 1) else 0.01  # PIL: whole pixels
        for g, w, o in zip(got, want, outlines.get(iid, []), strict=True):
            assert g[:4] == pytest.approx(w, abs=tol)
            _assert_outline(g, w, o, tol + 0.01)
            assert g[0] >= 0 and g[0] + g[2] <= row["width"] + 1 and g[1] + g[3] <= row["height"] + 1
    ok = t[t["decodes_ok"]]
    assert (ok["format"] == "jpeg").all() and (ok["bit_depth"] == 8).all()
    assert ok["sha256"].str.len().eq(64).all() and ok["phash"].str.len().eq(16).all()
    assert f"{len(t)} images" in caplog.text and "1 undecodable" in caplog.text


@pytest.mark.slow
def test_full_fracatlas_ingest(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="bonefrac.data.ingest"):
        t = ingest("fracatlas", FRACATLAS, tmp_path / "manifest.csv", workers=2)
    assert len(t) == 2860 and int(t["label"].sum()) == 508
    assert t["image_id"].is_unique
    coco = _coco(FRACATLAS)
    n_boxes = sum(len(json.loads(b)) for b in t["boxes"])
    assert n_boxes == sum(1 for a in coco["annotations"] if a.get("bbox"))
    with_boxes = set(t.loc[t["boxes"] != "[]", "image_id"])
    assert with_boxes == {
        Path(im["file_name"]).stem
        for im in coco["images"]
        if any(a["image_id"] == im["id"] for a in coco["annotations"])
    }
    expected = _expected_boxes(FRACATLAS, coco)  # where: scaled, and turned back where EXIF turned them
    outlines = _expected_outlines(FRACATLAS, coco)
    for iid, boxes in t.set_index("image_id")["boxes"].items():
        got = json.loads(boxes)
        assert len(got) == len(expected.get(iid, []))
        for g, w, o in zip(got, expected.get(iid, []), outlines.get(iid, []), strict=True):
            assert g[:4] == pytest.approx(w, abs=1.0), iid
            _assert_outline(g, w, o, 1.01)
    # every verdict of "truncated" is confirmed independently: no end marker after the last scan
    bad = t[~t["decodes_ok"]]
    for _, row in bad.iterrows():
        assert row["decode_error"]
        if "truncated JPEG" in row["decode_error"]:
            data = Path(row["path"]).read_bytes()
            assert data.find(b"\xff\xd9", data.rfind(b"\xff\xda")) < 0
    assert (t.loc[t["decodes_ok"], "width"] > 0).all()
    line = [r.getMessage() for r in caplog.records if r.name == "bonefrac.data.ingest"]
    assert len(line) == 1 and "2860 images" in line[0]
