"""How every stage script starts: params checked first, user errors shown without traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from prefect.states import Failed, State

from bonefrac.config import ConfigError, load_params
from bonefrac.errors import user_error_types


def guarded(fn: Callable[[], str]) -> str | State:
    """Run a flow body; a user-facing error becomes a Failed state carrying its message."""
    try:
        summary = fn()
    except user_error_types() as err:
        return Failed(message=f"{type(err).__name__}: {err}")
    print(summary)
    return summary


def pin_source_date_epoch() -> None:
    """Set ``SOURCE_DATE_EPOCH`` to the time of the checked-out commit, unless already set.

    Reports date themselves from it (reproducible-builds.org convention), so rerunning
    the pipeline on the same commit writes the same bytes. Without git it stays unset
    and reports carry the current time.
    """
    if os.environ.get("SOURCE_DATE_EPOCH"):
        return
    try:
        out = subprocess.run(
            ["git", "log", "-1", "--format=%ct"], capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return
    if out.isdigit():
        os.environ["SOURCE_DATE_EPOCH"] = out


def run_stage(flow_fn: Any, argv: list[str]) -> None:
    """``python -m flows.<stage> [params.yaml]``: exit 2 on bad params, 1 on a failed stage."""
    params_path = argv[1] if len(argv) > 1 else "params.yaml"
    pin_source_date_epoch()
    try:
        load_params(params_path)  # fail fast, before Prefect starts, naming the bad key
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    state = flow_fn(params_path, return_state=True)
    if state.is_failed():
        print(f"error: stage {flow_fn.name!r} failed: {state.message}", file=sys.stderr)
        raise SystemExit(1)
