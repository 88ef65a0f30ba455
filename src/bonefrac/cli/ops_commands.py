"""``bonefrac ops ...``: run the scheduled operations (Prefect worker) and heal dead runs."""

from __future__ import annotations

from typing import Annotated

import typer

from bonefrac.config import project_root

app = typer.Typer(help="Scheduled operations: the Prefect worker and the healing of dead flow runs.")

PoolOpt = Annotated[str, typer.Option("--pool", help="work pool (prefect.yaml: bonefrac-process)")]


@app.command("worker", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def worker(
    ctx: typer.Context,
    pool: PoolOpt = "bonefrac-process",
    stop_timeout: Annotated[
        float, typer.Option(help="seconds a stopping worker waits for its runs before stopping them")
    ] = 10.0,
    sweep: Annotated[bool, typer.Option(help="mark the pool's dead runs Crashed at start and stop")] = True,
) -> None:
    """Start a Prefect worker in the project's environment (env.mk, its tools, decision logs at INFO).

    Extra arguments go to `prefect worker start` (e.g. `--limit 1`). Ctrl-C stops it
    within `--stop-timeout` seconds; runs it was executing stop with it and are
    marked Crashed (training resumes from its last epoch on the next run).
    """
    from bonefrac.ops.worker import run_worker

    raise typer.Exit(run_worker(pool, project_root(), list(ctx.args), stop_timeout_s=stop_timeout, sweep=sweep))


@app.command("sweep")
def sweep(pool: PoolOpt = "bonefrac-process") -> None:
    """Mark the pool's runs whose process is gone as Crashed (frees the deployment's concurrency slot)."""
    from bonefrac.ops.sweep import sweep_dead_runs

    swept = sweep_dead_runs(pool)
    for r in swept:
        typer.echo(f"{r.name} ({r.flow_run_id}): {r.was} -> {r.now} (process {r.pid} gone)")
    typer.echo(f"{len(swept)} dead run(s) in pool {pool!r}")
