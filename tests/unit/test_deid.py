"""De-identification (DICOM PS3.15 basic profile): identifiers gone, pseudonyms stable, UIDs consistent."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from tests._factories import FAKE_PHI, make_dicom, make_dicom_series, phi_strings

from bonefrac.data.deid import (
    DEV_KEY,
    KEY_ENV,
    deidentify_dataset,
    deidentify_file,
    pseudonymise,
    remap_uid,
)
from bonefrac.data.imageio import read_image


def _all_text(ds: pydicom.Dataset) -> str:
    """Every element value of a dataset and its file meta, sequences included, as one string."""
    parts: list[str] = []

    def cb(_ds, elem):
        if elem.VR not in ("OB", "OW", "SQ"):
            parts.append(str(elem.value))

    ds.walk(cb)
    ds.file_meta.walk(cb)
    return "\n".join(parts)


def test_pseudonymise_stable_keyed_and_namespaced(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    a = pseudonymise("PHI-123456", "patient")
    assert a == pseudonymise("PHI-123456", "patient") and a.startswith("P-")
    assert "123456" not in a
    assert pseudonymise("PHI-123456", "study") != a  # kinds are separate name spaces
    assert pseudonymise("PHI-654321", "patient") != a
    assert pseudonymise("", "patient") == ""
    monkeypatch.setenv(KEY_ENV, "another-secret")
    assert pseudonymise("PHI-123456", "patient") != a  # the key matters
    assert DEV_KEY  # documented default exists


def test_remap_uid_valid_and_consistent():
    u = remap_uid("1.2.826.0.1.3680043.8.498.12345")
    assert u == remap_uid("1.2.826.0.1.3680043.8.498.12345")
    assert u.startswith("2.25.") and len(u) <= 64 and u.replace(".", "").isdigit()


def test_deidentify_file_removes_every_identifier(tmp_path):
    src = make_dicom(tmp_path / "src.dcm")
    orig = pydicom.dcmread(src)
    orig_uids = [orig.StudyInstanceUID, orig.SeriesInstanceUID, orig.SOPInstanceUID, orig.FrameOfReferenceUID]
    ids = deidentify_file(src, tmp_path / "out" / "x.dcm")
    out = pydicom.dcmread(tmp_path / "out" / "x.dcm")
    text = _all_text(out)
    raw = (tmp_path / "out" / "x.dcm").read_bytes()
    for s in phi_strings() + orig_uids:
        assert s not in text, s
        assert s.encode() not in raw, s
    assert out.PatientIdentityRemoved == "YES"
    assert "PS3.15" in out.DeidentificationMethod
    assert out.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert out.PatientID == ids["patient_id"] == pseudonymise(FAKE_PHI["PatientID"], "patient")
    assert ids["study_id"] == pseudonymise(orig.StudyInstanceUID, "study")
    assert not [e for e in out if e.tag.is_private]
    assert out.StudyInstanceUID == remap_uid(orig.StudyInstanceUID)
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert out.SOPClassUID == orig.SOPClassUID  # standard class UIDs identify no one: kept
    # pixels untouched
    np.testing.assert_array_equal(read_image(tmp_path / "out" / "x.dcm").array, read_image(src).array)
    # original untouched
    assert pydicom.dcmread(src).PatientName == FAKE_PHI["PatientName"]


def test_identifier_typed_into_free_text_is_swept():
    ds = pydicom.Dataset()
    ds.PatientName = "DOE^JANE"
    ds.PatientID = "PHI-123456"
    ds.Manufacturer = "scanner of PHI-123456"  # not in the profile's table, but carries the id
    ds.BodyPartExamined = "HAND"
    deidentify_dataset(ds)
    assert ds.Manufacturer == ""
    assert ds.BodyPartExamined == "HAND"


def test_series_uids_remapped_consistently(tmp_path):
    folder = make_dicom_series(tmp_path / "series")
    out_dir = tmp_path / "deid"
    results = [deidentify_file(f, out_dir / f.name) for f in sorted(folder.iterdir())]
    outs = [pydicom.dcmread(out_dir / f.name) for f in sorted(folder.iterdir())]
    assert len({o.StudyInstanceUID for o in outs}) == 1
    assert len({o.SeriesInstanceUID for o in outs}) == 1
    assert len({o.FrameOfReferenceUID for o in outs}) == 1
    assert len({o.SOPInstanceUID for o in outs}) == len(outs)  # instances stay distinct
    assert len({r["study_id"] for r in results}) == 1 and len({r["patient_id"] for r in results}) == 1
    # the de-identified series still reads as one sorted volume
    assert read_image(out_dir).array.shape == read_image(folder).array.shape


def test_not_dicom_raises_clear_error(tmp_path):
    from bonefrac.data.dicom import DicomError

    (tmp_path / "x.dcm").write_text("not dicom")
    with pytest.raises(DicomError, match="not a DICOM"):
        deidentify_file(tmp_path / "x.dcm", tmp_path / "y.dcm")
    assert not (tmp_path / "y.dcm").exists()
