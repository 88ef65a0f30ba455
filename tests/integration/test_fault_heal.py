"""The fault test of issue 18: kill -9 the worker and the training mid-run; nothing keeps running, the
dead run is marked Crashed, and the next run resumes the training and promotes.

Slow (two real `dvc repro` runs of a small phantom pipeline through a real server
and the documented worker): `pytest -m slow tests/integration/test_fault_heal.py`.
Its fast parts run in `make test`: the sweep of a dead run on a real server
(test_prefect_server.py), children dying with their parent (tests/unit/test_proc.py),
the train stage resuming only its own checkpoint (tests/model/test_resume.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from tests.integration._pipeline import make_project, prefect_server
from tests.integration._prefect_http import prefect_http

from bonefrac.training.checkpoint import load_checkpoint, save_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.integration]

BIN = Path(sys.executable).parent
SMALL = {
    "data": {"phantom": {"n_patients": 14, "size": 128}},
    "preprocess": {"image_size": 64},
    "model": {"arch": "custom_cnn", "pretrained": "none"},
    "train": {"epochs": 6, "batch_size": 16, "threads": 1, "early_stopping_patience": 50},
    "evaluate": {"bootstrap_samples": 50, "gradcam_gallery": 2},
    # this test is about healing, not the gate
    "promotion": {"min_sensitivity": 0.0, "min_auroc_lower": 0.0, "bootstrap_samples": 50},
}

HTTP = prefect_http()  # retries what Prefect's client retries (a 503 from a busy server)


def _procs(project: Path, needle: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline", "cwd"]):
        with contextlib.suppress(psutil.Error):
            if needle in " ".join(p.info["cmdline"] or []) and str(project) in (p.info["cwd"] or ""):
                out.append(p)
    return out


def _state(api: str, run_id: str) -> dict:
    return HTTP.get(f"{api}/flow_runs/{run_id}", timeout=30).json()


def _wait(cond, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not within {timeout}s\n{log.read_text(errors='replace')[-4000:]}")
        time.sleep(1)


def _worker(project: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [str(BIN / "bonefrac"), "ops", "worker", "--pool", "bonefrac-process"],
        cwd=project, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def test_kill_worker_and_training_then_next_run_resumes_and_promotes(tmp_path: Path) -> None:
    project = make_project(tmp_path / "bonefrac", SMALL)
    log = tmp_path / "worker.log"
    with prefect_server(tmp_path / "prefect") as api:
        env = {k: v for k, v in os.environ.items() if k in ("HOME", "LANG", "TMPDIR")}
        env.update(
            PATH="/usr/bin:/bin",  # the docs' worker: no venv on PATH
            PYTHONPATH=str(project / "src"),  # env.sh's line
            PREFECT_API_URL=api,
            PREFECT_HOME=str(tmp_path / "prefect"),
            BENTOML_HOME=str(tmp_path / "bentoml"),
            PREFECT_LOGGING_LEVEL="WARNING",
            PREFECT_WORKER_QUERY_SECONDS="2",
            OMP_NUM_THREADS="1",
        )
        HTTP.post(f"{api}/work_pools/", json={"name": "bonefrac-process", "type": "process"}, timeout=30)
        subprocess.run(
            [str(BIN / "prefect"), "--no-prompt", "deploy", "--name", "retrain-nightly"],
            cwd=project, env={**env, "PATH": f"{BIN}:/usr/bin:/bin"}, check=True, capture_output=True,
        )  # fmt: skip
        dep = HTTP.get(f"{api}/deployments/name/retrain/retrain-nightly", timeout=30).json()

        def start_run() -> str:
            body = {"parameters": {"build": False}}  # the Bento build is not what this test is about
            return HTTP.post(f"{api}/deployments/{dep['id']}/create_flow_run", json=body, timeout=30).json()["id"]

        worker = _worker(project, env, log)
        first = start_run()
        ckpt = project / "models" / "train" / "last.ckpt"
        _wait(lambda: ckpt.exists() and _procs(project, "flows.train"), 1500, "training under way", log)
        training = _procs(project, "flows.train")
        prefect_worker = [c for c in psutil.Process(worker.pid).children() if "worker" in " ".join(c.cmdline())]

        # -- the fault: the worker (both processes) and the training, kill -9
        for p in [worker, *prefect_worker, *training]:
            with contextlib.suppress(ProcessLookupError, psutil.Error):
                os.kill(p.pid, signal.SIGKILL)
        worker.wait(10)
        t0 = time.monotonic()
        _wait(
            lambda: not _procs(project, "flows.") and not _procs(project, "dvc repro")
            and not _procs(project, "prefect.engine"),
            60, "every process of the killed run gone", log,
        )  # fmt: skip
        print(f"orphans gone {time.monotonic() - t0:.1f} s after the kill")
        epochs_done = load_checkpoint(ckpt)["epoch"] + 1
        assert epochs_done < SMALL["train"]["epochs"]  # really killed mid-training
        ck = load_checkpoint(ckpt)
        ck["history"][0]["train/loss"] = 123.0  # a mark that only a resumed training keeps
        save_checkpoint(ckpt, ck)

        # -- the next worker heals the dead run, and the next run resumes and promotes
        worker = _worker(project, env, log)
        try:
            _wait(lambda: _state(api, first)["state"]["type"] == "CRASHED", 120, "first run Crashed", log)
            second = start_run()
            _wait(
                lambda: _state(api, second)["state"]["type"] in {"COMPLETED", "FAILED", "CRASHED"},
                1800, "second run finished", log,
            )  # fmt: skip
            final = _state(api, second)
            assert final["state"]["type"] == "COMPLETED", final["state"].get("message")
            history = load_checkpoint(ckpt)["history"]
            assert len(history) == SMALL["train"]["epochs"] and history[0]["train/loss"] == 123.0
            logs = HTTP.post(
                f"{api}/logs/filter", json={"logs": {"flow_run_id": {"any_": [second]}}}, timeout=30
            ).json()
            assert any(e["message"].startswith("promoted") for e in logs), [e["message"] for e in logs][-5:]
            summary = json.loads((project / "models" / "train" / "train_summary.json").read_text())
            print(f"resumed after epoch {epochs_done}; summary: {summary['epochs_completed']} epochs")
        finally:
            os.killpg(worker.pid, signal.SIGINT)
            worker.wait(60)
