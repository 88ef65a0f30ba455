"""How every stage script starts: params checked first, user errors shown without traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from prefect.states import Failed, State

from bonefrac.config import ConfigError, load_params
from bonefrac.errors import user_error_types
from bonefrac.proc import exit_with_parent


def guarded(fn: Callable[[], str]) -> str | State:
    """Run a flow body; a user-facing error becomes a Failed state carrying its message."""
    try:
        summary = fn()
    except user_error_types() as err:
        return Failed(message=f"{type(err).__name__}: {err}")
    # One line per stage on the console whatever the log level (a plain print inside a flow
    # becomes an INFO log line, hidden at the WARNING level make sets), and in the run's log.
    sys.stdout.write(summary + "\n")
    sys.stdout.flush()
    print(summary)
    return summary


def run_stage(flow_fn: Any, argv: list[str]) -> None:
    """``python -m flows.<stage> [params.yaml]``: exit 2 on bad params, 1 on a failed stage."""
    params_path = argv[1] if len(argv) > 1 else "params.yaml"
    # Started by `dvc repro` (itself started by a retrain run): if DVC is killed, stop
    # instead of training on as an orphan. The checkpoint of the last epoch stays, and
    # the next run resumes from it.
    exit_with_parent()
    try:
        load_params(params_path)  # fail fast, before Prefect starts, naming the bad key
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    state = flow_fn(params_path, return_state=True)
    if state.is_failed():
        print(f"error: stage {flow_fn.name!r} failed: {state.message}", file=sys.stderr)
        raise SystemExit(1)
