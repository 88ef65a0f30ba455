"""Input safety: every bad upload becomes a clear 4xx; limits and auth are enforced before parsing."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient
from tests._factories import (
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

from bonefrac.monitoring.prediction_log import (
    LOG_COLUMNS,
    append_prediction,
    image_statistics,
    read_prediction_log,
)
from bonefrac.serving.auth import APIKeyMiddleware, extract_key
from bonefrac.serving.input_safety import (
    InputRejected,
    SafetyLimits,
    UploadLimitMiddleware,
    classify_decode_error,
    decode_upload,
)

LIMITS = SafetyLimits(max_upload_bytes=2 * 1024 * 1024, max_pixels=4_000_000)


def _reject(data: bytes, dims: int = 2, limits: SafetyLimits = LIMITS) -> InputRejected:
    with pytest.raises(InputRejected) as info:
        decode_upload(data, dims, limits)
    return info.value


@pytest.mark.parametrize(
    ("maker", "bit_depth", "fmt"),
    [
        (lambda p: make_png(p, size=(40, 32)), 8, "png"),  # 32 px: the decoder's MIN_SIDE_PX
        (lambda p: make_png(p, bit_depth=16), 16, "png"),
        (lambda p: make_png(p, mode="RGB"), 8, "png"),
        (lambda p: make_jpeg(p), 8, "jpeg"),
        (make_cmyk_jpeg, 8, "jpeg"),
        (lambda p: make_dicom(p), 12, "dicom"),
    ],
    ids=["png8", "png16", "rgb", "jpeg", "cmyk", "dicom"],
)
def test_valid_uploads_decode_to_2d(tmp_path, maker, bit_depth, fmt):
    path = maker(tmp_path / "img")
    img = decode_upload(path.read_bytes(), 2, LIMITS)
    assert img.array.ndim == 2 and img.format == fmt and img.bit_depth == bit_depth
    assert np.isfinite(img.array).all() and img.array.std() > 0


def test_cmyk_keeps_the_bright_bar_bright(tmp_path):
    img = decode_upload(make_cmyk_jpeg(tmp_path / "c.jpg").read_bytes(), 2, LIMITS)
    w = img.array.shape[1]
    assert img.array[:, w // 3 + 2].mean() > img.array[:, 2].mean() + 50


@pytest.mark.parametrize(
    ("make", "status", "words"),
    [
        (lambda p: make_text_file(p / "x.jpg").read_bytes(), 415, "text"),
        (lambda p: bytes(range(256)) * 8, 415, "not a recognised image"),
        (lambda p: b"", 400, "empty"),
        (lambda p: make_truncated_jpeg(p / "t.jpg").read_bytes(), 422, "truncated"),
        (lambda p: make_decompression_bomb_png(p / "b.png").read_bytes(), 413, "decompression bomb"),
        (lambda p: make_dicom(p / "n.dcm", with_pixels=False).read_bytes(), 422, "no pixel data"),
        (lambda p: make_nifti(p / "v.nii.gz").read_bytes(), 422, "volume"),
        (
            lambda p: (Image.new("L", (8, 8)).save(buf := io.BytesIO(), format="GIF"), buf.getvalue())[1],
            415,
            "GIF",
        ),
    ],
    ids=["text", "garbage", "empty", "truncated", "bomb", "dicom-no-pixels", "volume-to-2d", "gif"],
)
def test_bad_uploads_are_rejected_with_a_clear_status(tmp_path, make, status, words):
    err = _reject(make(tmp_path))
    assert err.status == status
    assert words.lower() in err.message.lower()
    assert err.to_json()["error"] == err.message


def test_size_limit_in_bytes(tmp_path):
    data = make_png(tmp_path / "a.png").read_bytes()
    err = _reject(data, limits=SafetyLimits(max_upload_bytes=len(data) - 1, max_pixels=LIMITS.max_pixels))
    assert err.status == 413 and "too large" in err.message


def test_2d_image_sent_to_a_3d_model(tmp_path):
    err = _reject(make_png(tmp_path / "a.png").read_bytes(), dims=3)
    assert err.status == 415 and "PNG" in err.message


def test_error_messages_never_echo_dicom_identifiers(tmp_path):
    err = _reject(make_dicom(tmp_path / "n.dcm", with_pixels=False, phi=True).read_bytes())
    assert not any(s in err.message for s in phi_strings())


def test_classify_decode_error():
    assert classify_decode_error("decompression bomb guard: ...") == 413
    assert classify_decode_error("unrecognised content: not PNG") == 415
    assert classify_decode_error("corrupt PNG: bad header") == 422


# ------------------------------------------------------------------ middlewares
async def _echo(request: Request) -> JSONResponse:
    body = await request.body()
    return JSONResponse({"n": len(body)})


def _app(**mw) -> TestClient:
    app = Starlette(
        routes=[
            Route("/predict", _echo, methods=["POST"]),
            Route("/readyz", _echo),
            Route("/metadata", _echo),
        ]
    )
    wrapped = UploadLimitMiddleware(app, max_bytes=1000)
    if "api_key" in mw:
        wrapped = APIKeyMiddleware(wrapped, api_key=mw["api_key"])
    return TestClient(wrapped)


def test_upload_limit_declared_and_chunked():
    client = _app()
    assert client.post("/predict", content=b"x" * 999).json() == {"n": 999}
    r = client.post("/predict", content=b"x" * 1001)
    assert r.status_code == 413 and "too large" in r.json()["error"]

    def chunks(n: int):
        for _ in range(n):
            yield b"y" * 300

    assert client.post("/predict", content=chunks(3)).json() == {"n": 900}  # no Content-Length: chunked
    assert client.post("/predict", content=chunks(4)).status_code == 413


def test_api_key_enforced_only_when_configured():
    open_client = _app(api_key=None)
    assert open_client.post("/predict", content=b"a").status_code == 200
    client = _app(api_key="s3cret")
    assert client.post("/predict", content=b"a").status_code == 401
    assert client.get("/metadata").status_code == 401
    assert client.post("/predict", content=b"a", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert (
        client.post("/predict", content=b"a", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    )
    assert client.post("/predict", content=b"a", headers={"X-API-Key": "s3cret"}).status_code == 200
    assert client.get("/readyz").status_code == 200  # probes stay open
    r = client.get("/metadata")
    assert "API key" in r.json()["error"] and r.headers["www-authenticate"].startswith("Bearer")


def test_extract_key():
    assert extract_key([(b"authorization", b"Bearer abc")]) == "abc"
    assert extract_key([(b"x-api-key", b" k ")]) == "k"
    assert extract_key([(b"authorization", b"Basic abc")]) is None


# ------------------------------------------------------------------ prediction log
def test_prediction_log_round_trip_without_phi(tmp_path):
    img = decode_upload(make_dicom(tmp_path / "p.dcm", phi=True).read_bytes(), 2, LIMITS)
    stats = image_statistics(img)
    assert 0 <= stats["intensity_p01"] <= stats["intensity_mean"] <= stats["intensity_p99"] <= 1
    rec = {
        "model_name": "m",
        "model_version": "v1",
        "probability": 0.7,
        "width": 64,
        "height": 64,
        "format": "dicom",
        "PatientName": "DOE^JANE",
        "path": "/secret/DOE_JANE.dcm",
        **stats,
    }
    path = append_prediction(tmp_path / "log", rec)
    append_prediction(tmp_path / "log", {**rec, "probability": 0.2})
    with path.open("a") as fh:
        fh.write('{"broken": \n')  # a crash mid-write must not break the reader
    text = path.read_text()
    assert "DOE" not in text and "secret" not in text
    df = read_prediction_log(tmp_path / "log")
    assert list(df.columns) == LOG_COLUMNS
    assert df["probability"].tolist() == [0.7, 0.2]
    assert str(df["timestamp"].dt.tz) == "UTC"
    assert len(read_prediction_log(tmp_path / "log", since=datetime.now(UTC) + timedelta(hours=1))) == 0
    assert json.loads(text.splitlines()[0])["model_version"] == "v1"


def test_read_empty_log_dir(tmp_path):
    df = read_prediction_log(tmp_path / "none")
    assert df.empty and list(df.columns) == LOG_COLUMNS


# ------------------------------------------------------------------ decode budget (issue 16)
def test_decode_budget_is_checked_from_the_header_before_decoding(tmp_path):
    import struct
    import zlib

    from bonefrac.serving.input_safety import decode_memory_estimate

    def header_only_png(w: int, h: int, depth: int, colour: int) -> bytes:
        def chunk(tag: bytes, body: bytes) -> bytes:
            return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

        ihdr = struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, 0)
        idat = chunk(b"IDAT", zlib.compress(b"\x00"))
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")

    rgba16 = header_only_png(6000, 6000, 16, 6)  # 36 Mpx: under max_pixels, 8 bytes per stored pixel
    assert decode_memory_estimate(rgba16, "png") == 6000 * 6000 * (2 * 8 + 16 + 16)
    assert decode_memory_estimate(header_only_png(100, 100, 8, 0), "png") == 100 * 100 * (2 * 1 + 4 + 16)
    err = _reject(rgba16, limits=SafetyLimits(max_pixels=60_000_000))  # default budget: 1024 MB
    assert err.status == 413 and "decode budget" in err.message
    gray = make_png(tmp_path / "g.png", size=(64, 64)).read_bytes()
    assert _reject(gray, limits=SafetyLimits(max_decoded_bytes=1000)).status == 413
    decode_upload(gray, 2, SafetyLimits())
    dcm = make_dicom(tmp_path / "d.dcm").read_bytes()
    assert decode_memory_estimate(dcm, "dicom") == 64 * 64 * (2 + 4 + 16 + 8)
    assert decode_memory_estimate(b"\x89PNG\r\n\x1a\nbroken", "png") is None  # the decoder names the problem


@pytest.mark.parametrize("name", ["ExplVR_BigEndNoMeta.dcm", "ExplVR_LitEndNoMeta.dcm"])
def test_preambleless_dicom_upload_is_read_as_dicom(name):
    """A DICOM without preamble or file meta, in either byte order, is judged by its header.

    The magic-number sniffer calls the big-endian one "unknown"; the upload gate must still
    try it as DICOM (as ingest does) and refuse it for what it is: an RT plan.
    """
    from pydicom.data import get_testdata_file

    with open(get_testdata_file(name, download=False), "rb") as fh:
        err = _reject(fh.read())
    assert err.status == 422 and str(err).startswith("DICOM modality RTPLAN refused"), str(err)
