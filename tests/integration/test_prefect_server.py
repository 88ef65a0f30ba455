"""A real Prefect server and process worker on 127.0.0.1 run the drift deployment from prefect.yaml.

Starts ``prefect server start`` (isolated PREFECT_HOME in tmp), creates the
process work pool named in prefect.yaml, deploys the drift deployment with
``prefect deploy``, starts a worker, triggers a run through the REST API, waits
for COMPLETED, checks the files and the Prefect artifact it made, and stops
everything it started (SIGINT, then SIGKILL) even when an assertion fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PREFECT = [sys.executable, "-m", "prefect"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        for sig, wait in ((signal.SIGINT, 20), (signal.SIGKILL, 10)):
            if proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=wait)
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


def _wait_healthy(api: str, server: subprocess.Popen[bytes], log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"prefect server exited with {server.returncode}:\n{_tail(log)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{api}/health", timeout=5).status_code == 200:
                return
        time.sleep(1)
    pytest.fail(f"prefect server not healthy after {timeout}s:\n{_tail(log)}")


def test_drift_deployment_runs_on_a_real_server(tmp_path: Path) -> None:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert {"retrain-nightly", "drift-hourly"} <= set(deployments)
    assert all(d["schedules"][0]["cron"] for d in deployments.values())
    pool = deployments["drift-hourly"]["work_pool"]["name"]

    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect_home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_LOGGING_LEVEL": "INFO",
        # Runs come only from this test: the scheduler would otherwise add hourly
        # runs that the worker might pick up if the test crosses the hour.
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "BENTOML_HOME": str(tmp_path / "bentoml"),
    }
    env.pop("PREFECT_PROFILES_PATH", None)
    ref_dir, log_dir = _tiny_drift_inputs(tmp_path)
    out_dir = tmp_path / "drift_out"

    server_log, worker_log = tmp_path / "server.log", tmp_path / "worker.log"
    with _process(
        [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, server_log
    ) as server:
        _wait_healthy(api, server, server_log)
        _run([*PREFECT, "work-pool", "create", pool, "--type", "process"], env)
        _run([*PREFECT, "--no-prompt", "deploy", "--name", "drift-hourly"], env)
        dep = httpx.get(f"{api}/deployments/name/drift-check/drift-hourly", timeout=30).json()
        assert dep["work_pool_name"] == pool
        assert dep["schedules"] and dep["schedules"][0]["schedule"]["cron"] == "15 * * * *"
        assert dep["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(
            ROOT
        )

        with _process([*PREFECT, "worker", "start", "--pool", pool, "--type", "process"], env, worker_log):
            run = httpx.post(
                f"{api}/deployments/{dep['id']}/create_flow_run",
                timeout=30,
                json={
                    "parameters": {
                        "params_path": str(ROOT / "params.yaml"),
                        "current": str(log_dir),
                        "reference_dir": str(ref_dir),
                        "since_hours": None,
                        "out_dir": str(out_dir),
                        "trigger_retrain": False,
                    },
                },
            ).json()
            deadline = time.monotonic() + 300
            state = None
            while time.monotonic() < deadline:
                fr = httpx.get(f"{api}/flow_runs/{run['id']}", timeout=30).json()
                state = fr["state"]["type"]
                if state in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}:
                    break
                time.sleep(2)
            assert state == "COMPLETED", (
                f"flow run ended {state}: {fr['state'].get('message')}\nworker log:\n{_tail(worker_log)}"
            )

        summary = json.loads((out_dir / "drift_summary.json").read_text())
        assert summary["dataset_drift"] is True  # the log's exposure is clearly brighter
        assert "intensity_mean" in summary["drifted_columns"]
        assert (out_dir / "drift_report.html").stat().st_size > 10_000
        arts = httpx.post(
            f"{api}/artifacts/filter",
            timeout=30,
            json={"artifacts": {"flow_run_id": {"any_": [run["id"]]}}},
        ).json()
        md = [a for a in arts if a["key"] == "drift-report"]
        assert md and "DRIFT" in md[0]["data"]


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
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from prefect.client.orchestration import get_client
    from prefect.testing.utilities import prefect_test_harness

    sys.path.insert(0, str(ROOT))
    from flows.retrain import retrain_flow

    from bonefrac.registry import store

    torch.set_num_threads(1)
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    monkeypatch.chdir(ROOT)
    params = str(_tiny_project(tmp_path))
    good = _bundle(tmp_path / "a.pt", 1, high_sensitivity=0.0)  # calls every image positive
    deaf = _bundle(tmp_path / "b.pt", 2, high_sensitivity=1.01)  # calls nothing positive

    with prefect_test_harness(server_startup_timeout=180):
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
        decisions = [a for a in arts if a.key == "retrain-decision"]
        assert len(decisions) == 3
        assert any("REJECTED" in str(a.data) and "below the minimum" in str(a.data) for a in decisions)
