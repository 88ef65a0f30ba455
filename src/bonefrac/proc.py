"""Child processes that use the project's own tools and never outlive their parent.

Why this module exists: the pipeline is started from places that do not share
a ``PATH`` — ``make`` (venv on PATH), a user's shell (``.venv/bin/bonefrac``,
venv not on PATH), a Prefect worker (whatever PATH its service manager gave
it). Looking ``dvc`` up on PATH then fails (``FileNotFoundError: 'dvc'``) or,
worse, finds another installation; and DVC's stage commands (``python -m
flows.train``) find a ``python`` without the project's packages. So tools run as
``<this interpreter> -m <tool>`` and their children get this interpreter's
folder first on PATH.

A long chain (worker → flow run → ``dvc repro`` → training → DDP ranks) must
also die as one: when a link is killed with SIGKILL, nothing tells its children,
and an orphaned training keeps the GPU busy for hours. Each link therefore ties
itself to its parent: children we start get Linux's parent-death signal, and a
process started by someone else (the flow run by Prefect's worker, a stage by
DVC) watches its parent with :func:`exit_with_parent`, and takes its own
descendants along when it goes.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import psutil

log = logging.getLogger("bonefrac.proc")

# Tool -> the module its console script runs (the same code, found through this interpreter).
TOOL_MODULES = {
    "dvc": "dvc",
    "bentoml": "bentoml",
    "prefect": "prefect",
    "torchrun": "torch.distributed.run",
}

_PR_SET_PDEATHSIG = 1
_watcher: threading.Thread | None = None


def tool_cmd(tool: str, *args: str) -> list[str]:
    """``[sys.executable, "-m", <module>, *args]``: the tool of *this* environment, whatever PATH says."""
    return [sys.executable, "-m", TOOL_MODULES.get(tool, tool), *args]


def tool_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this environment) with this interpreter's folder first on PATH.

    DVC runs stage commands through a shell, so ``python -m flows.train`` must find
    the venv's ``python``; the same holds for any console script a tool starts.
    """
    env = dict(os.environ if base is None else base)
    bindir = str(Path(sys.executable).parent)
    parts = [p for p in env.get("PATH", "").split(os.pathsep) if p]
    if not parts or parts[0] != bindir:
        env["PATH"] = os.pathsep.join([bindir, *[p for p in parts if p != bindir]])
    return env


def _set_parent_death_signal(sig: int = signal.SIGTERM) -> None:
    """In the child, before exec: the kernel sends ``sig`` when the parent dies (Linux only)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def child_preexec() -> Callable[[], None] | None:
    """``preexec_fn`` that makes a child die with the thread that started it (None off Linux).

    The signal fires when the *thread* that forked exits, so call this only from a
    thread that waits for the child (``subprocess.run``), as every caller here does.
    """
    return _set_parent_death_signal if sys.platform.startswith("linux") else None


def run_tool(
    cmd: Sequence[str],
    cwd: str | Path,
    *,
    timeout: float | None = None,
    capture: bool = True,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` (see :func:`tool_cmd`) with :func:`tool_env`, dying if this process dies."""
    return subprocess.run(
        list(cmd),
        cwd=cwd,
        env=tool_env(env),
        capture_output=capture,
        text=True,
        timeout=timeout,
        preexec_fn=child_preexec(),
    )


SHELLS = {"sh", "dash", "bash", "zsh"}


def _ppid(pid: int) -> int | None:
    try:
        return psutil.Process(pid).ppid()
    except psutil.Error:
        return None


def _stop_descendants(grace_s: float) -> None:
    """SIGTERM every descendant (``dvc repro``, its shell, the training, DDP ranks), SIGKILL the stragglers."""
    try:
        kids = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    for k in kids:
        with contextlib.suppress(psutil.Error):
            k.terminate()
    _, alive = psutil.wait_procs(kids, timeout=grace_s)
    for k in alive:
        with contextlib.suppress(psutil.Error):
            k.kill()


def exit_with_parent(interval_s: float = 1.0, grace_s: float = 5.0) -> bool:
    """Watch the parent process; when it is gone, stop every descendant and exit (status 143).

    For processes whose parent is not ours to configure (Prefect's worker starts the
    flow run, DVC starts a stage). When the parent is a shell (DVC runs a stage as
    ``sh -c "python -m flows.train"``, and ``sh`` outlives a killed DVC), the shell's
    parent is watched too. The exit is ``os._exit``, not a signal to ourselves:
    Prefect's engine installs its own SIGTERM handler, and a flow run was seen to
    survive it (and go on to retry ``dvc repro``). Outputs are written atomically and
    training checkpoints every epoch, so nothing is left half-written. The run's
    state is not reported from here (an API call from this thread could hang): the
    worker's sweep and the heartbeat automation mark it Crashed. Starts one daemon
    thread per process; returns False (and watches nothing) when the parent is
    already init (a daemon by design).
    """
    global _watcher
    parent = os.getppid()
    if parent <= 1:
        return False
    if _watcher is not None and _watcher.is_alive():
        return True
    try:
        grandparent = psutil.Process(parent).ppid() if psutil.Process(parent).name() in SHELLS else None
    except psutil.Error:
        grandparent = None

    def orphaned() -> bool:
        return os.getppid() != parent or (grandparent is not None and _ppid(parent) != grandparent)

    def watch() -> None:
        while not orphaned():
            time.sleep(interval_s)
        # The parent often held our stdout/stderr (Prefect streams a flow run's output through
        # its worker): a handler writing there fails — rich's console even raises SystemExit on
        # a broken pipe — and must not stop the stop.
        with contextlib.suppress(BaseException):
            log.warning("parent process %d is gone: stopping this process and its children", parent)
        with contextlib.suppress(BaseException):
            _stop_descendants(grace_s)
        os._exit(128 + signal.SIGTERM)

    _watcher = threading.Thread(target=watch, name="bonefrac-exit-with-parent", daemon=True)
    _watcher.start()
    return True
