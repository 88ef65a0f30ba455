"""One Prefect API for a whole pipeline run: the operator's server if set, else one local server.

Why: every DVC stage is a Prefect flow in its own process (``python -m
flows.<stage>``). Without ``PREFECT_API_URL`` each of them starts and stops
Prefect's ephemeral server, a subprocess that imports the server stack and
opens the database, several seconds of every stage (measured by
``python -m benchmarks.prefect_flow_start``; BENCHMARKS.md). ``bonefrac run``
and ``bonefrac exp-run`` (``make run``, ``make run-fracatlas``) start one
server for the whole run instead and stop it when the run ends, also when the
run fails or is interrupted.

An operator's ``PREFECT_API_URL`` (a real server with a UI, a worker's API)
always wins: then nothing is started and the runs appear there. A plain
``dvc repro`` still works as before, through the ephemeral servers.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx

from bonefrac.errors import BonefracError
from bonefrac.ops.processes import free_port, stop_group
from bonefrac.proc import tool_cmd, tool_env

LOG_NAME = "local-server.log"
STARTUP_TIMEOUT = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"  # one start-up limit for both kinds


class PrefectServerError(BonefracError):
    """The local Prefect server did not answer its health check in time."""


def _healthy(api: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{api}/health", timeout=5).status_code == 200
    return False


@contextlib.contextmanager
def local_prefect_api(env: Mapping[str, str], timeout_s: float | None = None) -> Iterator[dict[str, str]]:
    """``env`` with a ``PREFECT_API_URL`` the run's stages share, for the duration of the block.

    ``env`` must carry the project's ``PREFECT_HOME`` (``make``/``env.sh`` set it):
    the server keeps its database and its log (``local-server.log``) there. The
    server listens on 127.0.0.1 only, on a free port, without the UI (nobody
    could open it before it stops). It has ``timeout_s`` to answer, by default the
    start-up time Prefect allows its own temporary servers (``env.mk`` sets 120 s).
    """
    if env.get("PREFECT_API_URL"):
        yield dict(env)
        return
    home = Path(env.get("PREFECT_HOME") or Path.home() / ".prefect")
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    server_env = tool_env({**env, "PREFECT_UI_ENABLED": "false"})
    cmd = tool_cmd("prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port))
    with (home / LOG_NAME).open("wb") as log:
        proc = subprocess.Popen(cmd, env=server_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            limit_s = timeout_s if timeout_s is not None else float(env.get(STARTUP_TIMEOUT, "120"))
            deadline = time.monotonic() + limit_s
            while not _healthy(api):
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = (home / LOG_NAME).read_text(errors="replace")[-1500:]
                    raise PrefectServerError(f"the local Prefect server did not start (log {home / LOG_NAME}):\n{tail}")
                time.sleep(0.5)
            yield {**env, "PREFECT_API_URL": api}
        finally:
            stop_group(proc)
