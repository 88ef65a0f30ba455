"""Child servers on 127.0.0.1: a free port to start one on, and a stop that takes its whole process group.

One place for the local Prefect server (:mod:`bonefrac.ops.prefect_api`), the servers the
benchmarks measure (``benchmarks/_servers.py``) and the tests' servers. Kept out of
:mod:`bonefrac.proc`, which every DVC stage depends on.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_group(
    proc: subprocess.Popen[bytes], grace_s: float = 20.0, first: signal.Signals = signal.SIGINT
) -> None:
    """Stop a child started with ``start_new_session=True`` and all its group: ``first``, SIGKILL after ``grace_s``.

    SIGINT by default, so a uvicorn server (Prefect's) shuts down cleanly and its own children
    go with it; BentoML drains in-flight requests on SIGTERM.
    """
    for sig, wait_s in ((first, grace_s), (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait_s)
