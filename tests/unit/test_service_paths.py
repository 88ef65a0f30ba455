"""Unknown paths become one label before BentoML's request metrics read the path (issue 16)."""

from __future__ import annotations

import asyncio

import bentoml

from bonefrac.serving.paths import (
    PUBLIC_PATHS,
    UNKNOWN_PATH,
    UnknownPathMiddleware,
    install_before_bentoml_middleware,
)


def _seen_paths(paths: list[str]) -> list[str]:
    seen: list[str] = []

    async def app(scope, receive, send) -> None:
        seen.append(scope["path"])

    guard = UnknownPathMiddleware(app)
    for p in paths:
        asyncio.run(guard({"type": "http", "path": p, "raw_path": p.encode()}, None, None))
    return seen


def test_unknown_paths_share_one_label_and_public_ones_pass():
    public = ["/predict", "/explain", "/metadata", "/metrics", "/readyz", "/", "/ui/viewer.js", "/schema.json"]
    assert set(public) <= PUBLIC_PATHS
    probes = [f"/probe-{i}" for i in range(50)] + ["/predict/../etc/passwd", "/ui/nope.js", "/.env", "/predict/"]
    assert _seen_paths(public) == public
    assert set(_seen_paths(probes)) == {UNKNOWN_PATH}
    assert UNKNOWN_PATH not in PUBLIC_PATHS


@bentoml.service(name="bonefrac_paths_probe")
class _Probe:
    @bentoml.api
    def ping(self) -> str:
        return "pong"


@bentoml.service(name="bonefrac_paths_other")
class _Other:
    @bentoml.api
    def ping(self) -> str:
        return "pong"


def test_the_guard_runs_before_bentomls_metrics_middleware():
    """Added through BentoML's own add_asgi_middleware it would run after the metrics had read the path."""
    install_before_bentoml_middleware(_Probe.name, UnknownPathMiddleware, known={"/ping"})
    install_before_bentoml_middleware(_Probe.name, UnknownPathMiddleware, known={"/ping"})  # idempotent
    names = [m.cls.__name__ for m in _Probe.to_asgi(is_main=True).user_middleware]
    assert names.count("UnknownPathMiddleware") == 1
    assert names.index("UnknownPathMiddleware") < names.index("RunnerTrafficMetricsMiddleware"), names
    # Only the service it was installed for (the model service's internal app keeps its own routes).
    assert "UnknownPathMiddleware" not in [m.cls.__name__ for m in _Other.to_asgi(is_main=True).user_middleware]
