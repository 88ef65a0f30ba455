"""Optional API-key authentication for the service, as ASGI middleware.

When ``BONEFRAC_API_KEY`` is set, the model endpoints need
``Authorization: Bearer <key>`` or ``X-API-Key: <key>``; without it they answer
401. Probes (``/livez``, ``/readyz``, ``/healthz``, ``/metrics``) and the viewer's
static files stay open so orchestrators and browsers can load them; the viewer
asks for the key when the API answers 401. Middleware (rather than a check in each
endpoint) rejects the request before its body is read or parsed.
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

PROTECTED_PREFIXES: tuple[str, ...] = ("/predict", "/explain", "/metadata", "/infer", "/cam")


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
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
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
            and not key_is_valid(extract_key(scope.get("headers", [])), self.api_key)
        ):
            await send_json_error(
                send,
                401,
                "missing or invalid API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                [(b"www-authenticate", b'Bearer realm="bonefrac"')],
            )
            return
        await self.app(scope, receive, send)
