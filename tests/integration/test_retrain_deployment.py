"""Issue 18, for real: the ``retrain-nightly`` deployment through a real server and the documented
worker with ``dvc repro`` and the Bento build ON, then drift → retrain through Prefect.

Slow (two real ``dvc repro`` runs of a small phantom pipeline, a ``bentoml build`` and a
``bentoml serve``): ``pytest -m slow tests/integration/test_retrain_deployment.py``. In order:

1. ``prefect deploy`` (retrain-nightly, drift-hourly), ``bonefrac ops worker`` as the docs start it
   (no venv on PATH, nothing but env.sh's lines: BENTOML_HOME comes from env.mk, i.e. the
   project's ``.bentoml``, inside the Bento's build context), one run of ``retrain-nightly``
   with its deployment's parameters (``dvc repro`` on, ``build`` on): it promotes the first
   model and builds a Bento that holds it; ``bentoml serve <that tag>`` with no
   BONEFRAC_MODEL_PATH answers ``/predict`` with the champion.
2. A ``drift-hourly`` run on a drifted prediction log with ``trigger_retrain`` on and no new
   labelled data: Completed, "no new labelled data" recorded, no retrain run created.
3. New labelled data (``data.phantom`` changed, so DVC reports a changed data input), the same
   drift run: it creates a ``retrain-nightly`` run (its parameters say why), and the worker runs
   that retrain to a decision.

The cheap parts are in ``make test``: the worker's retrain (DVC and Bento off) in
``test_prefect_server.py``, the drift flow's trigger against a real server there too, two
builds in a row and serving the Bento in ``test_bento.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from tests.integration._pipeline import make_project, prefect_server
from tests.integration._prefect_http import prefect_http
from tests.integration._server import running_server

pytestmark = [pytest.mark.slow, pytest.mark.integration]

BIN = Path(sys.executable).parent
SMALL = {
    "data": {"phantom": {"n_patients": 14, "size": 128}},
    "preprocess": {"image_size": 64},
    "model": {"arch": "custom_cnn", "pretrained": "none"},
    "train": {"epochs": 2, "batch_size": 16, "threads": 1, "early_stopping_patience": 50},
    "evaluate": {"bootstrap_samples": 50, "gradcam_gallery": 2},
    # the deployment, not the gate, is under test: a first model on 14 phantom patients is weak
    "promotion": {"min_sensitivity": 0.0, "min_auroc_lower": 0.0, "bootstrap_samples": 50},
    "drift": {"trigger_retrain": True},
}
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}

HTTP = prefect_http()  # retries what Prefect's client retries (a 503 from a busy server)


def _get(api: str, path: str) -> Any:
    return HTTP.get(f"{api}{path}", timeout=30).json()


def _post(api: str, path: str, body: dict[str, Any]) -> Any:
    r = HTTP.post(f"{api}{path}", json=body, timeout=30)
    assert r.status_code in (200, 201), r.text
    return r.json()


def _wait_final(api: str, run_id: str, timeout: float, log: Path) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (fr := _get(api, f"/flow_runs/{run_id}"))["state"]["type"] not in FINAL:
        if time.monotonic() > deadline:
            pytest.fail(f"run {run_id} still {fr['state']['type']} after {timeout}s\n{log.read_text()[-4000:]}")
        time.sleep(2)
    return fr


def _retrain_runs(api: str, deployment_id: str) -> list[dict[str, Any]]:
    """The deployment's runs that someone (a test, a drift run) started: not the cron's future 02:00 runs."""
    runs = _post(api, "/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [deployment_id]}}})
    return [r for r in runs if not r.get("auto_scheduled")]


def _artifact(api: str, run_id: str, key: str) -> str:
    arts = _post(api, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})
    return next((str(a["data"]) for a in arts if a["key"] == key), "")


def _drifted_log(folder: Path, n: int = 30) -> Path:
    """A day of the service's prediction log, far brighter and larger than the phantom training images."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    now = datetime.now(UTC)
    rows = [
        {
            "timestamp": now.isoformat(),
            "model_name": "bonefrac",
            "model_version": "x",
            "probability": float(rng.uniform(0.9, 1.0)),
            "width": int(rng.integers(2800, 3000)),
            "height": int(rng.integers(2000, 2200)),
            "bit_depth": 16,
            "intensity_mean": float(rng.normal(0.9, 0.01)),
            "intensity_std": float(rng.normal(0.02, 0.002)),
            "intensity_p01": float(rng.normal(0.85, 0.01)),
            "intensity_p99": float(rng.normal(0.99, 0.002)),
        }
        for _ in range(n)
    ]
    (folder / f"predictions-{now:%Y-%m-%d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_retrain_deployment_with_dvc_and_bento_then_drift_triggers_a_retrain(tmp_path: Path) -> None:
    t_start = time.monotonic()
    project = make_project(tmp_path / "bonefrac", SMALL)
    log = tmp_path / "worker.log"
    timings: dict[str, float] = {}
    with prefect_server(tmp_path / "prefect") as api:
        # docs/operations.md: `source env.sh` (PYTHONPATH=src) + PREFECT_API_URL; a service manager's PATH
        env = {k: v for k, v in os.environ.items() if k in ("HOME", "LANG", "TMPDIR")}
        env.update(
            PATH="/usr/bin:/bin",
            PYTHONPATH=str(project / "src"),
            PREFECT_API_URL=api,
            PREFECT_HOME=str(tmp_path / "prefect"),
            PREFECT_LOGGING_LEVEL="WARNING",
            PREFECT_WORKER_QUERY_SECONDS="2",
            OMP_NUM_THREADS="1",
        )  # no BENTOML_HOME: the worker takes env.mk's, <project>/.bentoml
        home = project / ".bentoml"
        _post(api, "/work_pools/", {"name": "bonefrac-process", "type": "process"})
        deploy = subprocess.run(
            [str(BIN / "prefect"), "--no-prompt", "deploy", "--name", "retrain-nightly", "--name", "drift-hourly"],
            cwd=project, env={**env, "PATH": f"{BIN}:/usr/bin:/bin"}, capture_output=True, text=True,
        )  # fmt: skip
        assert deploy.returncode == 0, deploy.stdout[-2000:] + deploy.stderr[-2000:]
        dep = _get(api, "/deployments/name/retrain/retrain-nightly")
        drift_dep = _get(api, "/deployments/name/drift-check/drift-hourly")

        worker = subprocess.Popen(
            [str(BIN / "bonefrac"), "ops", "worker", "--pool", "bonefrac-process"],
            cwd=project, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            # -- 1. the nightly retrain as scheduled: the deployment's own parameters (dvc on, build on)
            t0 = time.monotonic()
            first = _post(api, f"/deployments/{dep['id']}/create_flow_run", {})
            fr = _wait_final(api, first["id"], 1500, log)
            timings["retrain (dvc repro + bento build)"] = time.monotonic() - t0
            assert fr["state"]["type"] == "COMPLETED", f"{fr['state'].get('message')}\n{log.read_text()[-4000:]}"
            assert fr["parameters"] == {"params_path": "params.yaml"}  # run_dvc and build at their defaults (on)
            decision = _artifact(api, first["id"], "retrain-decision")
            assert "PROMOTED" in decision, decision
            assert (project / "dvc.lock").exists() and (project / "models" / "model.pt").exists()  # dvc repro ran
            assert "**bento**: built bonefrac:" in decision, decision  # not "skipped"/"failed"
            bento_tag = decision.split("**bento**: built ")[1].split()[0]

            # the champion as the registry's pointer names it (the file a running service watches)
            champion = json.loads((home / ".bonefrac-champion-bonefrac.json").read_text())["tag"]
            bento_dir = home / "bentos" / "bonefrac" / bento_tag.split(":")[1]
            meta = yaml.safe_load((bento_dir / "bento.yaml").read_text())
            packed = [m["tag"] for s in meta["services"] for m in s.get("models", [])]
            assert packed == [champion], (packed, champion)  # the champion is inside the Bento
            assert not any(".bentoml" in str(p.relative_to(bento_dir)) for p in bento_dir.rglob("*"))  # no Bento in it

            # the Bento serves the champion: `bentoml serve <tag>`, no BONEFRAC_MODEL_PATH
            image = next((project / "data" / "raw" / "phantom").rglob("*.png"))
            with running_server(
                None, tmp_path / "serve", target=bento_tag, BENTOML_HOME=str(home), BONEFRAC_REGISTRY_POLL_S="0"
            ) as srv, httpx.Client(base_url=srv.url, timeout=60) as client:
                served = client.get("/metadata").json()["model"]
                answer = client.post("/predict", files={"file": ("x.png", image.read_bytes())})
            assert f"{served['name']}:{served['version']}" == champion, served
            assert answer.status_code == 200 and 0.0 <= answer.json()["probability"] <= 1.0, answer.text
            assert answer.json()["model"]["version"] == champion.split(":")[1]

            # -- 2. drift, but no new labelled data: the run completes and says it cannot act
            drifted = _drifted_log(tmp_path / "predictions")
            drift_params = {"current": str(drifted), "since_hours": None, "trigger_retrain": True}
            before = len(_retrain_runs(api, dep["id"]))
            t0 = time.monotonic()
            stuck = _post(api, f"/deployments/{drift_dep['id']}/create_flow_run", {"parameters": drift_params})
            fr = _wait_final(api, stuck["id"], 600, log)
            timings["drift run, no new data"] = time.monotonic() - t0
            assert fr["state"]["type"] == "COMPLETED", fr["state"].get("message")
            report = _artifact(api, stuck["id"], "drift-report")
            assert "DRIFT" in report and "no new labelled data" in report, report
            assert len(_retrain_runs(api, dep["id"])) == before  # nothing started

            # -- 3. new labelled data (DVC sees a changed data input of `generate`): drift starts a retrain
            params = yaml.safe_load((project / "params.yaml").read_text())
            params["data"]["phantom"]["n_patients"] = 16
            (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            t0 = time.monotonic()
            acted = _post(api, f"/deployments/{drift_dep['id']}/create_flow_run", {"parameters": drift_params})
            fr = _wait_final(api, acted["id"], 600, log)
            timings["drift run, new data"] = time.monotonic() - t0
            assert fr["state"]["type"] == "COMPLETED", fr["state"].get("message")
            report = _artifact(api, acted["id"], "drift-report")
            assert "triggered retrain run" in report, report
            new = [r for r in _retrain_runs(api, dep["id"]) if r["id"] not in {first["id"]}]
            assert len(new) == 1 and new[0]["id"] in report, (new, report)
            assert new[0]["parameters"]["reason"].startswith("drift detected"), new[0]["parameters"]
            assert new[0]["parameters"]["params_path"] == "params.yaml"
            t0 = time.monotonic()
            fr = _wait_final(api, new[0]["id"], 1500, log)
            timings["triggered retrain"] = time.monotonic() - t0
            assert fr["state"]["type"] == "COMPLETED", f"{fr['state'].get('message')}\n{log.read_text()[-4000:]}"
            decision = _artifact(api, new[0]["id"], "retrain-decision")
            assert "Trigger: drift detected" in decision and ("PROMOTED" in decision or "REJECTED" in decision)
            lock = yaml.safe_load((project / "dvc.lock").read_text())
            assert lock["stages"]["generate"]["params"]["params.yaml"]["data.phantom"]["n_patients"] == 16
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.wait(60)
    timings["whole test"] = time.monotonic() - t_start
    print(json.dumps({k: round(v, 1) for k, v in timings.items()}))
