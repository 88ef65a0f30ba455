"""What one DVC stage's Prefect flow costs with its own temporary server vs a running one.

Every DVC stage is a Prefect flow in its own process. Without ``PREFECT_API_URL`` each
such process starts Prefect's ephemeral server (a subprocess that imports the server stack
and opens the database) and stops it again; ``bonefrac run`` / ``exp-run`` start one local
server for the whole run instead (:func:`bonefrac.ops.prefect_api.local_prefect_api`). This
times a fresh Python process that runs a minimal flow (one task) to completion, both ways,
taking turns, and reports medians — the fixed cost a stage pays before and after its work.

    python -m benchmarks.prefect_flow_start [--repeats 5]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._common import (
    REPO_ROOT,
    child_env,
    command_line,
    envelope,
    markdown_table,
    print_table,
    summarize,
    write_result,
)
from bonefrac.ops.prefect_api import local_prefect_api

NAME = "prefect_flow_start"
MODES = ("ephemeral_server", "running_server")

CHILD = """
from prefect import flow, task

@task
def one() -> int:
    return 1

@flow(name="bench-minimal")
def minimal() -> int:
    return one()

assert minimal() == 1
"""


def run_flow(env: dict[str, str]) -> float:
    """Wall seconds of a fresh process that runs the minimal flow to completion."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"the minimal flow failed:\n{proc.stderr[-2000:]}")
    return seconds


def measure(repeats: int) -> tuple[list[dict[str, Any]], float]:
    """Per mode the flow's wall seconds; plus the seconds the shared server took to answer."""
    with tempfile.TemporaryDirectory(prefix="bonefrac-prefect-bench-") as tmp:
        env = child_env(Path(tmp), {"PYTHONPATH": f"{REPO_ROOT / 'src'}:{REPO_ROOT}"})
        env.pop("PREFECT_API_URL", None)
        runs: dict[str, list[float]] = {m: [] for m in MODES}
        start = time.perf_counter()
        with local_prefect_api(env) as served:
            server_start_s = time.perf_counter() - start
            run_flow(served)  # the first flow on a new database also creates its tables' rows: not timed
            run_flow(env)
            for _ in range(repeats):
                runs["ephemeral_server"].append(run_flow(env))
                runs["running_server"].append(run_flow(served))
    rows = [{"mode": m, "seconds": summarize(runs[m])} for m in MODES]
    return rows, server_start_s


def render_markdown(result: dict[str, Any]) -> str:
    rows = {r["mode"]: r for r in result["rows"]}
    eph, run = rows["ephemeral_server"]["seconds"]["median"], rows["running_server"]["seconds"]["median"]
    table = markdown_table(
        ["a fresh process running a one-task flow", "median s", "IQR s"],
        [[m.replace("_", " "), f"{rows[m]['seconds']['median']:.1f}", f"{rows[m]['seconds']['iqr']:.1f}"]
         for m in MODES],
    )  # fmt: skip
    return (
        f"Median of {result['settings']['repeats']}, taking turns; the shared server answered its health "
        f"check after {result['settings']['server_start_s']:.1f} s. A stage saves {eph - run:.1f} s "
        f"({eph / run:.1f}×) on a running server.\n\n" + table
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--name", default=NAME)
    args = ap.parse_args(argv)
    rows, server_start_s = measure(args.repeats)
    print_table(
        "A minimal Prefect flow in a fresh process",
        ["mode", "median s", "IQR s"],
        [[r["mode"], r["seconds"].median, r["seconds"].iqr] for r in rows],
    )
    result = envelope(
        args.name,
        command_line("benchmarks.prefect_flow_start", argv if argv is not None else sys.argv[1:]),
        rows,
        settings={"repeats": args.repeats, "server_start_s": round(server_start_s, 2)},
    )
    write_result(args.name, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
