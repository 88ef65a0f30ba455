"""API-key authentication for the service, as ASGI middleware.

The service requires ``BONEFRAC_API_KEY`` unless ``serving.insecure_local``
(``BONEFRAC_INSECURE_LOCAL=1``) says it runs on a trusted machine (see
:func:`require_api_key`). With a key, the model endpoints and ``/metrics`` need
``Authorization: Bearer <key>`` or ``X-API-Key: <key>``; without it they answer
401. Credentials that contradict each other (two ``Authorization`` headers, two
``X-API-Key`` headers, or both kinds with different values) are a 400: which one
counts would otherwise depend on header order. Probes (``/livez``, ``/readyz``,
``/healthz``) and the viewer's static files stay open so orchestrators and browsers
can load them; the viewer asks for the key when the API answers 401. Middleware
(rather than a check in each endpoint) rejects the request before its body is read.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PROTECTED_PREFIXES: tuple[str, ...] = (
    "/predict", "/explain", "/metadata", "/infer", "/cam", "/metrics", "/admin", "/reload", "/info"
)

INSECURE_HINT = (
    "BONEFRAC_API_KEY is not set: the service requires an API key. Set BONEFRAC_API_KEY to a secret, "
    "or set BONEFRAC_INSECURE_LOCAL=1 (params.yaml serving.insecure_local: true) to run without "
    "authentication on a trusted machine (a laptop, tests, `make serve`)."
)


class ConflictingCredentials(ValueError):
    """The request carries more than one credential, and they differ or repeat a header."""


def require_api_key(api_key: str | None, insecure_local: bool) -> None:
    """Refuse to serve without a key unless running without one was asked for explicitly."""
    if not api_key and not insecure_local:
        raise RuntimeError(INSECURE_HINT)


def sent_credentials(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The one key the request sends, or ``None``; :class:`ConflictingCredentials` if ambiguous.

    Two ``Authorization`` or two ``X-API-Key`` headers are ambiguous even when equal;
    one of each must carry the same key.
    """
    auth = [v for k, v in headers if k.lower() == b"authorization"]
    xkey = [v for k, v in headers if k.lower() == b"x-api-key"]
    if len(auth) > 1 or len(xkey) > 1:
        raise ConflictingCredentials("more than one Authorization or X-API-Key header")
    sent: list[str] = []
    if auth:
        scheme, _, token = auth[0].decode("latin-1").partition(" ")
        # A non-Bearer Authorization is a credential too: it cannot silently lose to X-API-Key.
        sent.append(token.strip() if scheme.lower() == "bearer" and token.strip() else "\0" + auth[0].decode("latin-1"))
    if xkey:
        sent.append(xkey[0].decode("latin-1").strip())
    if len(sent) == 2 and not hmac.compare_digest(sent[0].encode(), sent[1].encode()):
        raise ConflictingCredentials("Authorization and X-API-Key carry different keys")
    return sent[0] if sent else None


def extract_key(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The key a client sent, from ``Authorization: Bearer`` or ``X-API-Key``."""
    for name, value in headers:
        lname = name.lower()
        if lname == b"x-api-key":
            return value.decode("latin-1").strip()
        if lname == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def key_is_valid(sent: str | None, expected: str) -> bool:
    # Constant-time comparison: the time taken does not reveal how much matched.
    return sent is not None and hmac.compare_digest(sent.encode(), expected.encode())


async def send_json_error(
    send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps({"error": message, "status": int(status)}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"x-bonefrac-error", b"1"),  # already {"error", "status"}: ErrorShapeMiddleware passes it on
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class APIKeyMiddleware:
    """Reject requests to protected paths that lack the configured key (401)."""

    def __init__(
        self,
        app: ASGIApp,
        api_key: str | None = None,
        protected_prefixes: tuple[str, ...] = PROTECTED_PREFIXES,
    ) -> None:
        self.app = app
        self.api_key = api_key or None
        self.protected_prefixes = protected_prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.api_key
            and scope.get("type") == "http"
            and scope.get("path", "").startswith(self.protected_prefixes)
            and scope.get("method") != "OPTIONS"
        ):
            try:
                sent = sent_credentials(scope.get("headers", []))
            except ConflictingCredentials as err:
                await send_json_error(send, 400, f"conflicting credentials: {err}; send exactly one key")
                return
            if key_is_valid(sent, self.api_key):
                await self.app(scope, receive, send)
                return
            await send_json_error(
                send,
                401,
                "missing or invalid API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                [(b"www-authenticate", b'Bearer realm="bonefrac"')],
            )
            return
        await self.app(scope, receive, send)


async def read_body_bounded(receive: Receive, send: Send, max_bytes: int, too_large: str) -> bytes | None:
    """The whole request body, or ``None`` when the client left or it passed ``max_bytes`` (then a 413
    has been sent). Both upload middlewares read through this, so the bound is enforced one way."""
    chunks: list[bytes] = []
    total = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body = message.get("body", b"")
        total += len(body)
        if total > max_bytes:
            await send_json_error(send, 413, too_large)
            return None
        chunks.append(body)
        if not message.get("more_body", False):
            return b"".join(chunks)
