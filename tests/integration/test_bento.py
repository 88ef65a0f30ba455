"""A Bento an ops team can ship, and a service that follows the registry.

One test, one server (start-up costs tens of seconds here): ``bentoml build`` twice in
a row with BENTOML_HOME inside the build context (as ``env.mk`` sets it), the champion
packed in the Bento, ``bentoml serve bonefrac:latest`` with no BONEFRAC_MODEL_PATH
answering ``/predict``, then ``bonefrac promote --force`` and ``bonefrac rollback``
changing what the running service answers within seconds. ``bentoml containerize``
needs a Docker engine, which this machine lacks: not run here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from tests._factories import make_png
from tests.integration._server import ROOT, make_tiny_bundle, running_server
from typer.testing import CliRunner

pytestmark = pytest.mark.integration

BUILD_TWICE = """
import bentoml
for _ in range(2):  # what `bentoml build` runs, twice in one process (one import of the service)
    print(bentoml.bentos.build_bentofile("bentofile.yaml", build_ctx=".").tag)
"""


def _metadata_version(client: httpx.Client, want: str, timeout_s: float = 30.0) -> tuple[str, float]:
    t0 = time.monotonic()
    while True:
        version = client.get("/metadata").json()["model"]["version"]
        if version == want or time.monotonic() - t0 > timeout_s:
            return version, time.monotonic() - t0
        time.sleep(0.25)


def test_bento_built_twice_serves_the_champion_and_follows_promote_and_rollback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bonefrac.cli import app
    from bonefrac.data.phantom import render_phantom
    from bonefrac.registry import store

    bindir = os.path.dirname(sys.executable)
    if not (shutil.which("uv") or os.path.exists(os.path.join(bindir, "uv"))):
        pytest.skip("`uv` is not installed: bentoml build needs it offline (pip install uv)")
    # The project as the build context, its model store inside it (env.mk: BENTOML_HOME := .bentoml).
    ctx = tmp_path / "project"
    shutil.copytree(ROOT / "src", ctx / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("bentofile.yaml", "params.yaml"):
        shutil.copy(ROOT / name, ctx / name)
    home = ctx / ".bentoml"
    monkeypatch.setenv("BENTOML_HOME", str(home))
    champion = store.register_model(
        make_tiny_bundle(tmp_path / "a.pt", seed=0), name="bonefrac", data_version="d" * 32, git_commit="c" * 40
    )
    store.promote(champion)
    challenger = store.register_model(make_tiny_bundle(tmp_path / "b.pt", seed=1), name="bonefrac")
    a, b = champion.split(":")[1], challenger.split(":")[1]

    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "BENTOML_HOME": str(home)}
    env.pop("BONEFRAC_MODEL_PATH", None)
    r = subprocess.run(
        [sys.executable, "-c", BUILD_TWICE], cwd=ctx, env=env, capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    first, second = (home / "bentos" / "bonefrac" / t.split(":")[1] for t in r.stdout.split()[-2:])
    files = [sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()) for d in (first, second)]
    assert files[0] == files[1]  # the second Bento did not swallow the first
    assert not any(".bentoml" in f for f in files[1]) and "src/params.yaml" in files[1]
    meta = yaml.safe_load((second / "bento.yaml").read_text())
    model_svc = next(s for s in meta["services"] if s["name"] == "bonefrac_model")
    assert [m["tag"] for m in model_svc["models"]] == [champion]  # the champion is inside (a model reference)
    assert model_svc["config"]["resources"] == {"cpu": "2"}  # built for CPU: no GPU declared
    assert "timm==" in (second / "env" / "python" / "requirements.txt").read_text()
    dockerfile = (second / "env" / "docker" / "Dockerfile").read_text()
    assert "nvidia/cuda" not in dockerfile and "PYTHONPATH=/home/bentoml/bento/src/src" in dockerfile

    image = render_phantom(np.random.default_rng(3), 256, "oblique", "frontal", 8)[0]
    phantom = make_png(tmp_path / "phantom.png", array=image)
    cli = CliRunner()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())  # models/reports in tmp: no drift reference
    params["paths"] = {k: str(tmp_path / k) for k in ("processed", "models", "reports")}  # of the project's touched
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    with running_server(
        None,
        tmp_path / "serve",
        target="bonefrac:latest",
        BENTOML_HOME=str(home),
        BONEFRAC_REGISTRY_POLL_S="0.5",
        BONEFRAC_BACKEND="torch",
    ) as srv, httpx.Client(base_url=srv.url, timeout=60) as client:
        m = client.get("/metadata").json()["model"]
        assert m["version"] == a and m["data_version"] == "d" * 32 and m["git_commit"] == "c" * 40
        answer = client.post("/predict", files={"file": ("p.png", phantom.read_bytes())})
        assert answer.status_code == 200 and answer.json()["model"]["version"] == a, answer.text

        assert cli.invoke(app, ["promote", challenger, "--force"])  # params.yaml: tmp_path.exit_code == 0
        version, took = _metadata_version(client, b)
        assert version == b, srv.log_text()[-3000:]
        print(f"promote reached the service in {took:.1f} s")
        answer = client.post("/predict", files={"file": ("p.png", phantom.read_bytes())})
        assert answer.json()["model"]["version"] == b

        assert cli.invoke(app, ["rollback"]).exit_code == 0
        version, took = _metadata_version(client, a)
        assert version == a, srv.log_text()[-3000:]
        print(f"rollback reached the service in {took:.1f} s")
        reload = client.post("/admin/reload")
        assert reload.status_code == 200 and reload.json()["changed"] is False, reload.text
        assert "model reloaded" in srv.log_text()
