"""Every source type on files the test makes; DICOM PHI never reaches table, copies or logs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from tests._factories import (
    contains_identifier,
    make_array,
    make_dicom,
    make_dicom_series,
    make_jpeg,
    make_nifti,
    make_png,
    phi_strings,
)

from bonefrac.config import resolve
from bonefrac.data.deid import pseudonymise
from bonefrac.data.ingest import ingest
from bonefrac.data.schema import INTAKE_ERROR, MANIFEST_COLUMNS, RECORD_COLUMNS
from bonefrac.data.sources import IntakeReport, SourceError, load_records, parse_label


def _by_name(df: pd.DataFrame, root: Path) -> dict[str, pd.Series]:
    """Rows by original file name: ids are pseudonyms of the path relative to the root."""
    names = {pseudonymise(p.relative_to(root).as_posix(), "image"): p.name for p in root.rglob("*")}
    return {names[i]: r for i, (_, r) in zip(df["image_id"], df.iterrows(), strict=True)}


# ------------------------------------------------------------------ phantom
def test_phantom_manifest_paths_resolved_against_manifest(tmp_path):
    root = tmp_path / "phantom"
    (root / "img").mkdir(parents=True)
    make_png(root / "img" / "a.png", bit_depth=16)
    make_png(root / "img" / "b.png")
    rows = [
        dict(
            image_id="a",
            path="img/a.png",
            label=1,
            fracture_type="spiral",
            body_part="forearm",
            view="frontal",
            patient_id="ph-p1",
            study_id="ph-s1",
            boxes="[[1, 2, 3, 4]]",
            hardware=0,
        ),
        dict(
            image_id="b",
            path="img/b.png",
            label=0,
            fracture_type="",
            body_part="forearm",
            view="lateral",
            patient_id="ph-p1",
            study_id="ph-s1",
            boxes="[]",
            hardware=0,
        ),
    ]
    pd.DataFrame(rows, columns=RECORD_COLUMNS).to_csv(root / "manifest.csv", index=False)
    df = load_records("phantom", root)
    assert list(df.columns) == [*RECORD_COLUMNS, INTAKE_ERROR]
    assert df["path"].tolist() == [str((root / "img" / n).resolve()) for n in ("a.png", "b.png")]
    assert df["patient_id"].tolist() == ["ph-p1", "ph-p1"]  # synthetic ids kept
    assert df["fracture_type"].tolist() == ["spiral", ""]
    assert json.loads(df["boxes"][0]) == [[1, 2, 3, 4]]
    assert load_records("phantom", root, use_fracture_types=False)["fracture_type"].tolist() == ["", ""]


# ------------------------------------------------------------------ imagefolder
@pytest.mark.parametrize("pos, neg", [("Fractured", "Non_fractured"), ("fracture", "normal"), ("1", "0")])
def test_imagefolder_class_names(tmp_path, pos, neg):
    make_png((tmp_path / pos).mkdir() or tmp_path / pos / "p1.png")
    make_jpeg(tmp_path / pos / "p2.jpg")
    make_png((tmp_path / neg).mkdir() or tmp_path / neg / "n1.png")
    (tmp_path / neg / "README.txt").write_text("not an image of the set")
    report = IntakeReport()
    df = load_records("imagefolder", tmp_path, deid_dir=tmp_path / ".deid", report=report)
    labels = {n: r["label"] for n, r in _by_name(df, tmp_path).items()}
    assert labels == {"p1.png": 1, "p2.jpg": 1, "n1.png": 0}
    assert df["image_id"].is_unique and df["image_id"].str.startswith("I-").all()
    # rows point at pseudonymous copies; the README is skipped, counted
    assert all(Path(p).parent == (tmp_path / ".deid" / "files").resolve() for p in df["path"])
    assert report.seen == 4 and report.skipped == {"not an image file (by suffix)": 1}


def test_imagefolder_fracture_type_subfolders(tmp_path):
    for t in ("spiral", "Transverse"):
        (tmp_path / "fractured" / t).mkdir(parents=True)
        make_png(tmp_path / "fractured" / t / f"{t}.png")
    (tmp_path / "fractured" / "loose.png").write_bytes(make_png(tmp_path / "x.png").read_bytes())
    (tmp_path / "x.png").unlink()
    (tmp_path / "normal").mkdir()
    make_png(tmp_path / "normal" / "n.png")
    (tmp_path / "fractured" / "DOE_JANE").mkdir()
    make_png(tmp_path / "fractured" / "DOE_JANE" / "scan.png")
    deid = tmp_path.parent / f"{tmp_path.name}-deid"
    rows = _by_name(load_records("imagefolder", tmp_path, deid_dir=deid), tmp_path)
    assert rows["spiral.png"]["fracture_type"] == "spiral"
    assert rows["Transverse.png"]["fracture_type"] == "transverse"
    assert rows["loose.png"]["fracture_type"] == ""
    assert rows["n.png"]["fracture_type"] == ""
    # a sub-folder outside the vocabulary: refused, its name nowhere in the row
    doe = rows["scan.png"]
    assert doe["fracture_type"] == "" and doe["path"] == ""
    assert doe[INTAKE_ERROR] == (
        "refused at intake: unknown sub-folder under fractured/ (not in data.fracture_types)"
    )
    assert "DOE" not in "".join(str(v) for r in rows.values() for v in r.values)
    declared = _by_name(load_records("imagefolder", tmp_path, deid_dir=deid, fracture_types=["spiral"]), tmp_path)
    assert declared["spiral.png"]["fracture_type"] == "spiral" and declared["Transverse.png"][INTAKE_ERROR]
    off = _by_name(load_records("imagefolder", tmp_path, deid_dir=deid, use_fracture_types=False), tmp_path)
    assert off["spiral.png"]["fracture_type"] == "" and not off["scan.png"][INTAKE_ERROR]


def test_imagefolder_without_class_folders_is_a_clear_error(tmp_path):
    (tmp_path / "DOE_JANE").mkdir()
    with pytest.raises(SourceError, match="no class folders") as err:
        load_records("imagefolder", tmp_path, deid_dir=tmp_path / ".deid")
    assert "DOE" not in str(err.value)
    with pytest.raises(SourceError, match="deid_dir"):
        load_records("imagefolder", tmp_path)
    with pytest.raises(SourceError, match="unknown data source"):
        load_records("s3", tmp_path)


# ------------------------------------------------------------------ csv
def test_csv_relative_paths_ids_pseudonymised_missing_kept(tmp_path):
    d = tmp_path / "site"
    (d / "imgs").mkdir(parents=True)
    make_png(d / "imgs" / "a.png")
    pd.DataFrame(
        {
            "path": ["imgs/a.png", "imgs/missing.png", str(d / "imgs" / "a.png")],
            "label": ["fracture", "0", "maybe"],
            "fracture_type": ["Oblique", "", ""],
            "body_part": ["Hand", "", "leg"],
            "patient_id": ["MRN-1", "MRN-1", "MRN-2"],
            "study_id": ["ACC-1", "ACC-2", ""],
        }
    ).to_csv(d / "labels.csv", index=False)
    df = load_records("csv", tmp_path, manifest_csv=d / "labels.csv", deid_dir=tmp_path / "deid")
    assert len(df) == 3  # the missing file is kept, not dropped
    assert df["path"][0] == str((tmp_path / "deid" / "files" / f"{df['image_id'][0]}.png").resolve())
    assert Path(df["path"][0]).stat().st_ino == (d / "imgs" / "a.png").stat().st_ino  # a hard link, not a copy
    assert df["path"][1] == "" and df[INTAKE_ERROR][1] == "refused at intake: listed file not found"
    assert df["image_id"][0] == pseudonymise("imgs/a.png", "image")
    assert df["label"].tolist() == [1, 0, -1]  # unreadable label kept as -1 for validation to stop on
    assert df["fracture_type"][0] == "oblique" and df["body_part"].tolist() == ["hand", "unknown", "leg"]
    assert df["patient_id"][0] == df["patient_id"][1] == pseudonymise("MRN-1", "patient")
    assert "MRN" not in "".join(df["patient_id"]) + "".join(df["study_id"])
    assert df["study_id"][2] == ""
    with pytest.raises(SourceError, match="lacks required column"):
        pd.DataFrame({"file": ["a.png"]}).to_csv(d / "bad.csv", index=False)
        load_records("csv", d / "bad.csv", deid_dir=tmp_path / "deid")


def test_csv_boxes_keep_their_outlines_and_broken_boxes_are_dropped(tmp_path):
    """A hospital's CSV may give boxes, each optionally with its outline (the README's `csv` row): they reach
    the records as written, where the model reads them; a cell that is not JSON becomes "no boxes"."""
    from bonefrac.model.boxes import parse_boxes, parse_outlines

    d = tmp_path / "site"
    (d / "imgs").mkdir(parents=True)
    make_png(d / "imgs" / "a.png")
    make_png(d / "imgs" / "b.png")
    cell = "[[10, 20, 30, 40, [[10, 20, 40, 20, 10, 60]]]]"
    pd.DataFrame({"path": ["imgs/a.png", "imgs/b.png"], "label": [1, 1], "boxes": [cell, "[[1, 2"]}).to_csv(
        d / "labels.csv", index=False
    )
    df = load_records("csv", tmp_path, manifest_csv=d / "labels.csv", deid_dir=tmp_path / "deid")
    assert parse_boxes(df["boxes"][0]) == [[10.0, 20.0, 30.0, 40.0]]
    assert parse_outlines(df["boxes"][0]) == [[[10.0, 20.0, 40.0, 20.0, 10.0, 60.0]]]
    assert df["boxes"][1] == "[]"


@pytest.mark.parametrize(
    "value, label", [(1, 1), ("0", 0), ("1.0", 1), ("True", 1), ("Non_fractured", 0), ("x", -1)]
)
def test_parse_label(value, label):
    assert parse_label(value) == label


# ------------------------------------------------------------------ DICOM (PHI)
def _dicom_tree(root: Path) -> None:
    (root / "Fractured").mkdir(parents=True)
    (root / "Normal").mkdir(parents=True)
    # file names carry identifiers too, as hospital exports often do
    make_dicom(root / "Fractured" / "DOE^JANE_1.dcm", BodyPartExamined="HAND", ViewPosition="PA")
    make_dicom(root / "Fractured" / "IM0002", photometric="MONOCHROME1", ViewPosition="LAT")
    make_dicom(
        root / "Normal" / "PHI-123456.dcm",
        BodyPartExamined="KNEE",
        rescale=(1.0, 0.0),
        window=(2000.0, 3000.0),
    )


def test_dicom_source_deidentified_everywhere(tmp_path, caplog, capsys):
    root, out = tmp_path / "raw", tmp_path / "interim"
    _dicom_tree(root)
    with caplog.at_level(logging.DEBUG):
        table = ingest("dicom", root, out / "manifest.csv", deid_dir=out / "deid")
    captured = capsys.readouterr()
    csv_text = (out / "manifest.csv").read_text()
    assert len(table) == 3 and table["decodes_ok"].all()
    assert sorted(table["label"]) == [0, 1, 1]
    deid_files = sorted((out / "deid").rglob("*.dcm"))
    assert len(deid_files) == 3
    for s in [*phi_strings(), "DOE", "123456"]:
        assert not contains_identifier(s, csv_text), f"{s!r} in manifest"
        logs = caplog.text + captured.out + captured.err
        assert not contains_identifier(s, logs), f"{s!r} in logs"
        for f in deid_files:
            assert not contains_identifier(s, str(f))
            assert not contains_identifier(s, f.read_bytes()), f"{s!r} in {f.name}"
    for f in deid_files:
        ds = pydicom.dcmread(f)
        assert ds.PatientIdentityRemoved == "YES"
        assert not [e for e in ds if e.tag.is_private]
    # table points at the copies, ids are the pseudonyms, header facts filled
    assert all(resolve(p).resolve().is_relative_to((out / "deid").resolve()) for p in table["path"])
    assert set(table["patient_id"]) == {pseudonymise("PHI-123456", "patient")}
    assert set(table["body_part"]) == {"hand", "leg"}  # KNEE mapped to the project vocabulary
    assert set(table["view"]) == {"frontal", "lateral"}
    assert table["image_id"].str.startswith("I-").all()
    assert set(table["format"]) == {"dicom"} and set(table["bit_depth"]) == {12}


def test_dicom_source_needs_deid_dir(tmp_path):
    _dicom_tree(tmp_path / "raw")
    with pytest.raises(SourceError, match="deid_dir"):
        load_records("dicom", tmp_path / "raw")
    with pytest.raises(SourceError, match="deid_dir"):  # DICOM inside another source too
        load_records("imagefolder", tmp_path / "raw")


# ------------------------------------------------------------------ volumes
def test_volume_source_series_and_nifti(tmp_path, caplog):
    root, deid = tmp_path / "raw", tmp_path / "deid"
    make_dicom_series(root / "fractured" / "comminuted" / "case1")
    make_dicom_series(root / "normal" / "case2", phi=True)
    make_nifti(root / "normal" / "case3.nii.gz")
    make_nifti(root / "fractured" / "case4.nii")
    with caplog.at_level(logging.DEBUG):
        df = load_records("volume", root, deid_dir=deid)
        table = ingest("volume", root, tmp_path / "m.csv", deid_dir=deid)
    assert len(df) == 4 and table["decodes_ok"].all()
    assert set(table["spatial_dims"]) == {3} and set(table["depth"]) == {6}
    assert sorted(table["format"]) == ["dicom_series", "dicom_series", "nifti", "nifti"]
    series = table[table["format"] == "dicom_series"]
    assert sorted(series["fracture_type"]) == ["", "comminuted"]
    for p in series["path"]:  # each series copy holds one consistently remapped series
        dss = [pydicom.dcmread(f) for f in resolve(p).glob("*.dcm")]
        assert len(dss) == 6
        assert len({d.SeriesInstanceUID for d in dss}) == 1 and len({d.StudyInstanceUID for d in dss}) == 1
    text = (tmp_path / "m.csv").read_text() + caplog.text
    for s in phi_strings():
        assert not contains_identifier(s, text), s


# ------------------------------------------------------------------ ingest
def test_ingest_writes_table_atomically_and_logs_one_summary(tmp_path, caplog):
    for part, name in (("fractured", "a"), ("normal", "b"), ("normal", "c")):
        (tmp_path / "raw" / part).mkdir(parents=True, exist_ok=True)
        make_png(tmp_path / "raw" / part / f"{name}.png", array=make_array((64, 64), 8, seed=ord(name)))
    pd.DataFrame(
        {
            "path": ["raw/fractured/a.png", "raw/normal/b.png", "raw/normal/c.png"],
            "label": [1, 0, 0],
            "body_part": ["hand", "leg", "hand"],
        }
    ).to_csv(tmp_path / "m.csv", index=False)
    out = tmp_path / "interim" / "manifest.csv"
    with caplog.at_level(logging.INFO, logger="bonefrac.data.ingest"):
        table = ingest("csv", tmp_path, out, manifest_csv=tmp_path / "m.csv", exclude_body_parts=["leg"])
    summary = [r for r in caplog.records if r.name == "bonefrac.data.ingest"]
    assert (
        len(summary) == 1
        and "2 images" in summary[0].getMessage()
        and "undecodable" in summary[0].getMessage()
    )
    assert list(pd.read_csv(out).columns) == MANIFEST_COLUMNS
    assert sorted(table["body_part"]) == ["hand", "hand"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp file left
    only_leg = ingest("csv", tmp_path, out, manifest_csv=tmp_path / "m.csv", include_body_parts=["LEG"])
    assert only_leg["body_part"].tolist() == ["leg"]
    assert np.isfinite(only_leg["intensity_mean"]).all()


# ------------------------------------------------------------------ hostile names and links
def test_non_utf8_names_links_and_loops_get_a_verdict_not_a_crash(tmp_path, capsys):
    import os

    root, out = tmp_path / "raw", tmp_path / "interim"
    (root / "Fractured").mkdir(parents=True)
    (root / "Normal").mkdir()
    src = make_dicom(tmp_path / "x.dcm", BodyPartExamined="HAND")
    fd = os.open(os.fsencode(root / "Fractured") + b"/DOE\xff_\xe9.dcm", os.O_WRONLY | os.O_CREAT)
    os.write(fd, src.read_bytes())
    os.close(fd)
    make_png(root / "Normal" / "n.png")
    (root / "Normal" / "loop").symlink_to("..")
    (root / "Normal" / "dangling.png").symlink_to(root / "nowhere.png")
    table = ingest("dicom", root, out / "manifest.csv", deid_dir=out / "deid")
    intake = table.attrs["intake"]
    assert len(table) == 2 and table["decodes_ok"].all()
    assert intake["seen"] == 4 and intake["skipped"] == {
        "broken or looping symlink": 1,
        "symlink loop (folder reached twice)": 1,
    }
    assert intake["notes"] == {"names not valid UTF-8 (pseudonymised)": 1}
    assert json.loads((out / "intake.json").read_text()) == intake
    text = (out / "manifest.csv").read_text()
    assert "DOE" not in text and "\\udcff" not in text
    assert "BONEFRAC_DEID_KEY is not set" in capsys.readouterr().err  # default key: warned every run


def test_volume_walker_skips_loops_and_links_out_of_the_root(tmp_path):
    root = tmp_path / "raw"
    make_dicom_series(root / "fractured" / "comminuted" / "case1")
    (root / "normal").mkdir()
    make_nifti(root / "normal" / "case2.nii.gz")
    (root / "normal" / "loop").symlink_to("..")
    make_nifti(tmp_path / "elsewhere.nii")
    (root / "normal" / "out.nii").symlink_to(tmp_path / "elsewhere.nii")
    report = IntakeReport()
    df = load_records("volume", root, deid_dir=tmp_path / "deid", report=report)
    assert len(df) == 2 and not df[INTAKE_ERROR].any()
    assert report.skipped == {"symlink loop (folder reached twice)": 1, "symlink pointing outside the data root": 1}
def test_ingest_stores_paths_relative_to_the_project_root(tmp_path, monkeypatch):
    """The manifest is a DVC output: the same bytes whichever folder the project sits in."""
    project = tmp_path / "project"
    (project / "data" / "raw" / "normal").mkdir(parents=True)
    (project / "params.yaml").write_text("{}\n")
    make_png(project / "data" / "raw" / "normal" / "a.png", array=make_array((64, 64), 8, seed=1))
    make_png(project / "data" / "raw" / "normal" / "b.png", array=make_array((64, 64), 8, seed=2))
    pd.DataFrame({"path": ["normal/a.png", "normal/b.png"], "label": [0, 1]}).to_csv(
        project / "data" / "raw" / "m.csv", index=False
    )
    monkeypatch.chdir(project / "data")  # the project root is found from params.yaml upwards
    out = project / "data" / "interim" / "manifest.csv"
    table = ingest(
        "csv", project / "data" / "raw", out, manifest_csv=project / "data" / "raw" / "m.csv",
        deid_dir=project / "data" / "interim" / "deid",
    )  # fmt: skip
    paths = pd.read_csv(out, keep_default_na=False)["path"].tolist()
    assert paths == table["path"].tolist() and len(paths) == 2
    assert all(not p.startswith("/") and p.startswith("data/interim/deid/") for p in paths)
    assert all((project / p).is_file() for p in paths) and table["decodes_ok"].all()
    assert str(tmp_path) not in out.read_text()


def test_body_parts_outside_the_declared_vocabulary_are_refused_without_their_value(tmp_path):
    d = tmp_path / "site"
    d.mkdir()
    for name in ("a", "b", "c", "d"):
        make_png(d / f"{name}.png", seed=ord(name))
    make_dicom(d / "skull.dcm", BodyPartExamined="SKULL")  # a CID 4031 term the project does not map
    pd.DataFrame(
        {
            "path": ["a.png", "b.png", "c.png", "d.png", "skull.dcm"],
            "label": [1, 0, 0, 1, 0],
            "body_part": ["Hand", "elbow of DOE^JANE", "", "KNEE", ""],
        }
    ).to_csv(d / "labels.csv", index=False)
    deid = tmp_path / "deid"
    rep = IntakeReport()
    df = load_records("csv", d, manifest_csv=d / "labels.csv", deid_dir=deid, report=rep)
    refusal = "refused at intake: body part not in data.body_parts"
    assert df["body_part"].tolist() == ["hand", "unknown", "unknown", "unknown", "unknown"]
    assert [e.startswith(refusal) for e in df[INTAKE_ERROR]] == [False, True, False, True, True]
    assert (df.loc[df[INTAKE_ERROR] != "", "path"] == "").all()  # refused: not read, no path
    assert "DOE" not in df.to_csv() and "skull" not in df.to_csv().lower() and "knee" not in df.to_csv().lower()
    assert sum(n for r, n in rep.refused.items() if r.startswith("body part")) == 3
    assert len(list((deid / "files").iterdir())) == 2 and not list(deid.rglob("*.dcm"))  # refused copies removed
    # a declared vocabulary accepts its own terms (DICOM terms arrive lower-cased)
    df = load_records(
        "csv", d, manifest_csv=d / "labels.csv", deid_dir=tmp_path / "deid2", body_parts=["hand", "knee", "skull"]
    )
    assert df["body_part"].tolist() == ["hand", "unknown", "unknown", "knee", "skull"]
    assert [bool(e) for e in df[INTAKE_ERROR]] == [False, True, False, False, False]

