"""The public service's paths, and one 404 for every other path before BentoML's metrics see it.

BentoML 1.4 labels its request metrics (``RunnerTrafficMetricsMiddleware``, the
first middleware of every service app) with the raw request path: each distinct
404 path a scanner tries became a new series in the Prometheus registry (200
random paths: /metrics 138 KB → 878 KB; issue 16), kept for the life of the
process in the multiprocess metric files. Filtering ``/metrics`` output hid the
series but not their cost. :class:`UnknownPathMiddleware` fixes it at the source:
any path outside :data:`PUBLIC_PATHS` becomes :data:`UNKNOWN_PATH` before the
metrics middleware reads it, so all of them share one series (their 404s are
still counted) and the app answers the 404 as for any unknown path.

BentoML's ``add_asgi_middleware`` puts user middleware *inside* its own (metrics,
tracing, access log), so :func:`install_before_bentoml_middleware` prepends ours
to the public service's app; the model service's internal app is left as it is.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bonefrac.serving.auth import ASGIApp, Receive, Scope, Send

#: What every path outside the public ones is relabelled to (it matches no route: a 404).
UNKNOWN_PATH = "/_unknown"

STATIC_DIR = Path(__file__).parent / "static"


def public_paths(static_dir: Path = STATIC_DIR) -> frozenset[str]:
    """Every path the public service answers: the API, the viewer and its files, the probes, /metrics,
    ``/admin/reload`` (behind the key: load a new champion now), and ``/schema.json`` (BentoML's own
    clients read it)."""
    static = {f"/ui/{p.name}" for p in static_dir.iterdir() if p.is_file()}
    api = {"/predict", "/explain", "/metadata", "/metrics", "/livez", "/readyz", "/healthz", "/schema.json"}
    api.add("/admin/reload")
    return frozenset({*api, "/", "/index.html", "/ui/", *static})


PUBLIC_PATHS = public_paths()


class UnknownPathMiddleware:
    """Relabel every HTTP path outside ``known`` as :data:`UNKNOWN_PATH` (one metric series, a 404)."""

    def __init__(self, app: ASGIApp, known: Iterable[str] = PUBLIC_PATHS) -> None:
        self.app = app
        self.known = frozenset(known)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") in ("http", "websocket") and scope.get("path") not in self.known:
            scope = {**scope, "path": UNKNOWN_PATH, "raw_path": UNKNOWN_PATH.encode()}
        await self.app(scope, receive, send)


def install_before_bentoml_middleware(service_name: str, middleware: type, **options: Any) -> None:
    """Make ``middleware`` the outermost middleware of the app BentoML builds for ``service_name``.

    Wraps ``ServiceAppFactory.middlewares`` (the list BentoML hands to Starlette,
    outermost first). Idempotent per (service, middleware). Fails loudly at import
    if a BentoML upgrade moved the factory, rather than silently growing labels again.
    """
    from _bentoml_impl.server.app import ServiceAppFactory
    from starlette.middleware import Middleware

    prop = ServiceAppFactory.middlewares
    if not isinstance(prop, property) or prop.fget is None:
        raise RuntimeError("BentoML's ServiceAppFactory.middlewares is not a property: update bonefrac.serving.paths")
    first: dict[str, list[tuple[type, dict[str, Any]]]] = getattr(prop.fget, "_bonefrac_first", None) or {}
    if not first:
        original = prop.fget

        def middlewares(self: Any) -> list[Any]:
            own = [Middleware(cls, **opts) for cls, opts in first.get(self.service.name, [])]
            return [*own, *original(self)]

        middlewares._bonefrac_first = first  # type: ignore[attr-defined]
        ServiceAppFactory.middlewares = property(middlewares)  # type: ignore[method-assign,assignment]
    mine = first.setdefault(service_name, [])
    if all(cls is not middleware for cls, _ in mine):
        mine.append((middleware, options))
