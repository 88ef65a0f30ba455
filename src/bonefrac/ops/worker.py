"""``bonefrac ops worker``: a Prefect process worker in the project's environment, that stops on Ctrl-C.

Why not just ``prefect worker start``: (1) its environment is whatever the shell
or service manager gave it, so flow runs missed the project's settings
(``env.mk``: analytics off, ``PREFECT_HOME``, ``BENTOML_HOME``) and its tools;
(2) at ``PREFECT_LOGGING_LEVEL=WARNING`` (the project's quiet console) the
flow runs' INFO logs — the gate's verdict, the promotion — never reach the
Prefect API, so the UI showed no decision; (3) on SIGINT Prefect's worker waits
for its flow runs (hours for a retrain) and was seen taking new runs meanwhile.

So this entry: applies ``env.mk`` (values already set win, as with ``make VAR=``),
puts this interpreter's folder first on PATH, lets flow-run and task-run logs
through at INFO (console and API) while Prefect's own chatter stays at the
project level, turns flow-run heartbeats on, marks its pool's dead runs Crashed
(:mod:`bonefrac.ops.sweep`), then runs the worker in a child process. On
SIGINT/SIGTERM it asks the worker to stop, and after ``stop_timeout_s`` kills it;
the flow runs it started notice (``bonefrac.proc.exit_with_parent``) and stop,
their training keeping its last checkpoint; a last sweep marks them Crashed.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import psutil

from bonefrac.proc import child_preexec, tool_cmd, tool_env

# Flow-run logs at INFO reach the API (UI) and the worker's console whatever
# PREFECT_LOGGING_LEVEL says; Prefect's own loggers keep the project's level.
RUN_LOG_LEVELS = {
    "PREFECT_LOGGING_LOGGERS_PREFECT_FLOW_RUNS_LEVEL": "INFO",
    "PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL": "INFO",
}
HEARTBEAT = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}

_ENV_LINE = re.compile(r"^([A-Z_][A-Z0-9_]*) := (.*)$")


def read_env_mk(root: Path) -> dict[str, str]:
    """The ``VAR := value`` lines of ``env.mk`` with ``$(CURDIR)`` = ``root`` (what ``make`` and env.sh export)."""
    path = root / "env.mk"
    out: dict[str, str] = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        m = _ENV_LINE.match(line.strip())
        if m:
            out[m.group(1)] = m.group(2).strip().replace("$(CURDIR)", str(root))
    return out


def project_env(root: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The worker's environment: ``base`` + env.mk defaults + run-log levels + heartbeats + tools on PATH."""
    env = dict(os.environ if base is None else base)
    for key, value in {**read_env_mk(root), **RUN_LOG_LEVELS, **HEARTBEAT}.items():
        env.setdefault(key, value)
    paths = [str(root / "src"), str(root)]
    old = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in paths]
    env["PYTHONPATH"] = os.pathsep.join(paths + old)  # flows/ import `flows._stage`
    return tool_env(env)


def _stop(proc: subprocess.Popen[bytes], timeout_s: float, say: Callable[[str], None]) -> int:
    """SIGINT the worker; SIGKILL it after ``timeout_s``. Returns its exit code."""
    if proc.poll() is None:
        say(f"stopping the worker (PID {proc.pid}); runs still going after {timeout_s:g} s are stopped")
        os.killpg(proc.pid, signal.SIGINT)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait()


def run_worker(
    pool: str,
    root: Path,
    worker_args: list[str] | None = None,
    stop_timeout_s: float = 10.0,
    sweep: bool = True,
    say: Callable[[str], None] | None = None,
) -> int:
    """Sweep ``pool``'s dead runs, run ``prefect worker start --pool pool``, stop it on SIGINT/SIGTERM."""
    say = say or (lambda msg: print(msg, flush=True))  # before the worker's own lines, also in a log file
    env = project_env(root)
    os.environ.update(env)  # this process talks to the API too (sweep, automation)
    if sweep:
        _sweep(pool, say)
        _zombie_automation(say)
    cmd = tool_cmd("prefect", "worker", "start", "--pool", pool, *(worker_args or []))
    # Own session: a Ctrl-C on the terminal reaches only this process, which decides.
    # Parent-death signal: if this process is killed, the worker goes too.
    proc = subprocess.Popen(cmd, cwd=root, env=env, start_new_session=True, preexec_fn=child_preexec())
    stop_requested: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stop_requested.append(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while proc.poll() is None and not stop_requested:
            time.sleep(0.2)
        t0 = time.monotonic()
        runs: list[psutil.Process] = []
        with contextlib.suppress(psutil.Error):
            runs = psutil.Process(proc.pid).children()  # the flow runs it started
        rc = _stop(proc, stop_timeout_s, say)
        if stop_requested:
            if sweep:
                _wait_runs_gone(pool, runs, say, timeout_s=stop_timeout_s + 20)
            say(f"worker stopped in {time.monotonic() - t0:.1f} s")
            return 0
        return rc
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _sweep(pool: str, say: Callable[[str], None]) -> None:
    from bonefrac.ops.sweep import sweep_dead_runs

    try:
        swept = sweep_dead_runs(pool)
    except Exception as err:
        say(f"sweep of pool {pool!r} skipped: {type(err).__name__}: {err}")
        return
    for r in swept:
        say(f"flow run {r.name!r} ({r.flow_run_id}) was {r.was} but its process {r.pid} is gone: now {r.now}")


def _zombie_automation(say: Callable[[str], None]) -> None:
    from bonefrac.ops.zombies import ensure_zombie_automation

    try:
        ensure_zombie_automation()
    except Exception as err:
        say(f"zombie-run automation not installed: {type(err).__name__}: {err}")


def _wait_runs_gone(pool: str, runs: list[psutil.Process], say: Callable[[str], None], timeout_s: float) -> None:
    """The worker's flow runs stop within seconds of it (exit_with_parent); sweep what they did not report."""
    from bonefrac.ops.sweep import sweep_dead_runs

    _, alive = psutil.wait_procs(runs, timeout=timeout_s)
    for p in alive:
        say(f"flow run process {p.pid} still running {timeout_s:g} s after its worker: killing it")
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)
    try:
        swept = sweep_dead_runs(pool)
    except Exception as err:
        say(f"final sweep skipped: {type(err).__name__}: {err}")
        return
    for r in swept:
        say(f"flow run {r.name!r} stopped with the worker: marked {r.now}")
