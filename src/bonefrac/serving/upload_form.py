"""Read an upload ourselves, strictly, before BentoML's input parsing sees it.

BentoML's ``Path`` input parses the body with Starlette's form parser and then:
fetches a text ``file`` field as a URL (server-side request forgery), writes the
client's file name to a temporary path (a 300-character name is a 500), answers 500
to form-urlencoded bodies, a multipart body without a boundary, a missing ``file``
field or more than 1,000 fields. So :class:`UploadFormMiddleware` reads the body of
``POST /predict`` and ``POST /explain`` (bounded by the upload limit) and accepts
exactly two shapes:

* ``multipart/form-data`` with one ``file`` part that is a file (it has a
  ``filename``), optionally an ``opacity`` field (a number in [0, 1]) and a ``pixels``
  field (``full`` | ``none``), nothing else; at most :data:`MAX_PARTS` parts, each
  part's headers bounded;
* a raw body (``application/octet-stream``, ``application/dicom`` or ``image/*``),
  with ``opacity`` in the query string.

``pixels`` may also come in the query string with either shape (``/explain?pixels=none``):
``none`` leaves the full-resolution reading copy out of ``/explain``'s answer (megabytes for a
large radiograph; API clients that only want the decision and the overlay skip it).

Anything else is a 4xx JSON answer naming the problem (never the client's file or
field names). What passes is re-encoded as a canonical multipart body (one ``file``
part named ``upload``, the number ``opacity``, ``pixels``), so BentoML only ever parses input it
cannot fail on. No URL is ever fetched: a text field named ``file`` is refused.

:class:`ErrorShapeMiddleware` is the last line: every error answer becomes
``{"error": ..., "status": ...}`` JSON, and an unexpected 5xx (a bug, BentoML's own
500) becomes a 503 with a generic message, logged without the request's content.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs

from python_multipart.multipart import MultipartParser, parse_options_header

from bonefrac.serving.auth import ASGIApp, Receive, Scope, Send, read_body_bounded, send_json_error
from bonefrac.serving.input_safety import InputRejected

logger = logging.getLogger("bonefrac.serving")

#: Most parts a multipart upload may have (``file``, ``opacity``, ``pixels``; more is refused anyway).
MAX_PARTS = 4
RAW_MEDIA_TYPES = frozenset({b"application/octet-stream", b"application/dicom"})
ALLOWED_FIELDS = frozenset({"file", "opacity", "pixels"})
#: What ``/explain`` may send of the image's own pixels: all of them (the viewer's default) or none.
PIXELS_CHOICES = ("full", "none")
HOW_TO = "send the image as multipart/form-data with a 'file' field (curl -F file=@image.png), or as the raw body"


def _reject(status: int, message: str) -> InputRejected:
    return InputRejected(status, message)


def _opacity(raw: str | bytes) -> float:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    try:
        value = float(text.strip()[:32])
    except ValueError:
        raise _reject(HTTPStatus.BAD_REQUEST, "opacity must be a number between 0 and 1") from None
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise _reject(HTTPStatus.BAD_REQUEST, "opacity must be a number between 0 and 1")
    return value


def _pixels(raw: str | bytes) -> str:
    text = (raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw).strip().lower()[:16]
    if text not in PIXELS_CHOICES:
        raise _reject(HTTPStatus.BAD_REQUEST, "pixels must be 'full' or 'none'")
    return text


class _Part:
    __slots__ = ("chunks", "headers", "name", "value_header")

    def __init__(self) -> None:
        self.headers: dict[bytes, bytes] = {}
        self.chunks: list[bytes] = []
        self.name = b""
        self.value_header = b""


def parse_multipart(body: bytes, boundary: bytes) -> dict[str, tuple[bytes, bool]]:
    """``{field name: (content, is_a_file)}`` of a multipart body; :class:`InputRejected` if malformed."""
    if not boundary or len(boundary) > 200:
        raise _reject(HTTPStatus.BAD_REQUEST, "multipart body without a valid boundary parameter")
    parts: list[_Part] = []
    state: dict[str, Any] = {"field": b"", "value": b"", "ended": False}

    def on_part_begin() -> None:
        if len(parts) >= MAX_PARTS:
            raise _reject(HTTPStatus.BAD_REQUEST, f"too many form fields: at most {MAX_PARTS}; {HOW_TO}")
        parts.append(_Part())

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        parts[-1].headers[state["field"].strip().lower()] = state["value"].strip()
        state["field"], state["value"] = b"", b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1].chunks.append(data[start:end])

    def on_end() -> None:
        state["ended"] = True

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_part_data": on_part_data,
            "on_end": on_end,
        },
        max_size=len(body),
    )
    try:
        parser.write(body)
        parser.finalize()
    except InputRejected:
        raise
    except Exception:  # python-multipart's errors quote the input: name none of it
        raise _reject(HTTPStatus.BAD_REQUEST, f"malformed multipart body; {HOW_TO}") from None
    if not state["ended"]:
        raise _reject(HTTPStatus.BAD_REQUEST, "truncated multipart body (no closing boundary)")
    fields: dict[str, tuple[bytes, bool]] = {}
    for part in parts:
        disposition, params = parse_options_header(part.headers.get(b"content-disposition", b""))
        name = params.get(b"name", b"").decode("latin-1")
        if disposition != b"form-data" or not name:
            raise _reject(HTTPStatus.BAD_REQUEST, f"a multipart part without a form-data name; {HOW_TO}")
        if name not in ALLOWED_FIELDS:
            raise _reject(
                HTTPStatus.BAD_REQUEST, f"unexpected form field: only 'file', 'opacity' and 'pixels' are read; {HOW_TO}"
            )
        if name in fields:
            raise _reject(HTTPStatus.BAD_REQUEST, f"more than one '{name}' field: send one image per request")
        fields[name] = (b"".join(part.chunks), b"filename" in params)
    return fields


def read_upload(
    content_type: bytes, body: bytes, query_string: bytes = b""
) -> tuple[bytes, float | None, str | None]:
    """(file bytes, opacity or None, pixels or None) from a request; :class:`InputRejected` for any other shape."""
    media, params = parse_options_header(content_type or b"")
    media = media.lower()
    query = parse_qs(query_string.decode("latin-1"), max_num_fields=8)
    pixels = _pixels(query["pixels"][0]) if "pixels" in query else None
    if media == b"multipart/form-data":
        fields = parse_multipart(body, params.get(b"boundary", b""))
        if "file" not in fields:
            raise _reject(HTTPStatus.BAD_REQUEST, f"no 'file' field in the form; {HOW_TO}")
        data, is_file = fields["file"]
        if not is_file:
            raise _reject(
                HTTPStatus.BAD_REQUEST,
                "'file' must be an uploaded file (a part with a filename), not a text field; URLs are not fetched",
            )
        opacity = _opacity(fields["opacity"][0]) if "opacity" in fields else None
        if "pixels" in fields:
            pixels = _pixels(fields["pixels"][0])
        return data, opacity, pixels
    if media in RAW_MEDIA_TYPES or media.startswith(b"image/"):
        opacity = _opacity(query["opacity"][0]) if "opacity" in query else None
        return body, opacity, pixels
    what = "no Content-Type" if not media else "this Content-Type"
    raise _reject(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"{what} is not accepted: {HOW_TO}")


def canonical_multipart(data: bytes, opacity: float | None, pixels: str | None = None) -> tuple[bytes, bytes]:
    """(body, content-type) of the one form BentoML gets to parse."""
    boundary = secrets.token_hex(16).encode()
    while boundary in data:  # pragma: no cover - 128 random bits
        boundary = secrets.token_hex(16).encode()
    head = b"--" + boundary + b"\r\n"
    out = [
        head,
        b'Content-Disposition: form-data; name="file"; filename="upload"\r\n',
        b"Content-Type: application/octet-stream\r\n\r\n",
        data,
        b"\r\n",
    ]
    if opacity is not None:
        out += [head, b'Content-Disposition: form-data; name="opacity"\r\n\r\n', repr(opacity).encode(), b"\r\n"]
    if pixels is not None:
        out += [head, b'Content-Disposition: form-data; name="pixels"\r\n\r\n', pixels.encode(), b"\r\n"]
    out.append(b"--" + boundary + b"--\r\n")
    return b"".join(out), b"multipart/form-data; boundary=" + boundary


class UploadFormMiddleware:
    """Parse ``POST`` bodies of ``paths`` strictly and hand the app a canonical multipart form."""

    def __init__(self, app: ASGIApp, max_bytes: int, paths: tuple[str, ...] = ("/predict", "/explain")) -> None:
        self.app = app
        self.max_bytes = int(max_bytes)
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope.get("type") != "http"
            or scope.get("method") != "POST"
            or scope.get("path", "").rstrip("/") not in self.paths
        ):
            await self.app(scope, receive, send)
            return
        raw = await read_body_bounded(
            receive, send, self.max_bytes, f"upload too large: the limit is {self.max_bytes} bytes"
        )
        if raw is None:
            return
        headers = [(k.lower(), v) for k, v in scope.get("headers", [])]
        content_type = next((v for k, v in headers if k == b"content-type"), b"")
        try:
            data, opacity, pixels = read_upload(content_type, raw, scope.get("query_string", b""))
        except InputRejected as exc:
            await send_json_error(send, exc.status, exc.message)
            return
        del raw
        canonical, ctype = canonical_multipart(data, opacity, pixels)
        del data
        kept = [(k, v) for k, v in headers if k not in (b"content-type", b"content-length", b"transfer-encoding")]
        scope = {
            **scope,
            "headers": [*kept, (b"content-type", ctype), (b"content-length", str(len(canonical)).encode())],
            "query_string": b"",
        }
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent, canonical
            if not sent:
                sent = True
                body, canonical = canonical, b""
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class ErrorShapeMiddleware:
    """Every error answer as ``{"error", "status"}`` JSON; an unexpected 5xx becomes a logged 503."""

    MAX_ERROR_BODY = 64 * 1024

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        state: dict[str, Any] = {"started": False, "status": 0, "held": None, "body": b"", "done": False}

        async def finish() -> None:
            status = state["status"]
            if status >= 500 and status != HTTPStatus.SERVICE_UNAVAILABLE:
                logger.error("an unexpected %d on %s was answered as 503", status, path[:64])
                message = "internal error: the request was not processed; retry shortly"
                status = HTTPStatus.SERVICE_UNAVAILABLE
            else:
                message = _error_text(state["body"], status)
            state["done"] = True
            await send_json_error(send, int(status), message, _passthrough_headers(state["held"]))

        async def guarded(message: dict[str, Any]) -> None:
            if state["done"]:
                return
            if message["type"] == "http.response.start":
                state["started"] = True
                if message["status"] >= 400 and not _is_shaped(message):
                    state["status"], state["held"] = message["status"], message
                    return
                await send(message)
                return
            if message["type"] == "http.response.body" and state["held"] is not None:
                if len(state["body"]) < self.MAX_ERROR_BODY:
                    state["body"] += message.get("body", b"")[: self.MAX_ERROR_BODY]
                if not message.get("more_body", False):
                    await finish()
                return
            await send(message)

        try:
            await self.app(scope, receive, guarded)
        except Exception as err:
            logger.error("unhandled %s on %s: answered 503", type(err).__name__, path[:64])
            if state["done"]:
                return
            if state["started"] and state["held"] is None:
                raise  # the answer is half sent: nothing better than closing the connection
            state["status"] = HTTPStatus.INTERNAL_SERVER_ERROR
            await finish()


def _is_shaped(start: dict[str, Any]) -> bool:
    """Our own error answers (``send_json_error``, ``InputRejected``) are marked; pass them through."""
    return any(k.lower() == b"x-bonefrac-error" for k, _ in start.get("headers", []))


def _passthrough_headers(start: dict[str, Any] | None) -> list[tuple[bytes, bytes]]:
    keep = (b"www-authenticate", b"retry-after", b"allow")
    return [(k, v) for k, v in (start or {}).get("headers", []) if k.lower() in keep]


def _error_text(body: bytes, status: int) -> str:
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("error"), str) and doc["error"]:
        return doc["error"][:500]
    if isinstance(doc, dict) and isinstance(doc.get("detail"), str) and doc["detail"]:
        return doc["detail"][:500]
    text = body.decode("utf-8", "replace").strip() if not doc else ""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "error"
    return (text[:200] if text and "<" not in text else "") or phrase
