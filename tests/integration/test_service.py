"""A real ``bentoml serve`` on 127.0.0.1: parity with the offline model, bad inputs, PHI, auth, logging, load.

One server for the module (start-up costs tens of seconds here) with an API key set,
so authentication is tested "on"; ``test_viewer.py`` runs one without a key ("off").
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import torch
from benchmarks.service_load import run_load
from PIL import Image
from tests._factories import (
    contains_identifier,
    make_cmyk_jpeg,
    make_decompression_bomb_png,
    make_dicom,
    make_jpeg,
    make_nifti,
    make_png,
    make_text_file,
    make_truncated_jpeg,
    phi_strings,
)
from tests.integration._server import make_tiny_bundle, running_server

from bonefrac.data.imageio import read_image
from bonefrac.evaluation.evaluate import predict_rows
from bonefrac.inference.batch_predict import predict_to_file
from bonefrac.inference.cache_outputs import CacheOutputs
from bonefrac.inference.predictor import Predictor
from bonefrac.monitoring.prediction_log import read_prediction_log
from bonefrac.monitoring.reference import current_from_images
from bonefrac.preprocess.cache import build_cache, load_cache
from bonefrac.registry.resolve import load_file
from bonefrac.registry.scoring import score_split

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "test-key-8c1f"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _phantom(seed: int, size: int = 256) -> np.ndarray:
    from bonefrac.data.phantom import render_phantom

    kind = ("transverse", None, "oblique")[seed % 3]
    return render_phantom(np.random.default_rng(seed), size, kind, ("frontal", "lateral")[seed % 2], 8)[0]


def _phantom_embeddings(bundle, arrays):
    from bonefrac.model.networks import forward_with_embedding

    x = torch.stack([bundle.preprocess(a) for a in arrays])
    with torch.no_grad():
        return forward_with_embedding(bundle.build_model().eval(), x)[1].numpy()


def _with_phantom_ood_reference(path):
    """The evaluate stage stores a per-image OOD reference in the bundle; here one fitted on phantoms:
    image statistics and the model's embedding on a PCA of the training embeddings (as the drift
    reference fits it), the detector carrying that PCA."""
    from bonefrac.model.bundle import ModelBundle
    from bonefrac.monitoring.features import EmbeddingReducer
    from bonefrac.monitoring.ood import OODDetector, image_ood_features

    bundle = ModelBundle.load(path)
    train, held = [_phantom(s) for s in range(40)], [_phantom(s) for s in range(100, 120)]
    reducer = EmbeddingReducer.fit(_phantom_embeddings(bundle, train), 4)

    def frame(arrays):
        emb = _phantom_embeddings(bundle, arrays)
        return pd.DataFrame([image_ood_features(a, 8, None, e, reducer) for a, e in zip(arrays, emb, strict=True)])

    bundle.metadata["ood"] = OODDetector.fit(frame(train), frame(held), reducer=reducer).to_dict()
    return bundle.save(path)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    work = tmp_path_factory.mktemp("svc")
    model = _with_phantom_ood_reference(make_tiny_bundle(work / "model.pt"))
    with running_server(
        model,
        work,
        BONEFRAC_API_KEY=API_KEY,
        BONEFRAC_MAX_UPLOAD_MB="1",
        BONEFRAC_MAX_BATCH_SIZE="8",
        BONEFRAC_MAX_LATENCY_MS="20000",
        BONEFRAC_BACKEND="torch",  # exact parity below; ONNX parity is test_onnx_export's
    ) as srv:
        yield srv, model, work


@pytest.fixture(scope="module")
def client(served):
    srv, *_ = served
    with httpx.Client(base_url=srv.url, headers=AUTH, timeout=120) as c:
        yield c


def _post(client: httpx.Client, path: os.PathLike | str, endpoint: str = "/predict", **kw) -> httpx.Response:
    with open(path, "rb") as fh:
        return client.post(endpoint, files={"file": (os.path.basename(path), fh.read())}, **kw)


def test_probes_open_and_api_key_enforced(served, tmp_path):
    srv, *_ = served
    img = make_png(tmp_path / "a.png")
    with httpx.Client(base_url=srv.url, timeout=60) as anon:
        assert anon.get("/livez").status_code == 200
        assert anon.get("/readyz").status_code == 200
        assert anon.get("/metadata").status_code == 401
        r = _post(anon, img)
        assert r.status_code == 401 and "API key" in r.json()["error"]
        assert _post(anon, img, "/explain").status_code == 401
        assert _post(anon, img, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert _post(anon, img, headers={"X-API-Key": API_KEY}).status_code == 200


def test_metadata(client, served):
    _, model_path, _ = served
    m = client.get("/metadata").json()
    bundle = load_file(model_path).bundle
    assert m["model"]["name"] == "bonefrac-test" and m["model"]["version"] == "t0"
    assert m["operating_points"] == bundle.operating_points
    assert m["calibration"] == pytest.approx(bundle.calibration.describe())
    assert m["input"]["preprocess"] == bundle.preprocess_spec.model_dump(mode="json")
    assert m["fracture_types"] == bundle.type_names
    assert m["input"]["formats"] == ["png", "jpeg", "dicom"] and m["input"]["max_upload_mb"] == 1
    assert m["runtime"]["backend"] in ("torch", "onnx") and m["auth_required"] is True
    assert "/" not in str(m["model"])  # no file paths leak


def test_same_probabilities_as_predictor_and_cli(client, served, tmp_path):
    """One image, five consumers, one contract: evaluation, ``bonefrac predict``, the live service,
    the registry's scoring and the drift features give the same calibrated probability.

    The reference is computed here from the bundle's own steps (decode at the spec's scale →
    preprocess → network → calibrate). The test bundle has a non-default window and a Platt map
    with an intercept, and one JPEG is large enough to be decoded at reduced DCT scale, so a
    consumer that re-derived either, or decoded that JPEG at another scale, would be caught.
    """
    _, model_path, _ = served
    folder = tmp_path / "imgs"
    folder.mkdir()
    files = [
        make_png(folder / "a.png", size=(80, 60), seed=1),
        make_png(folder / "b16.png", bit_depth=16, seed=2),
        make_jpeg(folder / "c.jpg", seed=3),
        make_dicom(folder / "d.dcm"),
        make_png(folder / "e_rgb.png", mode="RGB", seed=4),
        make_jpeg(folder / "f_large.jpg", size=(300, 260), seed=5),
    ]
    service = {}
    for f in files:
        r = _post(client, f)
        assert r.status_code == 200, r.text
        service[str(f)] = r.json()
    loaded = load_file(model_path)
    bundle = loaded.bundle
    hint = bundle.preprocess_spec.decode_side_hint
    arrays = [read_image(f, max_side_hint=hint).array for f in files]
    assert read_image(files[-1], max_side_hint=hint).meta["decode_scale"] == 4  # the reduced path is in play
    x = torch.stack([bundle.preprocess(a) for a in arrays])
    with torch.no_grad():
        ref = bundle.calibrate(bundle.build_model()(x).numpy())

    # evaluation's scoring function (run_evaluation and external validation use it)
    evaluation = predict_rows(CacheOutputs(Predictor(bundle), x.numpy()), np.arange(len(files)), bundle).prob
    # bonefrac predict
    predict_to_file(folder, loaded, tmp_path / "p.csv", backend="torch", progress=False)
    cli = pd.read_csv(tmp_path / "p.csv").set_index("path")["probability"]
    # drift features of new images
    drift, _ = current_from_images([str(f) for f in files], bundle=bundle)
    # the registry's gate scores the preprocessed cache (float16 on disk, see below)
    cache = tmp_path / "cache"
    rows = pd.DataFrame({"path": [str(f) for f in files], "label": [0, 1, 0, 1, 0, 1], "split": "test"})
    build_cache(rows, cache, bundle.preprocess_spec)
    _, registry_probs, _ = score_split(bundle, cache)
    cached = np.asarray(load_cache(cache)[0], dtype=np.float32)
    with torch.no_grad():
        ref_cached = bundle.calibrate(bundle.build_model()(torch.from_numpy(cached)).numpy()).prob

    for i, f in enumerate(files):
        body = service[str(f)]
        assert body["probability"] == pytest.approx(ref.prob[i], abs=1e-6)
        assert cli[str(f)] == pytest.approx(ref.prob[i], abs=1e-6)
        assert evaluation[i] == pytest.approx(ref.prob[i], abs=1e-6)
        assert drift["score"][i] == pytest.approx(ref.prob[i], abs=1e-6)
        assert registry_probs[i] == pytest.approx(ref_cached[i], abs=1e-6)
        # The cache stores float16 tensors: the same image scores within rounding of its inputs.
        assert registry_probs[i] == pytest.approx(ref.prob[i], abs=2e-3)
        for op, decided in ref.decisions.items():
            if abs(ref.prob[i] - bundle.operating_points[op]) > 1e-3:
                assert body["decisions"][op] == bool(decided[i])
        assert set(body["fracture_type_probabilities"]) == set(bundle.type_names)
        assert body["model"] == {"name": "bonefrac-test", "version": "t0", "arch": "custom_cnn"}
        assert body["thresholds"] == bundle.operating_points
        assert body["timing_ms"]["total"] > 0
    assert np.std(ref.prob) > 1e-3  # the images really differ for this model


def test_one_sigmoid_of_a_logit_in_the_code_base():
    """The calibration rule is written once (bonefrac.model.calibrate); nothing re-derives it."""
    import re
    from pathlib import Path

    src = Path(__file__).resolve().parents[2]
    rederived = re.compile(
        r"torch\.sigmoid\(|F\.sigmoid\(|expit\(|def sigmoid\("
        r"|1\.?0? ?/ ?\(1\.?0? ?\+ ?(np|torch|math)\.exp\(|logaddexp\(0\.?0?, ?-"
    )
    hits = [
        f"{p.relative_to(src)}:{n}"
        for folder in ("src", "flows", "benchmarks")
        for p in sorted((src / folder).rglob("*.py"))
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if rederived.search(line)
    ]
    assert hits and all(h.startswith("src/bonefrac/model/calibrate.py:") for h in hits), hits


def test_bad_input_corpus_gets_4xx_and_service_stays_healthy(client, served, tmp_path):
    srv, *_ = served
    corpus = {
        "text.jpg": (make_text_file(tmp_path / "text.jpg").read_bytes(), 415),
        "garbage.png": (bytes(range(256)) * 16, 415),
        "empty.png": (b"", 400),
        "truncated.jpg": (make_truncated_jpeg(tmp_path / "t.jpg").read_bytes(), 422),
        "bomb.png": (make_decompression_bomb_png(tmp_path / "bomb.png").read_bytes(), 413),
        "nopixels.dcm": (make_dicom(tmp_path / "n.dcm", with_pixels=False).read_bytes(), 422),
        "volume.nii.gz": (make_nifti(tmp_path / "v.nii.gz").read_bytes(), 422),
        "huge.png": (os.urandom(1_400_000), 413),  # over BONEFRAC_MAX_UPLOAD_MB=1
    }
    for name, (data, status) in corpus.items():
        for endpoint in ("/predict", "/explain"):
            r = client.post(endpoint, files={"file": (name, data)})
            assert r.status_code == status, (name, endpoint, r.status_code, r.text)
            body = r.json()
            assert isinstance(body, dict) and len(body["error"]) > 10, (name, body)
    # Valid but unusual inputs are accepted.
    for f in (
        make_png(tmp_path / "p16.png", bit_depth=16),
        make_png(tmp_path / "rgb.png", mode="RGB"),
        make_cmyk_jpeg(tmp_path / "cmyk.jpg"),
    ):
        assert _post(client, f).status_code == 200
    assert client.get("/readyz").status_code == 200
    assert _post(client, make_png(tmp_path / "ok.png")).status_code == 200
    assert "Traceback" not in srv.log_text()  # every bad file was handled, none crashed a handler
    assert client.post("/predict", files={"other": ("x.png", b"abc")}).status_code == 400  # no "file" field


def test_dicom_identifiers_never_returned_or_logged(client, served, tmp_path):
    srv, _, work = served
    dcm = make_dicom(tmp_path / "DOE_JANE.dcm", phi=True)
    nopix = make_dicom(tmp_path / "p2.dcm", phi=True, with_pixels=False)
    texts = [_post(client, dcm).text, _post(client, dcm, "/explain").text, _post(client, nopix).text]
    logs = srv.log_text() + "".join(p.read_text() for p in (work / "predictions").glob("*.jsonl"))
    for s in phi_strings():
        assert not any(contains_identifier(s, t) for t in texts), s
        assert not contains_identifier(s, logs), s
    assert "DOE_JANE" not in logs


FRACATLAS = ROOT.parent / "shared" / "data" / "fracatlas"
LARGE_FRACATLAS_JPEG = FRACATLAS / "images" / "Fractured" / "IMG0000019.jpg"  # 2304 x 2880, 770 KB


@pytest.mark.skipif(not LARGE_FRACATLAS_JPEG.is_file(), reason="needs ../shared/data/fracatlas")
def test_large_jpeg_scores_like_predict_and_its_reduced_scale_decode_stays_close(client, served):
    """A 2304 x 2880 radiograph: the service decodes it at the scale the model's preprocessing
    defines (version 2: libjpeg's 1/8 DCT path, both sides still >= the input side), so its
    probability is `bonefrac predict`'s and evaluation's; and that reduced decode stays close to
    decoding every pixel, because the window is taken after the resize.

    Stated tolerance, with the test bundle (a head made 5x sensitive): |delta p| <= 0.02 against the
    full-resolution decode, mean |delta input| <= 0.01. benchmarks.draft_decode measures FracAtlas.
    """
    from bonefrac.inference.upload_policy import SafetyLimits, decode_upload

    _, model_path, _ = served
    data = LARGE_FRACATLAS_JPEG.read_bytes()
    r = client.post("/predict", files={"file": ("x.jpg", data)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["image"]["width"], body["image"]["height"]) == (2304, 2880)  # the stored size
    bundle = load_file(model_path).bundle
    draft = decode_upload(data, 2, SafetyLimits(), max_side_hint=bundle.preprocess_spec.decode_side_hint)
    assert draft.meta["decode_scale"] == 8 and draft.array.shape == (360, 288)  # the draft path is taken
    full = read_image(data, expected_dims=2)
    x = torch.stack([bundle.preprocess(draft.array), bundle.preprocess(full.array)])
    with torch.no_grad():
        p_draft, p_full = bundle.calibrate(bundle.build_model()(x).numpy()).prob
    assert body["probability"] == pytest.approx(p_draft, abs=1e-6)  # what the service served: the spec's decode
    assert abs(p_draft - p_full) <= 0.02, (p_draft, p_full)
    assert float((x[0] - x[1]).abs().mean()) <= 0.01

    # /explain scores the same pixels but draws the picture from its own, larger decode (timed apart).
    ex = client.post("/explain", files={"file": ("x.jpg", data)})
    assert ex.status_code == 200, ex.text
    assert ex.json()["probability"] == pytest.approx(p_draft, abs=1e-6)
    overlay = Image.open(io.BytesIO(base64.b64decode(ex.json()["explanation"]["overlay_png"])))
    assert overlay.size[1] > 360  # not the model's 1/8-scale decode
    assert ex.json()["timing_ms"]["display_decode"] > 0 and "display_decode" not in body["timing_ms"]


def test_explain_returns_overlay_and_heatmap(client, tmp_path):
    r = _post(client, make_png(tmp_path / "x.png", size=(96, 64)), "/explain")
    assert r.status_code == 200, r.text
    ex = r.json()["explanation"]
    overlay = Image.open(io.BytesIO(base64.b64decode(ex["overlay_png"])))
    heat = Image.open(io.BytesIO(base64.b64decode(ex["heatmap_png"])))
    assert overlay.mode == "RGB" and overlay.size == (64, 96)  # original aspect (W, H)
    assert heat.mode == "RGBA" and heat.size == overlay.size
    small = np.asarray(ex["heatmap"])
    assert small.ndim == 2 and small.min() >= 0 and small.max() <= 1 and small.max() > 0


def test_prediction_log_is_written_without_phi(client, served, tmp_path):
    _, _, work = served
    before = len(read_prediction_log(work / "predictions"))
    assert _post(client, make_png(tmp_path / "y.png", bit_depth=16)).status_code == 200
    df = read_prediction_log(work / "predictions")
    assert len(df) == before + 1
    last = df.iloc[-1]
    assert last["model_version"] == "t0" and last["bit_depth"] == 16 and last["format"] == "png"
    assert 0 <= last["intensity_p01"] <= last["intensity_mean"] <= last["intensity_p99"] <= 1
    assert (last["width"], last["height"]) == (64, 64)


def test_bounded_load_has_zero_errors(served, tmp_path):
    srv, *_ = served
    images = [(f"{i}.png", make_png(tmp_path / f"{i}.png", seed=i).read_bytes()) for i in range(4)]
    res = run_load(srv.url, images, concurrency=8, duration_s=10, headers=AUTH)
    assert res["errors"] == 0, res
    assert res["ok"] >= 8, res
    print("load 8 clients / 10 s:", res)


def test_out_of_distribution_warning_per_image(client, tmp_path):
    """A phantom like the training images answers without a warning; a real radiograph warns."""
    phantom = make_png(tmp_path / "phantom.png", array=_phantom(500))
    r = _post(client, phantom)
    assert r.status_code == 200 and r.json()["ood"]["flag"] is False, r.json().get("ood")
    fracatlas = sorted((ROOT.parent / "shared" / "data" / "fracatlas" / "images" / "Fractured").glob("*.jpg"))
    if not fracatlas:
        pytest.skip("FracAtlas not present at ../shared/data/fracatlas")
    body = _post(client, fracatlas[0]).json()
    assert body["ood"]["flag"] is True and body["ood"]["score"] > 1.0 and body["ood"]["reason"]
    assert 0.0 <= body["probability"] <= 1.0  # still answered: the warning informs, it does not refuse


def test_ood_check_uses_the_served_models_embedding(client, served, tmp_path):
    """The model worker returns the embedding with the logits; the front end projects it on the
    detector's PCA: the distance the service reports is the one computed offline for that image."""
    from bonefrac.model.bundle import ModelBundle
    from bonefrac.monitoring.ood import OODDetector, image_ood_features

    _, model_path, _ = served
    arr = _phantom(501)
    body = _post(client, make_png(tmp_path / "p.png", array=arr)).json()
    ood = body["ood"]
    assert ood["skipped"] == [] and set(ood["ratios"]) == {"image", "embedding"}, ood
    bundle = ModelBundle.load(model_path)
    offline = OODDetector.from_dict(bundle.metadata["ood"]).score(
        image_ood_features(arr, 8), _phantom_embeddings(bundle, [arr])[0]
    )
    assert ood["distances"]["embedding"] == pytest.approx(offline["distances"]["embedding"], rel=1e-3, abs=1e-3)
    assert body["timing_ms"]["ood"] < 50  # the check itself (projection + two distances) is cheap


def test_explain_can_leave_the_full_resolution_pixels_out(client, tmp_path):
    """API clients opt out of the viewer's reading copy (megabytes for a large radiograph)."""
    img = make_png(tmp_path / "big.png", size=(600, 500), bit_depth=16)
    full = _post(client, img, "/explain")
    lean = _post(client, img, "/explain", params={"pixels": "none"})
    assert full.status_code == lean.status_code == 200, (full.text[:200], lean.text[:200])
    assert "pixels" in full.json()["explanation"] and "pixels" not in lean.json()["explanation"]
    assert lean.json()["explanation"]["overlay_png"] and lean.json()["probability"] == full.json()["probability"]
    assert len(lean.content) < len(full.content) / 2, (len(lean.content), len(full.content))
    with open(img, "rb") as fh:  # or as a form field
        form = client.post("/explain", files={"file": ("b.png", fh.read())}, data={"pixels": "none"})
    assert "pixels" not in form.json()["explanation"]
    bad = _post(client, img, "/explain", params={"pixels": "some"})
    assert bad.status_code == 400 and "pixels must be" in bad.json()["error"]
