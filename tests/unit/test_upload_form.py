"""The strict upload reader and the error shape in front of BentoML's input parsing (issue 16)."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from bonefrac.serving.auth import APIKeyMiddleware, require_api_key, sent_credentials
from bonefrac.serving.input_safety import InputRejected
from bonefrac.serving.upload_form import (
    MAX_PARTS,
    ErrorShapeMiddleware,
    UploadFormMiddleware,
    canonical_multipart,
    read_upload,
)


async def _form(request: Request) -> JSONResponse:
    form = await request.form()
    f = form["file"]
    return JSONResponse(
        {"n": len(await f.read()), "name": f.filename, "opacity": form.get("opacity"), "pixels": form.get("pixels")}
    )


async def _boom(request: Request) -> PlainTextResponse:
    raise RuntimeError("secret detail")


def _client() -> TestClient:
    app = Starlette(routes=[Route("/predict", _form, methods=["POST"]), Route("/boom", _boom)])
    return TestClient(ErrorShapeMiddleware(UploadFormMiddleware(app, max_bytes=10_000)), raise_server_exceptions=False)


def _status(fn, *args) -> int:
    with pytest.raises(InputRejected) as info:
        fn(*args)
    return info.value.status


def test_read_upload_accepts_a_file_part_or_a_raw_body():
    body, ctype = canonical_multipart(b"\x89PNGdata", 0.25)
    assert read_upload(ctype, body) == (b"\x89PNGdata", 0.25, None)
    assert read_upload(b"application/octet-stream", b"abc", b"opacity=0.5") == (b"abc", 0.5, None)
    assert read_upload(b"image/png", b"abc") == (b"abc", None, None)


def test_pixels_option_from_a_form_field_or_the_query():
    """/explain's opt-out of the full-resolution copy: ``pixels=none`` as a form field or in the query."""
    body, ctype = canonical_multipart(b"img", None, "none")
    assert read_upload(ctype, body) == (b"img", None, "none")
    body, ctype = canonical_multipart(b"img", 0.5)
    assert read_upload(ctype, body, b"pixels=none") == (b"img", 0.5, "none")  # curl -F file=@x '...?pixels=none'
    assert read_upload(b"image/png", b"abc", b"pixels=FULL") == (b"abc", None, "full")
    assert _status(read_upload, b"image/png", b"abc", b"pixels=half") == 400
    assert _status(read_upload, *reversed(canonical_multipart(b"img", None, "some"))) == 400
    r = _client().post("/predict?pixels=none", files={"file": ("a.png", b"12345")})
    assert r.json()["pixels"] == "none"  # the app (BentoML) gets it as a canonical form field


def test_read_upload_refuses_every_other_shape():
    assert _status(read_upload, b"application/x-www-form-urlencoded", b"file=http://127.0.0.1/x") == 415
    assert _status(read_upload, b"", b"x") == 415
    assert _status(read_upload, b"multipart/form-data", b"--x\r\n") == 400  # no boundary
    text = b'--b\r\nContent-Disposition: form-data; name="file"\r\n\r\nhttp://127.0.0.1:1/x\r\n--b--\r\n'
    assert _status(read_upload, b"multipart/form-data; boundary=b", text) == 400  # text field: no URL fetch
    other = b'--b\r\nContent-Disposition: form-data; name="other"; filename="a"\r\n\r\nx\r\n--b--\r\n'
    assert _status(read_upload, b"multipart/form-data; boundary=b", other) == 400
    many = b"".join(
        b'--b\r\nContent-Disposition: form-data; name="f%d"\r\n\r\nx\r\n' % i for i in range(MAX_PARTS + 1)
    )
    assert _status(read_upload, b"multipart/form-data; boundary=b", many + b"--b--\r\n") == 400
    truncated = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\nxx'
    assert _status(read_upload, b"multipart/form-data; boundary=b", truncated) == 400
    assert _status(read_upload, b"application/octet-stream", b"x", b"opacity=nan") == 400


def test_middleware_hands_the_app_a_canonical_form_and_long_names_are_dropped():
    c = _client()
    r = c.post("/predict", files={"file": ("x" * 400 + ".png", b"12345")}, data={"opacity": "0.3"})
    assert r.json() == {"n": 5, "name": "upload", "opacity": "0.3", "pixels": None}
    r = c.post("/predict", content=b"123", headers={"content-type": "application/octet-stream"})
    assert r.json()["n"] == 3
    r = c.post("/predict", data={f"k{i}": "v" for i in range(1200)})
    assert r.status_code == 415 and r.json()["status"] == 415
    r = c.post("/predict", content=b"x" * 20_000, headers={"content-type": "application/octet-stream"})
    assert r.status_code == 413


def test_error_shape_never_500():
    r = _client().get("/boom")
    assert r.status_code == 503 and r.json()["status"] == 503 and "secret" not in r.text
    r = _client().get("/nope")
    assert r.status_code == 404 and r.json() == {"error": "Not Found", "status": 404}


def test_conflicting_credentials_and_key_required():
    assert sent_credentials([(b"authorization", b"Bearer k"), (b"x-api-key", b"k")]) == "k"
    for headers in (
        [(b"authorization", b"Bearer k"), (b"authorization", b"Bearer k")],
        [(b"x-api-key", b"k"), (b"x-api-key", b"j")],
        [(b"authorization", b"Bearer k"), (b"x-api-key", b"j")],
        [(b"authorization", b"Basic k"), (b"x-api-key", b"k")],
    ):
        with pytest.raises(ValueError):
            sent_credentials(headers)
    app = Starlette(routes=[Route("/metrics", lambda r: PlainTextResponse("m"))])
    c = TestClient(APIKeyMiddleware(app, api_key="k"))
    assert c.get("/metrics").status_code == 401
    assert c.get("/metrics", headers={"X-API-Key": "k"}).status_code == 200
    r = c.get("/metrics", headers=[("X-API-Key", "k"), ("Authorization", "Bearer j")])
    assert r.status_code == 400 and r.json()["status"] == 400
    with pytest.raises(RuntimeError, match="BONEFRAC_INSECURE_LOCAL=1"):
        require_api_key(None, insecure_local=False)
    require_api_key(None, insecure_local=True)
    require_api_key("k", insecure_local=False)
