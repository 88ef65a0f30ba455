"""``bonefrac predict`` logic: discovery, streaming, broken files, outputs, Grad-CAM, Predictor parity."""

from __future__ import annotations

import json
import types

import numpy as np
import pandas as pd
import pytest
import torch
from tests._factories import make_dicom, make_jpeg, make_png, make_text_file, make_truncated_jpeg
from tests.integration._server import make_tiny_bundle

from bonefrac.data.imageio import read_image
from bonefrac.explain.display import gradcam_name
from bonefrac.inference.batch_predict import (
    EXIT_SOME_FAILED,
    PredictInputError,
    iter_inputs,
    predict_to_file,
)
from bonefrac.inference.predictor import Predictor
from bonefrac.registry.resolve import load_file


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.set_num_threads(1)
    return load_file(make_tiny_bundle(tmp_path_factory.mktemp("m") / "model.pt", image_size=48))


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "studies"
    (root / "a" / "deep").mkdir(parents=True)
    (root / "b").mkdir()
    make_png(root / "a" / "one.png", size=(60, 40), seed=1)
    make_png(root / "a" / "deep" / "two16.png", bit_depth=16, seed=2)
    make_jpeg(root / "b" / "three.jpg", seed=3)
    make_dicom(root / "b" / "four.dcm")
    make_dicom(root / "b" / "FIVE_NOEXT")  # DICOM without extension: found by sniffing
    make_truncated_jpeg(root / "b" / "broken.jpg")
    make_text_file(root / "a" / "html_error.png")
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"")
    return root


def test_discovery_is_lazy_and_recursive(folder):
    it = iter_inputs(folder)
    assert isinstance(it, types.GeneratorType)
    names = sorted(p.rsplit("/", 1)[-1] for p in it)
    assert names == [
        "FIVE_NOEXT",
        "broken.jpg",
        "four.dcm",
        "html_error.png",
        "one.png",
        "three.jpg",
        "two16.png",
    ]


def test_folder_with_broken_files(folder, model, tmp_path):
    out = tmp_path / "preds.csv"
    s = predict_to_file(folder, model, out, batch_size=3, backend="torch", progress=False)
    assert (s.n_total, s.n_ok, s.n_failed, s.exit_code) == (7, 5, 2, EXIT_SOME_FAILED)
    df = pd.read_csv(out, keep_default_na=False)
    assert len(df) == 7
    bad = df[df["error"] != ""]
    assert sorted(bad["path"].str.rsplit("/", n=1).str[-1]) == ["broken.jpg", "html_error.png"]
    assert bad["probability"].eq("").all()
    good = df[df["error"] == ""]
    assert good["probability"].astype(float).between(0, 1).all()
    assert set(good["model_version"].astype(str)) == {model.version}
    assert {"decision_high_sensitivity", "decision_high_specificity", "type_prob_transverse"} <= set(df.columns)
    # Decisions follow the stored thresholds exactly.
    thr = model.bundle.operating_points["high_sensitivity"]
    assert (
        good["decision_high_sensitivity"].map({"True": True, "False": False})
        == (good["probability"].astype(float) >= thr)
    ).all()
    # Same numbers as the pipeline's Predictor on the same files (one preprocessing path).
    paths = good["path"].tolist()
    ref = Predictor(model.bundle).predict_arrays([read_image(p).array for p in paths])
    np.testing.assert_allclose(good["probability"].astype(float), ref.prob, atol=1e-6)
    # Rows of a folder are not all the same number: the test model distinguishes images.
    assert good["probability"].astype(float).std() > 1e-3


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_non_utf8_file_name_gets_its_row_not_a_crash(tmp_path, model, fmt):
    """A PACS export's Latin-1 name (bytes that are not UTF-8) is scored and written back as the
    same bytes (CSV) or an escaped string (JSON lines); strict UTF-8 output crashed the whole run."""
    import os

    root = tmp_path / "in"
    root.mkdir()
    make_png(root / "plain.png", seed=4)
    name = os.fsencode(root) + b"/M\xfcller_\xff.png"
    with open(name, "wb") as fh:
        fh.write((root / "plain.png").read_bytes())
    out = tmp_path / f"preds.{fmt}"
    s = predict_to_file(root, model, out, batch_size=2, backend="torch", progress=False)
    assert (s.n_total, s.n_ok, s.exit_code) == (2, 2, 0)
    if fmt == "csv":
        rows = pd.read_csv(out, keep_default_na=False, encoding="utf-8", encoding_errors="surrogateescape")
        assert os.fsencode(rows["path"].iloc[0]) == name or os.fsencode(rows["path"].iloc[1]) == name
    else:
        rows = pd.DataFrame([json.loads(line) for line in out.read_text().splitlines()])
        assert sorted(os.fsencode(p) for p in rows["path"]) == sorted([name, os.fsencode(root / "plain.png")])
    assert rows["probability"].astype(float).nunique() == 1  # the same pixels, the same answer


def test_all_ok_exit_code_jsonl_and_gradcam(tmp_path, model):
    img = make_png(tmp_path / "x.png", size=(64, 48))
    out = tmp_path / "p.jsonl"
    from bonefrac.explain.display import overlay_writer

    cams_writer = overlay_writer(
        model.bundle.build_model(), model.bundle.preprocess_spec.image_size, tmp_path / "cams", None
    )
    said: list[str] = []
    s = predict_to_file(img, model, out, explainer=cams_writer, backend="torch", progress=False, notify=said.append)
    assert s.exit_code == 0 and s.n_ok == 1
    assert said == ["backend: torch on cpu", "1 image to read"]
    row = json.loads(out.read_text().splitlines()[0])
    assert row["error"] == "" and 0 <= row["probability"] <= 1
    assert abs(sum(row[f"type_prob_{t}"] for t in model.bundle.type_names) - 1) < 1e-6
    cams = list((tmp_path / "cams").glob("*.png"))
    assert [c.name for c in cams] == ["x.png"]
    from PIL import Image

    with Image.open(cams[0]) as im:  # the 48 x 64 image, centred above a panel (name, decisions, colour bar)
        assert im.mode == "RGB" and im.size[0] >= 48 and im.size[1] > 64 + 80


def test_gradcam_overlay_pixels_never_carry_the_file_name(tmp_path, model):
    """The same image under a patient-named file and a neutral one gives identical overlay pixels:
    no identifier is burned into the picture (only the overlay's own file name mirrors the input)."""
    from PIL import Image

    from bonefrac.explain.display import overlay_writer

    (tmp_path / "in").mkdir()
    src = make_png(tmp_path / "in" / "DOE^JANE_19650302.png", size=(64, 48), seed=7)
    neutral = tmp_path / "in2" / "a.png"
    neutral.parent.mkdir()
    neutral.write_bytes(src.read_bytes())
    pixels = []
    for path in (src, neutral):
        cams = tmp_path / f"cams_{path.parent.name}"
        writer = overlay_writer(model.bundle.build_model(), model.bundle.preprocess_spec.image_size, cams, None)
        predict_to_file(path, model, tmp_path / f"{path.parent.name}.csv", explainer=writer, backend="torch",
                        progress=False)
        (png,) = cams.glob("*.png")
        with Image.open(png) as im:
            pixels.append(np.asarray(im.convert("RGB")))
    assert np.array_equal(pixels[0], pixels[1])


def test_summary_counts_positives_per_operating_point(folder, model, tmp_path):
    out = tmp_path / "p.csv"
    s = predict_to_file(folder, model, out, backend="torch", progress=False, batch_size=2)
    df = pd.read_csv(out, keep_default_na=False)
    ok = df[df["error"] == ""]
    for op in model.bundle.operating_points:
        assert s.positives[op] == (ok[f"decision_{op}"].astype(str) == "True").sum()
    assert sum(s.positives.values()) > 0  # the test bundle decides some images positive
    lines = s.counts_lines(dict(model.bundle.operating_points))
    thr = model.bundle.operating_points["high_sensitivity"]
    assert lines[0] == (
        f"high-sensitivity at p >= {thr:.3f}: {s.positives['high_sensitivity']} of {s.n_ok} positive "
        f"({100 * s.positives['high_sensitivity'] / s.n_ok:.1f} %)"
    )


def test_annotated_overlay_tints_only_above_the_floor_and_carries_a_panel():
    from bonefrac.explain.display import annotated_overlay

    gray = np.tile(np.linspace(40, 200, 80).astype(np.uint8), (60, 1))
    cam = np.zeros((60, 80), np.float32)
    cam[10:30, 10:30] = 1.0
    cam[40:50, 50:70] = 0.1  # under the 0.2 floor
    args = {"title": "t", "decisions": {"high_sensitivity": True, "high_specificity": False}}
    pic = annotated_overlay(gray, cam, probability=0.73, **args, thresholds={"high_sensitivity": 0.3})
    h, w = pic.shape[:2]
    assert h > 60 + 80 and w >= 80
    x0 = (w - 80) // 2
    image = pic[:60, x0 : x0 + 80].astype(int)
    plain = np.repeat(gray[..., None], 3, axis=2).astype(int)
    assert np.array_equal(image[40:50, 50:70], plain[40:50, 50:70])  # weak CAM: left untouched
    assert np.array_equal(image[:, 75:], plain[:, 75:])
    assert np.abs(image[15:25, 15:25] - plain[15:25, 15:25]).max() > 30  # strong CAM: tinted
    panel = pic[60:]
    assert (panel[..., 0] > 200).any() and (panel[..., 2] > 200).any()  # the bar runs blue to red
    other = annotated_overlay(gray, cam, probability=0.12, **args)
    assert not np.array_equal(other[60:], panel)  # the probability is drawn, not a fixed caption


def test_csv_manifest_with_relative_paths(tmp_path, model):
    (tmp_path / "imgs").mkdir()
    make_png(tmp_path / "imgs" / "a.png")
    make_png(tmp_path / "imgs" / "b.png", seed=5)
    pd.DataFrame({"path": ["imgs/a.png", "imgs/b.png", "imgs/missing.png"]}).to_csv(tmp_path / "m.csv", index=False)
    out = tmp_path / "o.csv"
    s = predict_to_file(tmp_path / "m.csv", model, out, backend="torch", progress=False)
    assert (s.n_ok, s.n_failed) == (2, 1)
    df = pd.read_csv(out, keep_default_na=False)
    assert "not found" in df.loc[2, "error"]


def test_bad_inputs(tmp_path, model):
    with pytest.raises(PredictInputError, match="not found"):
        list(iter_inputs(tmp_path / "nope"))
    pd.DataFrame({"file_name": ["a.png"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(PredictInputError, match="column"):
        list(iter_inputs(tmp_path / "bad.csv"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PredictInputError, match="no images") as err:
        predict_to_file(tmp_path / "empty", model, tmp_path / "o.csv", backend="torch", progress=False)
    assert err.value.args[0].endswith("this 2D model reads DICOM, JPEG, PNG)")  # no NIfTI for a 2D model
    assert not (tmp_path / "o.csv").exists()  # nothing half-written


def test_gradcam_name_keeps_subfolders_apart(tmp_path):
    assert gradcam_name(str(tmp_path / "a" / "x.dcm"), tmp_path) == "a__x.png"
    assert gradcam_name(str(tmp_path / "b" / "x.dcm"), tmp_path) == "b__x.png"


def test_volumes_for_a_3d_model(tmp_path):
    """A 3D model: NIfTI files and DICOM series folders are each one volume; a 2D image is refused."""
    from tests._factories import make_dicom_series, make_nifti

    vol = load_file(make_tiny_bundle(tmp_path / "m3.pt", spatial_dims=3))
    root = tmp_path / "ct"
    root.mkdir()
    make_nifti(root / "a.nii.gz")
    make_dicom_series(root / "series1")
    make_png(root / "flat.png")  # not a volume: ignored by discovery for a 3D model
    found = sorted(iter_inputs(root, spatial_dims=3))
    assert [p.rsplit("/", 1)[-1] for p in found] == ["a.nii.gz", "series1"]
    out = tmp_path / "v.csv"
    s = predict_to_file(root, vol, out, batch_size=2, backend="torch", progress=False)
    assert (s.n_ok, s.n_failed) == (2, 0)
    s2 = predict_to_file(root / "flat.png", vol, tmp_path / "f.csv", backend="torch", progress=False)
    assert s2.n_failed == 1
    # the service's verdict for the same file (one intake for both): PNG is not a volume format
    assert "unsupported format PNG" in pd.read_csv(tmp_path / "f.csv")["error"][0]
