"""Turn an untrusted upload into a decoded image, or into a 4xx with a clear message.

The service must never answer 500 to a bad file and must stay healthy afterwards.
Every check that can be done cheaply is done before decoding: the body size (an
ASGI middleware rejects an oversized upload before it is parsed), the format from
the magic bytes, and the declared pixel count from the header (decompression
bombs; :func:`bonefrac.data.imageio.read_image` checks it before decoding). What
remains (truncated or corrupt data, DICOM without pixels, a volume sent to a 2D
model) comes back from the decoder as an :class:`ImageDecodeError` whose message
is safe to return: it names the problem, never a patient identifier.

Status codes: 413 too large (bytes or pixels), 415 not a supported format,
422 a supported format that cannot be used, 400 an empty or missing upload.
"""

from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus

from bonefrac.config import ServingParams
from bonefrac.data.imageio import DecodedImage, ImageDecodeError, read_image, sniff_format
from bonefrac.serving.auth import ASGIApp, Receive, Scope, Send, send_json_error

#: Formats the service accepts, by spatial dims of the model. TIFF/BMP/GIF/WebP decode
#: fine but are not clinical exchange formats; refusing them keeps the contract small.
ACCEPTED_FORMATS: dict[int, frozenset[str]] = {
    2: frozenset({"png", "jpeg", "dicom"}),
    3: frozenset({"dicom", "nifti"}),
}


class InputRejected(Exception):
    """An upload the service refuses; ``status`` is the HTTP status, the message is for the user."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = int(status)
        self.message = message

    def to_json(self) -> dict[str, str | int]:
        return {"error": self.message, "status": self.status}


@dataclass(frozen=True)
class SafetyLimits:
    """Upload limits; the service builds them from ``Params.serving`` (``max_upload_mb``, ``max_pixels``)."""

    max_upload_bytes: int
    max_pixels: int

    @classmethod
    def from_params(cls, serving: ServingParams) -> SafetyLimits:
        return cls(max_upload_bytes=int(serving.max_upload_mb * 1024 * 1024), max_pixels=serving.max_pixels)


def _fmt_mb(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MB"


def classify_decode_error(message: str) -> int:
    """HTTP status for an :class:`ImageDecodeError` message from the decoder."""
    m = message.lower()
    if "decompression bomb" in m or "more than max_pixels" in m:
        return HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    if m.startswith(("unrecognised content", "not an image", "unsupported")):
        return HTTPStatus.UNSUPPORTED_MEDIA_TYPE
    if m.startswith("empty file"):
        return HTTPStatus.BAD_REQUEST
    return HTTPStatus.UNPROCESSABLE_ENTITY


def decode_upload(data: bytes, spatial_dims: int, limits: SafetyLimits) -> DecodedImage:
    """Decode an uploaded file for a model of ``spatial_dims``; raise :class:`InputRejected` if unusable."""
    if not data:
        raise InputRejected(HTTPStatus.BAD_REQUEST, "empty upload: the file has 0 bytes")
    if len(data) > limits.max_upload_bytes:
        raise InputRejected(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            f"upload too large: {_fmt_mb(len(data))}, the limit is {_fmt_mb(limits.max_upload_bytes)}",
        )
    fmt = sniff_format(data[:1024])
    accepted = ACCEPTED_FORMATS[spatial_dims]
    if fmt in ("text", "unknown"):
        what = "text" if fmt == "text" else "not a recognised image"
        raise InputRejected(
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
            f"unsupported file: {what}; send {', '.join(sorted(f.upper() for f in accepted))}",
        )
    if fmt not in accepted:
        if spatial_dims == 2 and fmt == "nifti":
            raise InputRejected(
                HTTPStatus.UNPROCESSABLE_ENTITY,
                "a NIfTI volume was sent to a 2D radiograph model; send a 2D PNG, JPEG or DICOM image",
            )
        raise InputRejected(
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
            f"unsupported format {fmt.upper()}: this model accepts "
            f"{', '.join(sorted(f.upper() for f in accepted))}",
        )
    try:
        img = read_image(data, max_pixels=limits.max_pixels, expected_dims=spatial_dims)
    except ImageDecodeError as err:
        raise InputRejected(classify_decode_error(str(err)), str(err)) from None
    except MemoryError:
        raise InputRejected(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "image too large to decode") from None
    if img.array.size == 0 or min(img.array.shape) < 2:
        raise InputRejected(
            HTTPStatus.UNPROCESSABLE_ENTITY, f"image too small: shape {tuple(img.array.shape)}"
        )
    return img


class UploadLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413 before the app parses them.

    A declared ``Content-Length`` over the limit is refused at once. A body without
    one (chunked) is read here up to the limit and replayed to the app, because once
    the app's multipart parser has started, an error can only become a 500.
    """

    def __init__(
        self, app: ASGIApp, max_bytes: int, paths: tuple[str, ...] = ("/predict", "/explain")
    ) -> None:
        self.app = app
        self.max_bytes = int(max_bytes)
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http" or not scope.get("path", "").startswith(self.paths):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        length = headers.get(b"content-length")
        too_large = (
            f"upload too large: the limit is {_fmt_mb(self.max_bytes)} "
            "(set BONEFRAC_MAX_UPLOAD_MB to change it)"
        )
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await send_json_error(send, 400, "invalid Content-Length header")
                return
            if declared > self.max_bytes:
                await send_json_error(send, 413, too_large)
                return
            await self.app(scope, receive, send)
            return
        # Chunked body: buffer (bounded by the limit), then replay.
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            total += len(body)
            if total > self.max_bytes:
                await send_json_error(send, 413, too_large)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
