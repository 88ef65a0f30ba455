"""The worker's environment is the project's (env.mk, tools, run logs at INFO), and dead PIDs are told apart."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bonefrac.ops.sweep import parse_pid, pid_alive
from bonefrac.ops.worker import project_env, read_env_mk

ROOT = Path(__file__).resolve().parents[2]


def test_worker_env_is_the_projects_with_run_logs_at_info() -> None:
    mk = read_env_mk(ROOT)
    assert mk["DO_NOT_TRACK"] == "1" and mk["BENTOML_HOME"] == str(ROOT / ".bentoml")  # $(CURDIR) resolved
    env = project_env(ROOT, {"PATH": "/usr/bin:/bin", "PREFECT_HOME": "/elsewhere", "PYTHONPATH": "/x"})
    assert env["PREFECT_HOME"] == "/elsewhere"  # what the caller set wins, as with `make VAR=...`
    assert env["DVC_NO_ANALYTICS"] == "1" and env["PREFECT_LOGGING_LEVEL"] == mk["PREFECT_LOGGING_LEVEL"]
    # the gate's INFO decisions reach the API although the project's level is WARNING
    assert env["PREFECT_LOGGING_LOGGERS_PREFECT_FLOW_RUNS_LEVEL"] == "INFO"
    assert env["PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL"] == "INFO"
    assert int(env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"]) >= 30  # Prefect's minimum
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert env["PYTHONPATH"].split(os.pathsep) == [str(ROOT / "src"), str(ROOT), "/x"]


def test_pids_of_process_workers_are_parsed_and_checked() -> None:
    assert parse_pid("1234") == 1234 and parse_pid("node-1:1234") == 1234
    assert parse_pid(None) is None and parse_pid("container-abc") is None
    assert pid_alive(os.getpid())
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert not pid_alive(gone.pid)
