"""``bonefrac predict`` and ``bonefrac validate-external`` as a user runs them: real subprocesses.

Phantom-sized inputs by default; the FracAtlas runs are marked slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from tests._factories import make_dicom, make_png, make_text_file, make_truncated_jpeg
from tests.integration._server import ROOT, make_tiny_bundle

pytestmark = pytest.mark.integration
FRACATLAS = ROOT.parent / "shared" / "data" / "fracatlas"


def bonefrac(
    *args: str, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.update({"PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{e.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"})
    e.pop("BONEFRAC_MODEL_PATH", None)
    e.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "bonefrac.cli", *args],
        capture_output=True,
        text=True,
        env=e,
        timeout=timeout,
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("m") / "model.pt")


def test_folder_with_broken_files_exits_2_and_keeps_going(model, tmp_path):
    d = tmp_path / "DOE^JANE_19650302"  # a patient-named export folder
    (d / "sub").mkdir(parents=True)
    make_png(d / "a.png", seed=1)
    make_png(d / "sub" / "b16.png", bit_depth=16, seed=2)
    make_dicom(d / "sub" / "c.dcm")
    make_truncated_jpeg(d / "broken.jpg")
    make_text_file(d / "sub" / "error_page.png")
    out = tmp_path / "preds.csv"
    r = bonefrac(
        "predict",
        str(d),
        "--model",
        str(model),
        "--out",
        str(out),
        "--batch-size",
        "2",
        "--gradcam",
        str(tmp_path / "cams"),
        "--backend",
        "torch",
    )
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert "2 could not be read" in r.stdout
    # The failures are named by their row in the output, never by file or folder name (stderr ends up
    # in job logs, and an export's names may identify the patient).
    assert "DOE^JANE" not in r.stderr + r.stdout and "broken.jpg" not in r.stderr
    df = pd.read_csv(out, keep_default_na=False)
    failed_rows = [i + 1 for i in range(len(df)) if df["error"][i]]
    for row in failed_rows:
        assert f"unreadable: row {row} of the output: {df['error'][row - 1]}" in r.stderr
    # It talks: what it loads and where it decides first, then the total (the bar's ETA needs it)...
    err = r.stderr.splitlines()
    assert err[0].startswith("bonefrac predict: loading")
    assert err[1].startswith("model bonefrac-test:t0 (custom_cnn, 64 px); operating points: high-sensitivity p >= ")
    assert "5 images to read" in r.stderr and "/5 [" in r.stderr  # tqdm: n/total [elapsed<remaining]
    # ...and the positives per operating point at the end.
    assert "high-sensitivity at p >= " in r.stdout and "high-specificity at p >= " in r.stdout
    assert " of 3 positive" in r.stdout
    df = pd.read_csv(out, keep_default_na=False)
    assert len(df) == 5 and (df["error"] != "").sum() == 2
    ok = df[df["error"] == ""]
    assert ok["probability"].astype(float).between(0, 1).all()
    assert set(ok["model_version"].astype(str)) == {"t0"}
    assert sorted(p.name for p in (tmp_path / "cams").iterdir()) == ["a.png", "sub__b16.png", "sub__c.png"]


def _invoke(*args: str):
    """In-process run of the same Typer app (fast: no interpreter start-up)."""
    from typer.testing import CliRunner

    from bonefrac.cli import app

    return CliRunner().invoke(app, list(args))


def test_single_file_jsonl_exit_0(model, tmp_path):
    out = tmp_path / "p.jsonl"
    r = _invoke(
        "predict",
        str(make_png(tmp_path / "x.png")),
        "--model",
        str(model),
        "--out",
        str(out),
        "--no-progress",
        "--backend",
        "torch",
    )
    assert r.exit_code == 0, r.output
    row = json.loads(out.read_text())
    assert row["error"] == "" and row["model_name"] == "bonefrac-test"
    assert set(row) >= {"decision_high_sensitivity", "decision_high_specificity", "type_prob_oblique"}


def test_log_predictions_writes_the_service_log_schema_without_identifiers(model, tmp_path, monkeypatch):
    from tests._factories import phi_strings

    from bonefrac.monitoring.prediction_log import LOG_COLUMNS, read_prediction_log

    log_dir = tmp_path / "predictions"
    monkeypatch.setenv("BONEFRAC_PREDICTION_LOG_DIR", str(log_dir))  # the service's own override
    folder = tmp_path / "DOE_JANE_study"
    folder.mkdir()
    make_png(folder / "DOE_JANE.png", size=(80, 60), bit_depth=16)
    make_dicom(folder / "scan.dcm", phi=True)
    out = tmp_path / "p.csv"
    args = ["predict", str(folder), "--model", str(model), "--out", str(out), "--no-progress", "--backend", "torch"]
    assert _invoke(*args).exit_code == 0 and not log_dir.exists()  # off unless asked
    r = _invoke(*args, "--log-predictions")
    assert r.exit_code == 0, r.output
    log = read_prediction_log(log_dir)
    assert list(log.columns) == LOG_COLUMNS and len(log) == 2
    preds = pd.read_csv(out).set_index("path")
    png = log[log["format"] == "png"].iloc[0]
    assert png["probability"] == pytest.approx(preds.loc[str(folder / "DOE_JANE.png"), "probability"])
    # make_png's size is (rows, cols)
    assert (png["width"], png["height"], png["bit_depth"], png["model_version"]) == (60, 80, 16, "t0")
    assert 0 <= png["intensity_p01"] <= png["intensity_mean"] <= png["intensity_p99"] <= 1
    raw = "".join(p.read_text() for p in log_dir.glob("*.jsonl"))
    for s in [*phi_strings(), "DOE_JANE", "scan.dcm", str(tmp_path)]:
        assert s not in raw, s


def test_user_errors_exit_1_without_traceback(model, tmp_path):
    r = _invoke("predict", str(tmp_path / "missing"), "--model", str(model), "--out", str(tmp_path / "o.csv"))
    assert r.exit_code == 1 and "input not found" in r.output and "Traceback" not in r.output
    r = _invoke("predict", str(tmp_path), "--model", str(tmp_path / "nope.pt"))
    assert r.exit_code == 1 and "model bundle not found" in r.output


CHAMPION_SCRIPT = """
import sys
from typer.testing import CliRunner
from bonefrac.cli import app
from bonefrac.registry.store import promote, register_model

tag = register_model(sys.argv[1], name="bonefrac")
promote(tag)
print("TAG", tag)
for extra in ([], ["--model", tag]):
    r = CliRunner().invoke(app, ["predict", sys.argv[2], "--out", sys.argv[3], "--backend", "torch", *extra])
    print("EXIT", r.exit_code, r.output.replace(chr(10), " "))
    print("ROW", open(sys.argv[3]).read().splitlines()[1])
"""


def test_champion_from_the_model_store_by_default(model, tmp_path):
    """No --model: the champion in the BentoML model store (a fresh store in tmp); then by tag."""
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "PYTHONPATH": str(ROOT / "src")}
    env.pop("BONEFRAC_MODEL_PATH", None)
    img = make_png(tmp_path / "x.png")
    r = subprocess.run(
        [sys.executable, "-c", CHAMPION_SCRIPT, str(model), str(img), str(tmp_path / "p.csv")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    tag = next(x.split()[1] for x in lines if x.startswith("TAG"))
    exits = [x for x in lines if x.startswith("EXIT")]
    rows = [x for x in lines if x.startswith("ROW")]
    assert [e.split()[1] for e in exits] == ["0", "0"], exits
    name, version = tag.split(":")
    assert all(f",{name},{version}," in row for row in rows), (tag, rows)


def test_validate_external_on_an_imagefolder(model, tmp_path):
    root = tmp_path / "hospital"
    for label, folder in ((1, "Fractured"), (0, "Non_fractured")):
        (root / folder).mkdir(parents=True)
        for i in range(6):
            make_png(root / folder / f"{folder}_{i}.png", size=(64 + 4 * i, 64), seed=10 * label + i)
    make_truncated_jpeg(root / "Fractured" / "cut.jpg")
    out = tmp_path / "report"
    r = bonefrac(
        "validate-external",
        "--source",
        "imagefolder",
        "--root",
        str(root),
        "--model",
        str(model),
        "--out",
        str(out),
        "--bootstrap",
        "20",
        "--gallery",
        "2",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert (out / "report.html").stat().st_size > 1000
    facts = json.loads((out / "external.json").read_text())
    assert facts["n_evaluated"] == 12 and facts["n_unreadable"] == 1 and facts["recalibrated"] is False
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics  # the evaluation area's headline metrics
    # Stored operating points were used, not refitted on this data.
    bundle_ops = {"high_sensitivity": 0.35, "high_specificity": 0.65}
    assert facts["operating_points"] == bundle_ops
    assert not (out / "_cache").exists() and not (out / "_model.pt").exists()


@pytest.mark.slow
@pytest.mark.skipif(not FRACATLAS.exists(), reason="FracAtlas not available at ../shared/data/fracatlas")
def test_fracatlas_predict_and_external_validation(model, tmp_path):
    meta = pd.read_csv(FRACATLAS / "dataset.csv")
    legs = meta[meta["leg"] == 1]
    pick = pd.concat([legs[legs["fractured"] == 1].head(10), legs[legs["fractured"] == 0].head(10)])
    paths = [
        str(FRACATLAS / "images" / ("Fractured" if f else "Non_fractured") / n)
        for n, f in zip(pick["image_id"], pick["fractured"], strict=True)
    ]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(Path(paths[0]).read_bytes()[:5000])  # a truncated copy of a real radiograph
    pd.DataFrame({"path": [*paths, str(broken)]}).to_csv(tmp_path / "m.csv", index=False)
    r = bonefrac("predict", str(tmp_path / "m.csv"), "--model", str(model), "--out", str(tmp_path / "p.csv"))
    assert r.returncode == 2, r.stderr
    df = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    assert (df["error"] == "").sum() == 20 and "truncated" in df.iloc[-1]["error"]
    out = tmp_path / "ext"
    r = bonefrac(
        "validate-external",
        "--source",
        "fracatlas",
        "--root",
        str(FRACATLAS),
        "--model",
        str(model),
        "--out",
        str(out),
        "--body-part",
        "leg",
        "--max-images",
        "60",
        "--bootstrap",
        "50",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert (out / "report.html").exists()
