"""Slow data check: validation finds FracAtlas's real flaws by itself, then the clean part splits safely.

Nothing here names a file: the assertions are about kinds of flaws (files that
do not decode, byte-identical copies, copies of one picture with different
labels) and about normal variation (sizes, 8-bit JPEG, gray vs RGB) not being
flagged.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from bonefrac.config import ValidationParams
from bonefrac.preprocess.splits import assign_splits, split_report

FRACATLAS = Path(__file__).resolve().parents[3] / "shared" / "data" / "fracatlas"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (FRACATLAS / "dataset.csv").exists(), reason="FracAtlas not present"),
]


@pytest.fixture(scope="module")
def validated(tmp_path_factory):
    from bonefrac.data.ingest import ingest
    from bonefrac.validation.run import read_manifest, validate_manifest

    root = tmp_path_factory.mktemp("fracatlas")
    ingest("fracatlas", FRACATLAS, root / "manifest.csv", workers=2)
    manifest = read_manifest(root / "manifest.csv")
    t0 = time.perf_counter()
    res = validate_manifest(manifest, ValidationParams(), root, root / "docs", root / "validation.json")
    return manifest, res, time.perf_counter() - t0


def test_finds_the_real_flaws(validated) -> None:
    manifest, res, seconds = validated
    s = res.summary
    assert s["rows"] == len(manifest) == 2860
    assert seconds < 120
    # files that do not decode completely
    assert s["unreadable_failures"] >= 1
    q = res.quarantine
    unreadable = q[q["check"].str.contains("unreadable")]
    assert (unreadable["decode_error"].astype(str).str.len() > 0).all()
    # byte-identical copies, and copies of one picture filed under both labels
    assert s["exact_duplicate_groups"] >= 1 and s["exact_duplicates_failures"] >= 1
    assert s["near_duplicate_conflict_groups"] >= 1
    conflict = q[q["check"].str.contains("near_duplicate_label_conflict")]
    assert len(conflict) >= 2 and set(conflict["label"].astype(int)) == {0, 1}
    # normal variation is not flagged
    for check in ("size_range", "bit_depth", "intensity_range", "body_part_values", "label_values"):
        assert s[f"{check}_failures"] == 0, check
    assert s["success_critical"] is True
    assert len(q) < 0.05 * len(manifest)
    assert set(res.clean["image_id"]) | set(q["image_id"]) == set(manifest["image_id"])


def test_clean_part_splits_without_leaks(validated) -> None:
    _, res, _ = validated
    out = assign_splits(res.clean, val_fraction=0.15, test_fraction=0.2, seed=42)
    rep = split_report(out)
    assert rep["groups_crossing_splits"] == 0
    for s in ("train", "val", "test"):
        assert rep["splits"][s]["positives"] > 0 and rep["splits"][s]["negatives"] > 0
