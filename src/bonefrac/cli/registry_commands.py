"""CLI commands of the registry: ``bonefrac promote``, ``bonefrac rollback``, ``bonefrac models``.

Plain Typer-annotated functions; ``bonefrac.cli`` registers them. Errors the
user can fix (unknown tag, no champion, gate failed) print one line and exit
non-zero, without a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bonefrac.config import ConfigError, load_params, resolve
from bonefrac.errors import BonefracError


def _fail(msg: str, code: int = 1) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def _follow(params_path: Path, name: str) -> None:
    """After a change of champion: the drift reference is rebuilt for it (a failure warns, the change stands)."""
    from bonefrac.registry.lifecycle import refresh_drift_reference

    try:
        typer.echo(refresh_drift_reference(load_params(params_path), name=name, force=True))
    except (BonefracError, ConfigError, OSError) as err:
        typer.echo(
            f"warning: the drift reference was not rebuilt ({err}); the next drift check rebuilds it", err=True
        )


def promote(
    tag: Annotated[str, typer.Argument(help="model tag, e.g. bonefrac:abc123 (see `bonefrac models`)")],
    force: Annotated[
        bool, typer.Option("--force", help="skip the promotion gate (recorded in the history)")
    ] = False,
    params: Annotated[Path, typer.Option(help="params file (promotion thresholds, cache location)")] = Path(
        "params.yaml"
    ),
) -> None:
    """Make a registered model the champion, if it passes the promotion gate on the current test split."""
    from bonefrac.registry import gate, store

    try:
        p = load_params(params)
        if force:
            previous = store.promote(tag, reason="manual promotion with --force (gate skipped)")
            typer.echo(f"promoted {tag} without the gate" + (f"; archived {previous}" if previous else ""))
        else:
            decision = gate.judge(tag, resolve(p.paths.processed), p.promotion, seed=p.seed)
            for reason in decision.reasons:
                typer.echo(f"  - {reason}")
            if not decision.promote:
                _fail(f"{tag} did not pass the promotion gate (use --force to override)")
            typer.echo(gate.apply(decision, tag))
    except (BonefracError, ConfigError, FileNotFoundError) as err:
        _fail(str(err))
    _follow(params, tag.partition(":")[0])


def rollback(
    name: Annotated[str, typer.Argument(help="model name in the registry")] = "bonefrac",
    params: Annotated[Path, typer.Option(help="params file (where the drift reference and cache are)")] = Path(
        "params.yaml"
    ),
) -> None:
    """Put the previous champion back; the current champion is archived."""
    from bonefrac.registry import store

    try:
        restored, retired = store.rollback(name)
    except BonefracError as err:
        _fail(str(err))
        return
    typer.echo(f"champion is now {restored} (was {retired})")
    _follow(params, name)


def models(
    name: Annotated[str, typer.Argument(help="model name in the registry")] = "bonefrac",
    stage: Annotated[
        str | None, typer.Option(help="only this stage: champion|challenger|rejected|archived")
    ] = None,
) -> None:
    """List registered models with stage, test AUROC, data version and commit (newest first)."""
    from rich.console import Console
    from rich.table import Table

    from bonefrac.registry import store

    records = store.list_models(name, stage=stage)
    if not records:
        typer.echo(f"no models named {name!r} in {store.bentoml_home() / 'models'}")
        return
    table = Table(title=f"{name} models")
    # the tag is what `promote`/`rollback` take: never shortened, whatever the terminal's width
    table.add_column("tag", no_wrap=True, min_width=max(len(r.tag) for r in records))
    table.add_column("stage", no_wrap=True)
    for col in ("created", "test AUROC", "data version", "git commit"):
        table.add_column(col)
    for r in records:
        metrics = r.metadata.get("metrics") or {}
        auroc = metrics.get(
            "auroc", (metrics.get("test") or {}).get("auroc") if isinstance(metrics, dict) else None
        )
        table.add_row(
            r.tag,
            r.stage,
            f"{r.created:%Y-%m-%d %H:%M}",
            "" if auroc in (None, "") else f"{float(auroc):.3f}",
            r.labels.get("data_version", ""),
            r.labels.get("git_commit", ""),
        )
    Console().print(table)
