"""A hospital's own export, hostile on purpose, through ingest + validate: no identifier anywhere.

The export has patient-named folders and files, names that are not UTF-8, a symlink loop,
broken and out-of-root links, text files, a burned-in-annotation DICOM, PHI in ~35 DICOM
attributes (nested sequences too) and a CSV whose paths leave the data root. Run A goes
through the ``bonefrac`` CLI under Prefect (its SQLite database is searched too), run B
through the flows' library functions. Then every file the project wrote, and everything it
printed, is searched for every made-up identifier; and every input must have one verdict.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from pydicom.dataset import Dataset
from tests._factories import FAKE_PHI, contains_identifier, make_dicom, make_png, phi_strings

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

# Identifiers in names and extra attributes (made up); FAKE_PHI's are added below.
NAME_PHI = ["DOE_JANE", "SMITH_JOHN", "ROE_RICHARD", "MRN-555000", "Mustermann", "Fictional General"]
EXTRA_ATTRS = {
    "OtherPatientNames": "DOE^JANET",
    "PatientMotherBirthName": "ROE^MARY",
    "MilitaryRank": "CAPTAIN-FAKE-1",
    "Occupation": "FAKE-OCCUP-2",
    "PatientTelephoneNumbers": "555-0100-FAKE",
    "AdditionalPatientHistory": "history of DOE^JANE falls",
    "MedicalAlerts": "ALERT-FAKE-3",
    "Allergies": "ALLERGY-FAKE-4",
    "RequestingPhysician": "WHO^JOHN",
    "NameOfPhysiciansReadingStudy": "READER^RITA",
    "InstitutionalDepartmentName": "Fictional General Radiology",
    "ProtocolName": "PROTO-FAKE-5",
    "SeriesDescription": "SERIES-FAKE-6",
    "PerformedProcedureStepDescription": "PPS-FAKE-7",
    "RequestedProcedureDescription": "RPD-FAKE-8",
    "PatientComments": "COMMENT-FAKE-9",
    "DeviceSerialNumber": "SERIAL-FAKE-10",
    "PhysiciansOfRecord": "RECORD^ROBIN",
    "AdmissionID": "ADM-FAKE-11",
}
NESTED = {  # values only found inside sequences
    "RequestedProcedureID": "REQ-FAKE-12",
    "ScheduledProcedureStepDescription": "SPS-FAKE-13",
    "OtherPatientID": "OPID-FAKE-14",
    "CodeMeaning": "code for PHI-123456",  # K attribute holding an identifier: swept
}


def _identifiers() -> list[str]:
    return sorted(
        {*phi_strings(), *NAME_PHI, *EXTRA_ATTRS.values(), *NESTED.values(), "JANE", "DOE^JANE",
         FAKE_PHI["StudyDate"] + FAKE_PHI["StudyTime"]}
        - {""}
    )


def _noise_png(path: Path, seed: int) -> Path:
    return make_png(path, array=np.random.default_rng(seed).integers(0, 255, (96, 96), dtype=np.uint8))


def _phi_dicom(path: Path, seed: int, **tags) -> Path:
    arr = np.random.default_rng(seed).integers(0, 4000, (64, 64), dtype=np.uint16)
    make_dicom(path, arr, **EXTRA_ATTRS, **tags)
    import pydicom

    ds = pydicom.dcmread(path)
    req = Dataset()
    req.RequestedProcedureID = NESTED["RequestedProcedureID"]
    req.ScheduledProcedureStepDescription = NESTED["ScheduledProcedureStepDescription"]
    inner = Dataset()
    inner.PatientID = NESTED["OtherPatientID"]
    req.OtherPatientIDsSequence = [inner]  # two levels deep
    ds.RequestAttributesSequence = [req]
    code = Dataset()
    code.CodeValue = "X1"
    code.CodingSchemeDesignator = "99FAKE"
    code.CodeMeaning = NESTED["CodeMeaning"]
    ds.AnatomicRegionSequence = [code]  # not in Table E.1-1 (K): only the sweep catches it
    ds.save_as(path, enforce_file_format=True)
    return path


def _bytes_name(folder: Path, name: bytes) -> bytes:
    return os.fsencode(folder) + b"/" + name


def _hostile_tree(raw: Path, outside: Path) -> None:
    fr, nf = raw / "Fractured", raw / "Non_fractured"
    (fr / "DOE_JANE").mkdir(parents=True)
    (fr / "spiral").mkdir()
    nf.mkdir()
    outside.mkdir()
    _noise_png(outside / "SMITH_JOHN_secret.png", 99)
    # clean positives: a typed sub-folder with an identifying file name, PHI DICOM, non-UTF-8 name
    _noise_png(fr / "spiral" / "SMITH_JOHN_19610415.png", 1)
    _phi_dicom(fr / "DOE^JANE_1.dcm", 2, BodyPartExamined="HAND", ViewPosition="PA")
    png = _noise_png(raw / "tmp.png", 3)
    fd = os.open(_bytes_name(fr, b"M\xfcller_Mustermann_\xff.png"), os.O_WRONLY | os.O_CREAT)
    os.write(fd, png.read_bytes())
    os.close(fd)
    png.unlink()
    # refused: a patient-named sub-folder of the positive class, a burned-in annotation
    _noise_png(fr / "DOE_JANE" / "scan_ROE_RICHARD.png", 4)
    _phi_dicom(fr / "PHI-123456_burned.dcm", 5, BurnedInAnnotation="YES")
    # negatives: identifying names, a non-UTF-8 folder, another PHI DICOM
    _noise_png(nf / "ROE_RICHARD_MRN-555000.png", 6)
    _phi_dicom(nf / "IM0002", 7, BodyPartExamined="KNEE")
    os.mkdir(_bytes_name(nf, b"\xe9l\xe8ve_Fictional General"))
    _noise_png(Path(os.fsdecode(_bytes_name(nf, b"\xe9l\xe8ve_Fictional General"))) / "a.png", 8)
    _noise_png(nf / "normal_1.png", 9)
    # skipped: text, hidden, a loop, a broken link, a link out of the root, a top-level stray
    (fr / "notes_DOE_JANE.txt").write_text("patient DOE^JANE, MRN-555000\n")
    (nf / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (fr / "loop").symlink_to("..")
    (nf / "self").symlink_to(".")
    (nf / "DOE_JANE_old.png").symlink_to(raw / "gone.png")
    (nf / "outside_link.png").symlink_to(outside / "SMITH_JOHN_secret.png")
    (raw / "README_for_DOE_JANE.txt").write_text("export of DOE^JANE\n")


def _params(path: Path, out: Path, **data) -> Path:
    doc = {
        "data": {"ingest_workers": 1, **data},
        "paths": {
            "interim": str(out / "interim"),
            "reports": str(out / "reports"),
            "metrics": str(out / "metrics"),
            "cache": str(out / "cache"),  # the ingest cache is searched with the rest
        },
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def _all_hits(folders: list[Path], texts: dict[str, str]) -> list[str]:
    needles = [(s, s.encode()) for s in _identifiers()]
    needles += [("M\\xfcller", b"M\xfcller"), ("\\xe9l\\xe8ve", b"\xe9l\xe8ve")]  # the non-UTF-8 names
    hits: list[str] = []
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(os.fsencode(folder)):
            for name in [*dirnames, *filenames]:
                for s, b in needles:
                    if contains_identifier(b, name):
                        hits.append(f"{s!r} in the name {os.fsdecode(os.path.join(dirpath, name))}")
            for name in filenames:
                p = os.path.join(dirpath, name)
                if os.path.islink(p):
                    continue
                data = Path(os.fsdecode(p)).read_bytes()
                for s, b in needles:
                    if contains_identifier(b, data) or contains_identifier(s.encode("utf-16-le"), data, b"[0-9]\x00"):
                        hits.append(f"{s!r} in {os.fsdecode(p)}")
    for where, text in texts.items():
        for s, _ in needles:
            if contains_identifier(s.encode(), text.encode("utf-8", "backslashreplace")):
                hits.append(f"{s!r} in {where}")
    return hits


def test_identifier_search_finds_whole_numbers_not_digits_inside_timestamps() -> None:
    chance = b"2026-12-01 12:51:38.2101112026-12-01"  # a chance match (CI, 2026-12-01)
    assert not contains_identifier(b"101112", chance)
    assert contains_identifier(b"101112", b'{"StudyTime": "101112"}') and contains_identifier(b"101112", b"t=101112\n")
    assert contains_identifier(b"DOE^JANE", b"xDOE^JANEx")  # names: anywhere
    wide = "time 101112".encode("utf-16-le")
    assert contains_identifier("101112".encode("utf-16-le"), wide, b"[0-9]\x00")
    assert not contains_identifier("101112".encode("utf-16-le"), "2101112".encode("utf-16-le"), b"[0-9]\x00")


def _check_counts(out: Path) -> tuple[dict, dict]:
    intake = json.loads((out / "interim" / "ingest" / "intake.json").read_text())
    summary = json.loads((out / "metrics" / "validation.json").read_text())
    manifest = pd.read_csv(out / "interim" / "ingest" / "manifest.csv", keep_default_na=False)
    assert intake["rows"] == len(manifest) == summary["rows"]
    assert intake["seen"] == summary["clean"] + summary["quarantined"] + intake["skipped_total"]
    return intake, summary


def test_hostile_export_leaves_no_identifier_and_every_input_has_a_verdict(tmp_path: Path) -> None:
    raw, outside = tmp_path / "raw", tmp_path / "outside"
    _hostile_tree(raw, outside)
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}",
        "PREFECT_HOME": str(tmp_path / ".prefect"),
        "PREFECT_LOGGING_LEVEL": "INFO",  # so the run's log lines reach Prefect's database too
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "DO_NOT_TRACK": "1",
        "GX_ANALYTICS_ENABLED": "false",
    }
    env.pop("BONEFRAC_DEID_KEY", None)
    out_a = tmp_path / "out_a"
    params_a = _params(tmp_path / "a.yaml", out_a, source="dicom", root=str(raw))
    texts: dict[str, str] = {}
    for stage in ("ingest", "validate"):
        run = subprocess.run(
            [str(BIN / "bonefrac"), stage, "--params", str(params_a)],
            cwd=ROOT, env=env, capture_output=True, timeout=600,
        )
        stdout = run.stdout.decode("utf-8", "backslashreplace")
        stderr = run.stderr.decode("utf-8", "backslashreplace")
        texts[f"{stage} stdout"], texts[f"{stage} stderr"] = stdout, stderr
        assert run.returncode == 0, stderr[-3000:]
        assert "Traceback" not in stderr
        lines = [ln for ln in stdout.splitlines() if ln.startswith(stage)]
        assert len(lines) == 1, stdout  # one summary line per stage on the console
    assert "BONEFRAC_DEID_KEY is not set" in texts["ingest stderr"]

    intake, summary = _check_counts(out_a)
    assert intake["skipped"] == {
        "broken or looping symlink": 1,
        "hidden file or folder": 1,
        "not an image file (by suffix)": 1,
        "outside the class folders (top-level entry naming no class)": 1,
        "symlink loop (folder reached twice)": 2,
        "symlink pointing outside the data root": 1,
    }
    assert intake["refused"] == {
        "unknown sub-folder under Fractured/ (not in data.fracture_types)": 1,
        "BurnedInAnnotation is YES (text burned into the pixels may identify the patient; "
        "set data.allow_burned_in_annotation: true to accept)": 1,
    }
    assert intake["notes"] == {"names not valid UTF-8 (pseudonymised)": 2}
    assert summary["clean"] == 7 and summary["quarantined"] == 2
    quarantine = pd.read_csv(out_a / "interim" / "validated" / "quarantine.csv", keep_default_na=False)
    assert all(r.startswith("refused at intake: ") for r in quarantine["reason"])
    clean = pd.read_csv(out_a / "interim" / "validated" / "clean.csv", keep_default_na=False)
    assert clean["image_id"].str.match(r"^I-[0-9a-f]{16}$").all()

    # Run B: a CSV whose paths leave the data root; through the flows' library functions.
    from flows.ingest import _ingest
    from flows.validate import _validate

    site = tmp_path / "site"
    (site / "imgs").mkdir(parents=True)
    for i, name in enumerate(["DOE_JANE_a.png", "SMITH_JOHN_b.png", "ROE_RICHARD_c.png", "n_d.png"]):
        _noise_png(site / "imgs" / name, 20 + i)
    pd.DataFrame(
        {
            "path": [
                "imgs/DOE_JANE_a.png", "imgs/SMITH_JOHN_b.png", "imgs/ROE_RICHARD_c.png", "imgs/n_d.png",
                "../../../../../../../../etc/passwd", str(outside / "SMITH_JOHN_secret.png"), "imgs/gone_DOE_JANE.png",
            ],
            "label": [1, 1, 0, 0, 1, 0, 0],
            "fracture_type": ["spiral", "DOE_JANE", "", "", "", "", ""],
            "view": ["frontal", "DOE_JANE", "", "", "", "", ""],
            "patient_id": [FAKE_PHI["PatientID"], "MRN-555000", "MRN-555000", "x", "y", "z", "w"],
            "study_id": [FAKE_PHI["AccessionNumber"], "", "", "", "", "", ""],
        }
    ).to_csv(site / "labels.csv", index=False)
    out_b = tmp_path / "out_b"
    params_b = _params(tmp_path / "b.yaml", out_b, source="csv", root=str(site), manifest_csv=str(site / "labels.csv"))
    texts["run B ingest"] = _ingest(str(params_b))
    texts["run B validate"] = _validate(str(params_b))
    intake_b, summary_b = _check_counts(out_b)
    assert intake_b["seen"] == 7 and intake_b["skipped_total"] == 0
    assert intake_b["refused"] == {
        "path outside the data root (not read)": 2,
        "fracture_type column value not in data.fracture_types": 1,
        "listed file not found": 1,
    }
    assert summary_b["clean"] == 3 and summary_b["quarantined"] == 4
    assert "root:x:0:0" not in (out_b / "interim" / "ingest" / "manifest.csv").read_text()

    assert any((out_a / "cache").rglob("*.json"))  # the ingest cache was written (and is searched)
    hits = _all_hits([out_a, out_b, tmp_path / ".prefect"], texts)
    assert not hits, "\n".join(hits[:30])
    # the search does find identifiers where they are, and Prefect's database holds the runs' logs
    assert len(_all_hits([raw, site], {})) > 20
    prefect_files = [p for p in (tmp_path / ".prefect").rglob("*") if p.is_file()]
    assert any(p.name.endswith(".db") for p in prefect_files)
    assert any(b"ingest dicom:" in p.read_bytes() for p in prefect_files)  # .db or its -wal
