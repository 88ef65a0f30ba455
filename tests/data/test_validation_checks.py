"""Data checks: each validation check's verdict on constructed manifests, via the real GX run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _validation_helpers import flip_bits, make_manifest

from bonefrac.config import ValidationParams, ValidationSeverities
from bonefrac.validation.run import CriticalValidationError, read_manifest, validate_manifest

# row -> the check it must fail (every other row is clean)
EXPECTED = {
    1: "unreadable",
    5: "exact_duplicates",  # copy of row 4 (same label): 4 kept
    6: "exact_duplicates",
    7: "exact_duplicates",  # copies with different labels: both out
    9: "near_duplicate_label_conflict",
    10: "near_duplicate_label_conflict",
    11: "fracture_type_values",
    13: "fracture_type_values",
    14: "fracture_type_values",
    16: "body_part_values",
    17: "size_range",
    19: "size_range",
    20: "bit_depth",
    22: "intensity_range",
    23: "intensity_range",
}


def flawed_manifest() -> pd.DataFrame:
    df = make_manifest(40)
    df.loc[1, ["decodes_ok", "decode_error", "width", "height", "phash"]] = [
        False,
        "truncated JPEG",
        0,
        0,
        "",
    ]
    df.loc[1, ["intensity_mean", "intensity_std", "intensity_p01", "intensity_p99"]] = float("nan")
    df.loc[5, "sha256"] = df.loc[4, "sha256"]
    df.loc[7, "sha256"] = df.loc[6, "sha256"]
    df.loc[10, "phash"] = flip_bits(df.loc[9, "phash"], 2)
    df.loc[10, ["intensity_mean", "intensity_std"]] = df.loc[
        9, ["intensity_mean", "intensity_std"]
    ].to_numpy()
    df.loc[11, "fracture_type"] = "banana"
    df.loc[13, "fracture_type"] = "oblique"  # on a label-0 image
    df.loc[14, "boxes"] = "[[1, 1, 5, 5]]"  # on a label-0 image
    df.loc[16, "body_part"] = "elbow_of_nowhere"
    df.loc[17, "width"] = 20
    df.loc[19, "height"] = 10_000
    df.loc[20, "bit_depth"] = 10
    df.loc[22, ["intensity_std", "intensity_p01", "intensity_p99"]] = [0.0, 0.5, 0.5]
    df.loc[23, ["intensity_p01", "intensity_p99"]] = [0.9, 0.8]
    assert df.loc[[4, 5], "label"].nunique() == 1 and df.loc[[6, 7], "label"].nunique() == 2
    assert df.loc[[9, 10], "label"].nunique() == 2 and df.loc[[13, 14], "label"].eq(0).all()
    return df


@pytest.fixture(scope="module")
def flawed_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("val")
    df = flawed_manifest()
    # through a CSV round trip, as the pipeline stage sees it
    df.to_csv(root / "manifest.csv", index=False)
    res = validate_manifest(
        read_manifest(root / "manifest.csv"),
        ValidationParams(),
        root / "interim",
        root / "docs",
        root / "metrics" / "validation.json",
    )
    return df, res, root


def test_each_flaw_is_quarantined_by_its_check(flawed_run) -> None:
    df, res, _ = flawed_run
    q = res.quarantine.set_index("image_id")
    expected_ids = {df.loc[r, "image_id"]: c for r, c in EXPECTED.items()}
    assert set(q.index) == set(expected_ids)
    for image_id, check in expected_ids.items():
        assert check in q.loc[image_id, "check"].split("; "), (image_id, q.loc[image_id, "check"])
        assert q.loc[image_id, "reason"]
    assert "truncated JPEG" in q.loc["img0001.png", "reason"]
    assert "img0004.png" in q.loc["img0005.png", "reason"]
    assert "img0010.png" in q.loc["img0009.png", "reason"]
    # the unreadable file is reported once, not again by the pixel checks
    assert q.loc["img0001.png", "check"] == "unreadable"


def test_nothing_lost_and_nothing_doubled(flawed_run) -> None:
    df, res, root = flawed_run
    clean_ids, q_ids = set(res.clean["image_id"]), set(res.quarantine["image_id"])
    assert clean_ids | q_ids == set(df["image_id"])
    assert not clean_ids & q_ids
    assert len(res.clean) + len(res.quarantine) == len(df)
    assert "img0004.png" in clean_ids  # first of the same-label duplicates is kept
    on_disk_clean = pd.read_csv(root / "interim" / "clean.csv")
    on_disk_q = pd.read_csv(root / "interim" / "quarantine.csv")
    assert set(on_disk_clean["image_id"]) == clean_ids
    assert set(on_disk_q["image_id"]) == q_ids
    assert {"check", "reason"} <= set(on_disk_q.columns)
    assert list(on_disk_clean.columns) == list(df.columns)


def test_summary_json(flawed_run) -> None:
    _, res, root = flawed_run
    summary = json.loads((root / "metrics" / "validation.json").read_text())
    assert summary == json.loads(json.dumps(res.summary))
    assert summary["rows"] == 40
    assert summary["quarantined"] == len(set(EXPECTED)) and summary["clean"] == 40 - len(set(EXPECTED))
    counts = pd.Series(EXPECTED).value_counts()
    for check, n in counts.items():
        assert summary[f"{check}_failures"] == n, check
        assert summary[f"{check}_success"] is False
    assert summary["label_values_success"] is True and summary["label_values_failures"] == 0
    assert summary["class_balance_success"] is True
    assert summary["success"] is False and summary["success_critical"] is True
    assert summary["exact_duplicate_groups"] == 2
    for v in summary.values():  # flat and numeric, for `dvc metrics show`
        assert isinstance(v, bool | int | float)


def test_data_docs_written(flawed_run) -> None:
    _, _, root = flawed_run
    index = root / "docs" / "index.html"
    assert index.exists()
    pages = [p for p in (root / "docs").rglob("*.html") if p != index]
    assert pages, "no validation result page"
    html = "\n".join(p.read_text(errors="replace") for p in pages)
    assert "bonefrac_manifest" in index.read_text(errors="replace")
    for needle in (
        "decodes_ok",
        "dq_near_duplicate_label_conflict",
        "intensity_std",
        "body_part",
        "bit_depth",
    ):
        assert needle in html, needle


def test_critical_failures_stop_the_run_and_name_files(tmp_path: Path) -> None:
    df = make_manifest(40).drop(columns=["bit_depth"])
    df["label"] = 0
    bad_rows = list(range(3, 18))
    df.loc[bad_rows, "label"] = 2
    with pytest.raises(CriticalValidationError) as err:
        validate_manifest(df, ValidationParams(), tmp_path / "out", tmp_path / "docs", tmp_path / "v.json")
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    assert "label_values" in msg and "15 file(s)" in msg and "... and 5 more" in msg
    assert "/data/raw/img0003.png" in msg and "/data/raw/img0017.png" not in msg  # first 10 named
    assert "required_columns" in msg and "bit_depth" in msg
    assert "class_balance" in msg
    assert not (tmp_path / "out" / "clean.csv").exists()
    summary = json.loads((tmp_path / "v.json").read_text())
    assert summary["success"] is False and summary["success_critical"] is False
    assert (tmp_path / "docs" / "index.html").exists()


def test_warn_and_off_severities(tmp_path: Path) -> None:
    df = make_manifest(30)
    df.loc[2, ["decodes_ok", "decode_error"]] = [False, "zero bytes"]
    df.loc[3, "width"] = 5
    df[["label", "fracture_type", "boxes"]] = [0, "", "[]"]
    df.loc[0, "label"] = 1  # 1/30 positive: below a 0.1 bound
    sev = ValidationSeverities(unreadable="warn", size_range="off", class_balance="quarantine")
    params = ValidationParams(severities=sev, min_positive_fraction=0.1)
    res = validate_manifest(df, params, tmp_path / "out", tmp_path / "docs", tmp_path / "v.json")
    assert len(res.quarantine) == 0 and len(res.clean) == 30
    assert res.summary["unreadable_failures"] == 1 and res.summary["unreadable_success"] is False
    assert "size_range_failures" not in res.summary
    assert res.summary["class_balance_success"] is False  # reported, does not stop the run
    assert res.summary["success_critical"] is True


def test_class_balance_judges_what_will_train_and_a_stop_removes_stale_outputs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    ok = validate_manifest(make_manifest(30), ValidationParams(), out, tmp_path / "docs", tmp_path / "v.json")
    assert (out / "clean.csv").exists() and ok.summary["training_rows"] == 30
    # Every positive is unreadable: the manifest's positive fraction looks fine (1/3), but
    # after quarantine no fracture is left to train on.
    df = make_manifest(30)
    pos = df["label"] == 1
    df.loc[pos, ["decodes_ok", "decode_error", "phash"]] = [False, "truncated", ""]
    with pytest.raises(CriticalValidationError) as err:
        validate_manifest(df, ValidationParams(), out, tmp_path / "docs", tmp_path / "v.json")
    assert "class_balance" in str(err.value) and "will train" in str(err.value)
    assert not (out / "clean.csv").exists() and not (out / "quarantine.csv").exists()  # last run's gone
    summary = json.loads((tmp_path / "v.json").read_text())
    assert summary["training_rows"] == 20 and summary["success_critical"] is False


def test_validation_body_part_values_default_to_the_project_vocabulary():
    from bonefrac.config import ValidationParams
    from bonefrac.data.schema import KNOWN_BODY_PARTS
    from bonefrac.validation.checks import allowed_body_parts

    assert allowed_body_parts(ValidationParams()) == [*KNOWN_BODY_PARTS, "unknown"]
    assert allowed_body_parts(ValidationParams(allowed_body_parts=["hand"])) == ["hand"]


def test_validation_accepts_the_vocabularies_declared_for_intake(tmp_path: Path) -> None:
    """A hospital's own fracture types and body parts (data.*) are what validation checks against.

    Intake refuses values outside data.fracture_types / data.body_parts; validation must then
    judge against the same lists, not the project's built-in ones (which would quarantine
    every image of a declared "salter_harris_2" type), and keep refusing values outside them.
    """
    from bonefrac.config import Params
    from bonefrac.validation.checks import settings_for

    df = make_manifest(30, body_parts=("hand", "elbow"))
    pos = df.index[df["label"] == 1]
    df.loc[pos, "fracture_type"] = "salter_harris_2"
    df.loc[pos[0], "fracture_type"] = "oblique"  # built-in, but not declared by this hospital
    df.loc[0, "body_part"] = "unknown"  # intake's word for "not given"
    p = Params.model_validate(
        {"data": {"source": "dicom", "fracture_types": ["Salter_Harris_2"], "body_parts": ["hand", "elbow"]}}
    )
    res = validate_manifest(df, settings_for(p), tmp_path / "out", tmp_path / "docs", tmp_path / "v.json")
    assert res.summary["fracture_type_values_failures"] == 1
    assert list(res.quarantine["check"]) == ["fracture_type_values"]
    assert res.summary["body_part_values_failures"] == 0
    # the project's defaults still quarantine the undeclared "salter_harris_2" (so the test can fail)
    builtin = validate_manifest(df, Params().validation, tmp_path / "o2", tmp_path / "d2", tmp_path / "v2.json")
    assert builtin.summary["fracture_type_values_failures"] == len(pos) - 1
    assert builtin.summary["body_part_values_failures"] > 0  # "elbow" is not a built-in body part
    narrowed = settings_for(Params.model_validate({"data": {"body_parts": ["hand"]}}))
    assert narrowed.allowed_body_parts == ["hand", "unknown"]
