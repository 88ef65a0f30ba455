"""A real Prefect server on 127.0.0.1 and the worker started as docs/operations.md says.

One server for the module (isolated PREFECT_HOME in tmp). The first test follows
the docs: the three work pools (process; Docker and Kubernetes with the GPU job
templates of deploy/work-pools, whose job variables the server validates),
``prefect deploy --all``, then ``.venv/bin/bonefrac ops worker`` with no venv on
PATH and the project's quiet ``PREFECT_LOGGING_LEVEL=WARNING``. Before the
worker starts, a retrain run is left ``Running`` with a dead process and holding
the deployment's only concurrency slot (a node that died); the worker's sweep
must mark it Crashed and free the slot, then the worker runs the drift check and
a retrain to a promotion whose decision is in the run's logs, and stops within
seconds of SIGINT. The second test runs the retrain flow in-process against the
same server (promote, reject, skip an already-judged model). Everything started
is stopped (SIGINT, then SIGKILL) even when an assertion fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from tests.integration._prefect_http import prefect_http

from bonefrac.ops.prefect_api import local_prefect_api
from bonefrac.ops.processes import stop_group

pytestmark = [pytest.mark.integration, pytest.mark.long]

ROOT = Path(__file__).resolve().parents[2]
PREFECT = [sys.executable, "-m", "prefect"]

HTTP = prefect_http()  # retries what Prefect's client retries (a 503 from a busy server)


@contextlib.contextmanager
def _process(cmd: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``cmd`` in its own process group; always stop it (SIGINT, then SIGKILL)."""
    fh = log.open("wb")
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        yield proc
    finally:
        stop_group(proc)
        fh.close()


def _run(cmd: list[str], env: dict[str, str], timeout: float = 240) -> str:
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd[2:])} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def _tiny_drift_inputs(tmp: Path) -> tuple[Path, Path]:
    """A reference table and a one-day prediction log with a clear exposure shift."""
    rng = np.random.default_rng(0)
    n = 60
    ref = pd.DataFrame(
        {
            "intensity_mean": rng.normal(0.30, 0.03, n),
            "intensity_std": rng.normal(0.20, 0.02, n),
            "intensity_p01": rng.normal(0.05, 0.01, n),
            "intensity_p50": rng.normal(0.28, 0.03, n),
            "intensity_p99": rng.normal(0.80, 0.03, n),
            "width": rng.integers(300, 400, n),
            "height": rng.integers(400, 500, n),
            "bit_depth": 8,
            "score": rng.uniform(0, 1, n),
        }
    )
    ref["aspect"] = ref["width"] / ref["height"]
    ref_dir = tmp / "reference"
    ref_dir.mkdir()
    ref.to_csv(ref_dir / "reference.csv", index=False)
    log_dir = tmp / "predictions"
    log_dir.mkdir()
    now = datetime.now(UTC)
    with (log_dir / f"predictions-{now:%Y-%m-%d}.jsonl").open("w") as fh:
        for _ in range(40):
            fh.write(
                json.dumps(
                    {
                        "timestamp": now.isoformat(),
                        "model_name": "bonefrac",
                        "model_version": "t",
                        "probability": float(rng.uniform()),
                        "width": int(rng.integers(300, 400)),
                        "height": int(rng.integers(400, 500)),
                        "bit_depth": 8,
                        "intensity_mean": float(rng.normal(0.45, 0.03)),
                        "intensity_std": float(rng.normal(0.26, 0.02)),
                        "intensity_p01": float(rng.normal(0.12, 0.01)),
                        "intensity_p99": float(rng.normal(0.95, 0.02)),
                    }
                )
                + "\n"
            )
    return ref_dir, log_dir


@dataclass
class _Server:
    api: str
    env: dict[str, str]  # what every CLI call of the tests gets (the test's own PATH)
    tmp: Path


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Server]:
    """A Prefect server on 127.0.0.1 started the way ``bonefrac run`` starts its own (``local_prefect_api``)."""
    tmp = tmp_path_factory.mktemp("prefect")
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp / "prefect_home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        # Runs come only from the tests: the scheduler would otherwise add runs
        # that the worker might pick up if a test crosses the hour.
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
    }
    env.pop("PREFECT_PROFILES_PATH", None)
    env.pop("PREFECT_API_URL", None)
    with local_prefect_api(env, timeout_s=180) as served:
        yield _Server(served["PREFECT_API_URL"], served, tmp)


def _wait_final(api: str, run_id: str, log: Path, timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fr = HTTP.get(f"{api}/flow_runs/{run_id}", timeout=30).json()
        if fr["state"]["type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}:
            return fr
        time.sleep(1)
    pytest.fail(f"flow run {run_id} still {fr['state']['type']} after {timeout}s\nworker log:\n{_tail(log)}")


def _set_state(api: str, run_id: str, state: str) -> None:
    r = HTTP.post(f"{api}/flow_runs/{run_id}/set_state", timeout=30, json={"state": {"type": state}})
    assert r.status_code in (200, 201) and r.json()["status"] == "ACCEPT", r.text


def _create_run(api: str, deployment_id: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """POST a flow run of a deployment; a refused create fails here with the server's answer."""
    r = HTTP.post(
        f"{api}/deployments/{deployment_id}/create_flow_run", timeout=30, json={"parameters": parameters}
    )
    assert r.status_code == 201, f"{r.status_code}: {r.text[:2000]}"
    return r.json()


def _slots(api: str, deployment_id: str) -> int:
    dep = HTTP.get(f"{api}/deployments/{deployment_id}", timeout=30).json()
    return dep["global_concurrency_limit"]["active_slots"]


def _documented_worker_env(server: _Server) -> dict[str, str]:
    """docs/operations.md: `source env.sh` + PREFECT_API_URL, but no venv on PATH (a service manager's PATH)."""
    keep = ("HOME", "LANG", "TMPDIR", "CI")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update(
        PATH="/usr/bin:/bin",
        PYTHONPATH=str(ROOT / "src"),  # env.sh's own line
        PREFECT_API_URL=server.api,
        PREFECT_HOME=server.env["PREFECT_HOME"],  # throw-away, instead of the project's .prefect
        BENTOML_HOME=str(server.tmp / "bentoml"),  # a throw-away registry, not the project's
        PREFECT_LOGGING_LEVEL="WARNING",  # env.mk's quiet level: decisions must still reach the API
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_WORKER_QUERY_SECONDS="2",
        OMP_NUM_THREADS="1",
    )
    return env


def test_documented_worker_heals_a_dead_run_then_runs_drift_and_retrain_to_a_promotion(
    prefect_server: _Server,
) -> None:
    api, env, tmp = prefect_server.api, prefect_server.env, prefect_server.tmp
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert {"retrain-nightly", "drift-hourly", "retrain-docker", "retrain-k8s"} <= set(deployments)
    pool = deployments["retrain-nightly"]["work_pool"]["name"]
    assert deployments["drift-hourly"]["work_pool"]["name"] == pool

    # -- docs: the work pools (Docker/K8s with the GPU templates), then `prefect deploy --all`.
    # `prefect work-pool create NAME --type T [--base-job-template F]` is this POST; the REST call
    # saves three CLI starts.
    for name, kind, template in (
        (pool, "process", None),
        ("bonefrac-docker", "docker", "deploy/work-pools/docker.json"),
        ("bonefrac-k8s", "kubernetes", "deploy/work-pools/kubernetes.json"),
    ):
        body: dict[str, Any] = {"name": name, "type": kind}
        if template:
            body["base_job_template"] = json.loads((ROOT / template).read_text())
        r = HTTP.post(f"{api}/work_pools/", json=body, timeout=30)
        assert r.status_code == 201, r.text  # the server validates the template's defaults too
    _run([*PREFECT, "--no-prompt", "deploy", "--all"], env)  # the server validates every job_variables
    dep = HTTP.get(f"{api}/deployments/name/retrain/retrain-nightly", timeout=30).json()
    drift_dep = HTTP.get(f"{api}/deployments/name/drift-check/drift-hourly", timeout=30).json()
    assert dep["work_pool_name"] == pool and drift_dep["schedules"][0]["schedule"]["cron"] == "15 * * * *"
    assert dep["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(ROOT)
    k8s = HTTP.get(f"{api}/deployments/name/retrain/retrain-k8s", timeout=30).json()
    assert k8s["job_variables"]["gpu_limit"] == 1 and k8s["work_pool_name"] == "bonefrac-k8s"
    assert "dvc pull" in json.dumps(k8s["pull_steps"])
    bad = HTTP.post(  # the validation is real: a wrong type for the GPU count is refused
        f"{api}/deployments/",
        timeout=30,
        json={**{k: k8s[k] for k in ("flow_id", "entrypoint")}, "name": "bad-gpu",
              "work_pool_name": "bonefrac-k8s", "job_variables": {"gpu_limit": "many"}},
    )  # fmt: skip
    assert bad.status_code == 422 and "gpu_limit" in bad.text

    # -- a retrain whose node died: Running, holding the only concurrency slot, process gone
    dead = subprocess.Popen(["true"])
    dead.wait()
    params = _tiny_project(tmp)
    good = _bundle(tmp / "good.pt", 1, high_sensitivity=0.0)
    retrain_params = {"params_path": str(params), "run_dvc": False, "bundle_path": good, "build": False}
    zombie = _create_run(api, dep["id"], retrain_params)
    _set_state(api, zombie["id"], "PENDING")  # takes the deployment's concurrency slot
    _set_state(api, zombie["id"], "RUNNING")
    HTTP.patch(f"{api}/flow_runs/{zombie['id']}", timeout=30, json={"infrastructure_pid": str(dead.pid)})
    assert _slots(api, dep["id"]) == 1

    # -- docs: the worker, as `.venv/bin/bonefrac ops worker` (= make worker), no venv on PATH
    ref_dir, log_dir = _tiny_drift_inputs(tmp)
    out_dir = tmp / "drift_out"
    worker_log = tmp / "worker.log"
    bonefrac = str(Path(sys.executable).with_name("bonefrac"))
    # the documented command; a short stop timeout so that the in-flight run at the end is stopped, not awaited
    worker_cmd = [bonefrac, "ops", "worker", "--pool", pool, "--stop-timeout", "2"]
    with _process(worker_cmd, _documented_worker_env(prefect_server), worker_log) as worker:
        deadline = time.monotonic() + 120
        while (state := HTTP.get(f"{api}/flow_runs/{zombie['id']}", timeout=30).json()["state"])["type"] != "CRASHED":
            assert time.monotonic() < deadline and worker.poll() is None, f"not swept:\n{_tail(worker_log)}"
            time.sleep(1)
        assert "gone" in state["message"]
        assert _slots(api, dep["id"]) == 0  # the slot is free for the next run

        drift_params = {
            "params_path": str(ROOT / "params.yaml"),
            "current": str(log_dir),
            "reference_dir": str(ref_dir),
            "since_hours": None,
            "out_dir": str(out_dir),
            "trigger_retrain": False,
        }
        drift = _create_run(api, drift_dep["id"], drift_params)
        retrain = _create_run(api, dep["id"], retrain_params)
        for run in (drift, retrain):
            fr = _wait_final(api, run["id"], worker_log)
            assert fr["state"]["type"] == "COMPLETED", f"{fr['state'].get('message')}\n{_tail(worker_log)}"

        # the gate's decision is in the run's logs (UI) although PREFECT_LOGGING_LEVEL=WARNING
        logs = HTTP.post(
            f"{api}/logs/filter", timeout=30, json={"logs": {"flow_run_id": {"any_": [retrain["id"]]}}}
        ).json()
        decision = [entry["message"] for entry in logs if entry["message"].startswith("promoted")]
        assert decision and entry_level(logs, decision[0]) == 20, [e["message"] for e in logs][-10:]
        automations = HTTP.post(f"{api}/automations/filter", timeout=30, json={}).json()
        assert any(a["name"].startswith("bonefrac: crash flow runs") for a in automations)

        # Ctrl-C while a run is in flight: the worker is gone within seconds, and so is the run,
        # which is marked Crashed (not left Running, holding a slot)
        busy = _create_run(api, drift_dep["id"], {**drift_params, "out_dir": str(tmp / "drift_busy")})
        deadline = time.monotonic() + 180
        while HTTP.get(f"{api}/flow_runs/{busy['id']}", timeout=30).json()["state"]["type"] != "RUNNING":
            assert time.monotonic() < deadline, f"run never started:\n{_tail(worker_log)}"
            time.sleep(0.5)
        t0 = time.monotonic()
        os.killpg(worker.pid, signal.SIGINT)  # Ctrl-C on the worker's terminal
        worker.wait(timeout=90)
        stop_s = time.monotonic() - t0
    busy_state = HTTP.get(f"{api}/flow_runs/{busy['id']}", timeout=30).json()["state"]
    assert stop_s < 30, f"the worker took {stop_s:.1f} s to stop"
    assert busy_state["type"] in {"CRASHED", "COMPLETED"}, busy_state  # Completed if it won the race
    print(f"worker stopped {stop_s:.1f} s after SIGINT with a run in flight; the run: {busy_state['type']}")

    summary = json.loads((out_dir / "drift_summary.json").read_text())
    assert summary["dataset_drift"] is True  # the log's exposure is clearly brighter
    assert "intensity_mean" in summary["drifted_columns"]
    assert (out_dir / "drift_report.html").stat().st_size > 10_000
    arts = HTTP.post(
        f"{api}/artifacts/filter", timeout=30, json={"artifacts": {"flow_run_id": {"any_": [drift["id"]]}}}
    ).json()
    md = [a for a in arts if a["key"] == "drift-report"]
    assert md and "DRIFT" in md[0]["data"]


def entry_level(logs: list[dict[str, Any]], message: str) -> int:
    return next(e["level"] for e in logs if e["message"] == message)


# ---------------------------------------------------------------- retrain flow
def _tiny_project(tmp: Path) -> Path:
    """A preprocessed cache (32 px) with PNG sources, and a params file pointing at it."""
    from PIL import Image

    from bonefrac.model.transforms import PreprocessSpec
    from bonefrac.preprocess.cache import build_cache

    rng = np.random.default_rng(0)
    n = 40
    cache, raw = tmp / "processed", tmp / "raw"
    cache.mkdir()
    raw.mkdir()
    rows = []
    for i in range(n):
        arr = rng.integers(0, 120, size=(40, 36)).astype(np.uint8)
        label = i % 2
        if label:
            arr[:, 10:14] = 230  # a bright "bone" so the two classes differ a little
        Image.fromarray(arr).save(raw / f"img{i}.png")
        split = "test" if i < 20 else "train"
        rows.append(
            {
                "image_id": f"img{i}",
                "path": str(raw / f"img{i}.png"),
                "label": label,
                "split": split,
            }
        )
    build_cache(pd.DataFrame(rows), cache, PreprocessSpec(image_size=32))  # the bundles' spec
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["paths"] = {
        "processed": str(cache),
        "models": str(tmp / "models"),
        "reports": str(tmp / "reports"),
    }
    params["preprocess"]["image_size"] = 32
    params["promotion"] = {
        "auroc_margin": 0.05,
        "min_sensitivity": 0.8,
        "min_auroc_lower": 0.0,  # random-weight models on random images: the floor is test_promotion's
        "bootstrap_samples": 50,
        "alpha": 0.05,
    }
    params["drift"]["embedding_dims"] = 2
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _bundle(path: Path, seed: int, high_sensitivity: float) -> str:
    import torch

    from bonefrac.model.bundle import ModelBundle
    from bonefrac.model.networks import build_model
    from bonefrac.model.transforms import PreprocessSpec

    torch.manual_seed(seed)
    model = build_model("custom_cnn", num_types=0, spatial_dims=2)
    ModelBundle(
        arch="custom_cnn",
        state_dict=model.state_dict(),
        preprocess_spec=PreprocessSpec(image_size=32),
        operating_points={"high_sensitivity": high_sensitivity, "high_specificity": 0.9},
        metadata={"metrics": {"auroc": 0.5}},
    ).save(path)
    return str(path)


def test_retrain_flow_promotes_rejects_and_skips_known_models(
    prefect_server: _Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from prefect.client.orchestration import get_client
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    sys.path.insert(0, str(ROOT))
    from flows.retrain import RETRAIN_TIMEOUT_S, retrain_flow

    from bonefrac.registry import store

    assert retrain_flow.timeout_seconds == RETRAIN_TIMEOUT_S  # a stuck retrain fails and frees its slot
    torch.set_num_threads(1)
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    monkeypatch.chdir(ROOT)
    params = str(_tiny_project(tmp_path))
    good = _bundle(tmp_path / "a.pt", 1, high_sensitivity=0.0)  # calls every image positive
    deaf = _bundle(tmp_path / "b.pt", 2, high_sensitivity=1.01)  # calls nothing positive

    with temporary_settings(updates={PREFECT_API_URL: prefect_server.api}):
        first = retrain_flow(params, run_dvc=False, bundle_path=good, build=False)
        assert first["promote"] and first["action"].startswith("promoted")
        assert store.get_champion("bonefrac")[0] == first["tag"]
        ref = tmp_path / "models" / "drift_reference"
        assert len(pd.read_csv(ref / "reference.csv")) == 20
        assert (ref / "pca.json").exists()

        second = retrain_flow(params, run_dvc=False, bundle_path=deaf, build=False)
        assert not second["promote"]
        assert any("below the minimum" in r for r in second["reasons"])
        assert second["stats"]["champion"] == first["tag"]  # compared on the same test set
        assert store.get_record(second["tag"]).stage == "rejected"
        assert store.get_champion("bonefrac")[0] == first["tag"]

        again = retrain_flow(params, run_dvc=False, bundle_path=deaf, build=False)
        assert again["action"] == "none" and again["stage"] == "rejected"

        with get_client(sync_client=True) as client:
            arts = client.read_artifacts()
        decisions = [a for a in arts if a.key == "retrain-decision" and a.flow_run_id is not None]
        mine = {str(a.flow_run_id) for a in decisions} - _worker_runs(prefect_server.api)
        assert len(mine) == 3
        assert any("REJECTED" in str(a.data) and "below the minimum" in str(a.data) for a in decisions)
        # Send this process's queued logs and events while the server is up: at interpreter
        # exit Prefect would retry them against the stopped server for over a minute.
        APILogWorker.drain_all(timeout=30)
        EventsWorker.drain_all(timeout=30)


def _worker_runs(api: str) -> set[str]:
    """Flow runs that went through a deployment (the other test's), not this test's in-process ones."""
    runs = HTTP.post(f"{api}/flow_runs/filter", timeout=30, json={}).json()
    return {r["id"] for r in runs if r.get("deployment_id")}


# ------------------------------------------------------------- drift -> retrain
def _retrain_deployment(api: str) -> dict[str, Any]:
    """`retrain/retrain-nightly` as the first test deployed it, or registered here (no worker needed)."""
    r = HTTP.get(f"{api}/deployments/name/retrain/retrain-nightly", timeout=30)
    if r.status_code == 200:
        return r.json()
    flow_id = HTTP.post(f"{api}/flows/", json={"name": "retrain"}, timeout=30).json()["id"]
    body = {"name": "retrain-nightly", "flow_id": flow_id, "entrypoint": "flows/retrain.py:retrain_flow"}
    return HTTP.post(f"{api}/deployments/", json=body, timeout=30).json()


def test_drift_flow_starts_a_retrain_run_only_with_new_labelled_data(
    prefect_server: _Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """flows/drift.py's glue as real flow runs on the server: drift + nothing new to learn from is a
    recorded "cannot act" and no run; drift + a labelled image added (DVC sees the ingest stage's data
    changed) creates a `retrain-nightly` run whose parameters say why. The worker-driven version,
    with the retrain then run to a decision, is the slow test_retrain_deployment.py."""
    from dvc.repo import Repo
    from prefect.settings import PREFECT_API_URL, temporary_settings

    sys.path.insert(0, str(ROOT))
    from flows.drift import drift_flow

    from bonefrac.provenance import data_version
    from bonefrac.registry import store

    api = prefect_server.api
    dep = _retrain_deployment(api)
    # a DVC project whose `ingest` stage reads data/ (labelled images), and a champion trained on its data
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "a.png").write_bytes(b"one")
    (project / "processed").mkdir()
    (project / "processed" / "index.csv").write_text("path,label,split\ndata/a.png,1,train\n")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(source="imagefolder", root="data")
    params["paths"] = {"processed": "processed", "models": "models", "reports": "reports"}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    stage = {"cmd": "true", "deps": ["data"], "params": ["data.root"]}
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"ingest": stage}}))
    Repo.init(str(project), no_scm=True).close()
    with Repo(str(project)) as repo:
        repo.reproduce(targets=[f"{project / 'dvc.yaml'}:ingest"])
    monkeypatch.chdir(project)
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    tag = store.register_model(
        _bundle(tmp_path / "m.pt", 1, 0.5), name="bonefrac", data_version=data_version(project, "processed")
    )
    store.promote(tag)
    ref_dir, log_dir = _tiny_drift_inputs(tmp_path)  # a log whose exposure clearly drifted
    kw = {"current": str(log_dir), "reference_dir": str(ref_dir), "since_hours": None, "trigger_retrain": True}

    def retrain_runs() -> list[dict[str, Any]]:
        body = {"flow_runs": {"deployment_id": {"any_": [dep["id"]]}}}
        return HTTP.post(f"{api}/flow_runs/filter", json=body, timeout=30).json()

    before = {r["id"] for r in retrain_runs()}
    with temporary_settings(updates={PREFECT_API_URL: api}):
        stuck = drift_flow(str(project / "params.yaml"), out_dir=str(tmp_path / "d1"), **kw)
        assert stuck["dataset_drift"] and stuck["trigger"]["action"] == "cannot_act", stuck["action"]
        assert "no new labelled data" in stuck["action"]
        assert {r["id"] for r in retrain_runs()} == before  # nothing started

        (project / "data" / "b.png").write_bytes(b"two")  # a labelled image added to the training data
        acted = drift_flow(str(project / "params.yaml"), out_dir=str(tmp_path / "d2"), **kw)
    new = [r for r in retrain_runs() if r["id"] not in before]
    try:
        assert acted["trigger"]["action"] == "retrain" and acted["action"].startswith("triggered retrain run")
        assert len(new) == 1 and new[0]["id"] in acted["action"]
        assert new[0]["parameters"] == {
            "params_path": str(project / "params.yaml"),
            "reason": f"drift detected ({tmp_path / 'd2'})",
        }
        assert new[0]["state"]["type"] == "SCHEDULED"  # for the retrain deployment's worker to run
    finally:
        for run in new:  # no worker of the other test may ever pick it up
            HTTP.delete(f"{api}/flow_runs/{run['id']}", timeout=30)
