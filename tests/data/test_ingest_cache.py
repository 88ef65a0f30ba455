"""Incremental ingest: the per-file cache rereads only changed files and changes nothing in the outputs.

Decodes and de-identifications are counted (the decoder and the de-identifier are
wrapped), not timed: a warm run decodes nothing, one changed PNG decodes one image, one
changed DICOM de-identifies and decodes one file, and every manifest, ``intake.json`` and
de-identified copy is byte-identical to a run without the cache.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from tests._factories import FAKE_PHI, contains_identifier, make_dicom, make_png

from bonefrac.data import metadata, sources
from bonefrac.data.ingest import ingest

PATIENT_FOLDER = "DOE_JANE_1961"  # a folder named after a (made-up) patient


@pytest.fixture
def counters(monkeypatch) -> dict[str, int]:
    counts = {"decode": 0, "deid": 0}
    real_read, real_deid = metadata.read_image, sources.deidentify_file

    def read_image(*a, **kw):
        counts["decode"] += 1
        return real_read(*a, **kw)

    def deidentify_file(*a, **kw):
        counts["deid"] += 1
        return real_deid(*a, **kw)

    monkeypatch.setattr(metadata, "read_image", read_image)
    monkeypatch.setattr(sources, "deidentify_file", deidentify_file)
    return counts


def _export(root: Path) -> Path:
    for label, name in (("Fractured", "spiral"), ("Non_fractured", PATIENT_FOLDER)):
        d = root / label / name
        d.mkdir(parents=True)
        for i in range(3):
            make_dicom(d / f"IMG{i}.dcm", SOPInstanceUID=f"1.2.826.0.1.{label[0] == 'F':d}.{i}")
            make_png(d / f"{FAKE_PHI['PatientName']}_{i}.png", seed=10 * i + len(label))
    return root


def _run(root: Path, out: Path, cache: Path | None, counters: dict[str, int]) -> dict[str, object]:
    """One ingest into ``out``, emptied first as DVC does before it reruns a stage (paths then match)."""
    shutil.rmtree(out, ignore_errors=True)
    counters.update(decode=0, deid=0)
    table = ingest("dicom", root, out / "manifest.csv", workers=1, cache_dir=cache)
    files = {
        p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
    }
    return {"files": files, "decode": counters["decode"], "deid": counters["deid"], "table": table}


def test_warm_run_decodes_nothing_and_one_changed_file_is_reread(tmp_path, counters):
    root = _export(tmp_path / "export")
    cache, out = tmp_path / "cache", tmp_path / "data" / "interim" / "ingest"
    n = 12
    cold = _run(root, out, cache, counters)
    assert (cold["decode"], cold["deid"]) == (n, 6)
    plain = _run(root, out, None, counters)  # no cache at all
    assert cold["files"] == plain["files"]

    warm = _run(root, out, cache, counters)
    assert (warm["decode"], warm["deid"]) == (0, 0)
    assert warm["files"] == cold["files"]  # manifest, intake.json, every de-identified copy
    assert "cache: deid 6 cached + 0 new; meta 12 cached + 0 new" in warm["table"].attrs["summary"]

    # one PNG changes: one decode, no de-identification; the same table as a run without cache
    make_png(root / "Fractured" / "spiral" / f"{FAKE_PHI['PatientName']}_1.png", seed=99)
    one_png = _run(root, out, cache, counters)
    assert (one_png["decode"], one_png["deid"]) == (1, 0)
    assert one_png["files"] == _run(root, out, None, counters)["files"]
    assert one_png["files"]["manifest.csv"] != cold["files"]["manifest.csv"]

    # one DICOM changes: one de-identification and one decode
    make_dicom(root / "Non_fractured" / PATIENT_FOLDER / "IMG2.dcm", SOPInstanceUID="1.2.826.0.1.9.9")
    one_dcm = _run(root, out, cache, counters)
    assert (one_dcm["decode"], one_dcm["deid"]) == (1, 1)
    assert one_dcm["files"] == _run(root, out, None, counters)["files"]


def test_another_key_or_setting_starts_a_new_cache(tmp_path, counters, monkeypatch):
    root = _export(tmp_path / "export")
    cache = tmp_path / "cache"
    _run(root, tmp_path / "out", cache, counters)
    monkeypatch.setenv("BONEFRAC_DEID_KEY", "another-secret")  # pseudonyms change: nothing reused
    other_key = _run(root, tmp_path / "out", cache, counters)
    assert (other_key["decode"], other_key["deid"]) == (12, 6)
    counters.update(decode=0, deid=0)
    ingest("dicom", root, tmp_path / "c" / "manifest.csv", workers=1, cache_dir=cache, max_pixels=10**6)
    assert counters["decode"] == 12  # a different pixel budget may change verdicts
    assert len([d for d in cache.iterdir() if d.is_dir()]) == 3


def test_cache_holds_no_identifier(tmp_path, counters):
    root = _export(tmp_path / "export")
    cache = tmp_path / "cache"
    _run(root, tmp_path / "out", cache, counters)
    entries = [p for p in cache.rglob("*") if p.is_file()]
    assert len(entries) > 12
    secrets = [*FAKE_PHI.values(), PATIENT_FOLDER, "IMG0", "spiral", str(root)]
    for p in entries:
        rel = p.relative_to(cache).as_posix()
        assert not any(contains_identifier(s, rel) for s in secrets), rel
        data = p.read_bytes()
        leaked = [s for s in secrets if contains_identifier(s, data)]
        assert leaked == [], (rel, leaked)
