"""Mark flow runs whose process is gone as Crashed, so they stop holding a concurrency slot.

Why: a flow run killed with its node (kill -9, OOM killer, power loss) never
reports a final state; the server shows it ``Running`` forever, and with
``concurrency_limit: 1`` the next nightly retrain waits in
``AwaitingConcurrencySlot`` until the slot's lease expires. A process work pool
runs its flow runs on the worker's machine and records each one's PID
(``infrastructure_pid``), so a worker that starts on that machine can tell which
of its pool's runs are dead and say so. The state is forced (Prefect's minimal
policy), which still releases the deployment's concurrency slot.

Assumption (documented in docs/operations.md): every process worker of a pool
runs on the same machine. Pools spread over machines (Docker, Kubernetes) rely on
heartbeats instead (:mod:`bonefrac.ops.zombies`).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

ACTIVE_STATES = ("RUNNING", "PENDING", "CANCELLING")


@dataclass(frozen=True)
class SweptRun:
    flow_run_id: str
    name: str
    was: str
    now: str
    pid: int


def parse_pid(infrastructure_pid: str | None) -> int | None:
    """The PID in a process worker's ``infrastructure_pid`` (``"1234"`` or ``"host:1234"``)."""
    if not infrastructure_pid:
        return None
    tail = str(infrastructure_pid).rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else None


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process that could be a flow run (a reused PID of another program is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    cmdline = Path(f"/proc/{pid}/cmdline")
    if sys.platform.startswith("linux") and cmdline.exists():
        try:
            return b"python" in cmdline.read_bytes() or b"prefect" in cmdline.read_bytes()
        except OSError:
            return False
    return True


def sweep_dead_runs(pool: str, alive: object = pid_alive) -> list[SweptRun]:
    """Crash (or, when it was being cancelled, cancel) every active run of ``pool`` whose process is gone.

    Runs without a recorded PID are left alone: a worker may be starting them right now.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        WorkPoolFilter,
        WorkPoolFilterName,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelled, Crashed

    is_alive = alive if callable(alive) else pid_alive
    swept: list[SweptRun] = []
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType(s) for s in ACTIVE_STATES])
                )
            ),
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])),
        )
        for run in runs:
            pid = parse_pid(run.infrastructure_pid)
            if pid is None or is_alive(pid):
                continue
            was = run.state.type.value if run.state else "UNKNOWN"
            message = f"its process (PID {pid}) is gone: marked by the bonefrac sweep of pool {pool!r}"
            state = Cancelled(message=message) if was == "CANCELLING" else Crashed(message=message)
            client.set_flow_run_state(run.id, state, force=True)
            swept.append(SweptRun(str(run.id), run.name, was, state.type.value, pid))
    return swept

