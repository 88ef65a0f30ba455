"""The service's upload checks: the intake policy (:mod:`bonefrac.inference.upload_policy`) and the body-size limit.

The decision about a file (accepted formats, pixel and decode budgets, the
decoder's verdict, the status and message) is :mod:`bonefrac.inference.upload_policy`'s,
shared with ``bonefrac predict``; it is re-exported here for the service. This
module adds the ASGI middleware that refuses an oversized body before anything
parses it.
"""

from __future__ import annotations

from bonefrac.inference.upload_policy import (
    ACCEPTED_FORMATS,
    InputRejected,
    SafetyLimits,
    classify_decode_error,
    decode_memory_estimate,
    decode_upload,
)
from bonefrac.inference.upload_policy import _fmt_mb as _fmt_mb
from bonefrac.serving.auth import ASGIApp, Receive, Scope, Send, read_body_bounded, send_json_error

__all__ = [
    "ACCEPTED_FORMATS",
    "InputRejected",
    "SafetyLimits",
    "UploadLimitMiddleware",
    "classify_decode_error",
    "decode_memory_estimate",
    "decode_upload",
]


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
        raw = await read_body_bounded(receive, send, self.max_bytes, too_large)
        if raw is None:
            return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
