"""pydicom's bundled test files through ingest and ``bonefrac predict``: a verdict each, the same verdict.

The folder of pydicom's test files (``pydicom.data``, inside the wheel: DICOM as the world
writes it, non-images, non-radiograph modalities, damaged files) is copied once under a
class folder and read by one ingest call (the ``dicom`` source of a 2D pipeline) and one
``bonefrac predict`` call (a tiny 2D model bundle). Every input is counted; every file
ingest reads gets a row that decodes or says why not; non-radiograph modalities are
refused naming the modality; predict gives each of those files a probability or a clear
refusal, never a traceback, accepting exactly the files ingest accepts.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from pydicom.data import get_testdata_file
from tests.integration._server import make_tiny_bundle

from bonefrac.data import sources
from bonefrac.data.dicom import RADIOGRAPH_MODALITIES
from bonefrac.data.ingest import ingest

pytestmark = pytest.mark.integration
MAX_PIXELS = 60_000_000  # bonefrac predict's default and params' serving.max_pixels
# Both refuse these files, for a reason found in another order: predict reads the header's
# frame count before the modality ("a 3D volume where a 2D image is expected") and its
# upload gate names formats the service does not take ("unsupported file: ...").
PREDICT_ONLY_WORDING = ("a 3D volume where a 2D image is expected", "unsupported file:")
# Refused at intake only: the training data's declared body-part vocabulary (data.body_parts)
# means nothing to a model scoring one image; predict refuses these files for what they are.
INGEST_ONLY = "refused at intake: body part not in data.body_parts"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, object]:
    tmp = tmp_path_factory.mktemp("pydicom")
    root = tmp / "export"
    cls = root / "Non_fractured"
    shutil.copytree(Path(get_testdata_file("CT_small.dcm", download=False)).parent, cls)
    n_files = sum(1 for p in cls.rglob("*") if p.is_file())
    table = ingest("dicom", root, tmp / "out" / "manifest.csv", workers=1, max_pixels=MAX_PIXELS, expected_dims=2)
    # the files ingest read, in its order (rows are in walk order: pseudonymous ids cannot be traced back)
    read = list(sources._walk_files(cls, root, sources.IntakeReport()))
    from typer.testing import CliRunner

    from bonefrac.cli import app

    model = make_tiny_bundle(tmp / "model.pt")
    preds = tmp / "predictions.csv"
    args = ["predict", str(cls), "--model", str(model), "--out", str(preds), "--no-progress", "--backend", "torch"]
    result = CliRunner().invoke(app, args)
    return {
        "n_files": n_files,
        "table": table,
        "read": read,
        "predict": result,
        "preds": pd.read_csv(preds, keep_default_na=False).set_index("path"),
    }


def test_every_input_is_counted_and_gets_a_verdict(corpus):
    table, intake = corpus["table"], corpus["table"].attrs["intake"]
    assert corpus["n_files"] > 150
    assert intake["seen"] == corpus["n_files"] == intake["rows"] + intake["skipped_total"]
    assert intake["rows"] == len(table) == len(corpus["read"])
    assert intake["skipped"] == {"not an image file (by suffix)": intake["skipped_total"]}
    refused = table[~table["decodes_ok"]]
    assert (refused["decode_error"] != "").all()
    errors = " ".join(refused["decode_error"])
    assert "Traceback" not in errors and "unexpected decoder error" not in errors


def test_non_radiograph_modalities_are_refused_naming_the_modality(corpus):
    table = corpus["table"]
    named = set()
    for err in table["decode_error"]:
        m = re.match(r"DICOM modality (\S+) refused: accepted here CR, DX, RF, XA", err)
        if m:
            named.add(m.group(1))
    assert named >= {"CT", "MR", "RTDOSE", "RTPLAN", "US", "SR", "SEG"}, named  # NM: refused first for its body part
    assert not named & set(RADIOGRAPH_MODALITIES)
    ok = table[table["decodes_ok"]]
    assert len(ok) >= 1 and not set(ok["modality"]) & {"CT", "MR", "US", "NM", "RTDOSE"}


def test_predict_gives_each_file_a_probability_or_a_refusal_the_same_as_ingest(corpus):
    result, preds, table = corpus["predict"], corpus["preds"], corpus["table"]
    assert result.exit_code == 2, result.output  # some files refused, none crashed
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    prob = pd.to_numeric(preds["probability"], errors="coerce")
    assert ((preds["error"] == "") == prob.between(0, 1)).all()
    assert not preds["error"].str.contains("Traceback|unexpected").any()
    checked = 0
    for path, (_, row) in zip(corpus["read"], table.iterrows(), strict=True):
        p_err = preds.loc[str(path), "error"]
        i_err = "" if row["decodes_ok"] else row["decode_error"]
        assert (p_err == "") == (i_err == ""), (path.name, i_err, p_err)
        assert p_err == i_err or p_err.startswith(PREDICT_ONLY_WORDING) or i_err.startswith(INGEST_ONLY), (
            path.name,
            i_err,
            p_err,
        )
        checked += 1
    assert checked == len(table)


def test_preambleless_dicom_gets_the_same_verdict_in_predict_as_in_ingest(corpus):
    """No preamble, no file meta, either byte order: predict reads the header as ingest does.

    The big-endian file sniffs as "unknown" by magic numbers; predict's upload gate once
    refused it as "not a recognised image" where ingest named its modality.
    """
    by_name = {p.name: (p, row) for p, (_, row) in zip(corpus["read"], corpus["table"].iterrows(), strict=True)}
    for name in ("ExplVR_BigEndNoMeta.dcm", "ExplVR_LitEndNoMeta.dcm"):
        path, row = by_name[name]
        assert row["decode_error"].startswith("DICOM modality RTPLAN refused"), row["decode_error"]
        assert corpus["preds"].loc[str(path), "error"] == row["decode_error"]
