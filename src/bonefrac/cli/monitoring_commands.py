"""Typer commands ``bonefrac drift`` and ``bonefrac metrics`` (registered in ``bonefrac.cli``).

``metrics`` prints the DVC metrics files one under another, a value (with its 95 % CI when the
file has ``*_ci_low``/``*_ci_high``) per line: ``dvc metrics show`` puts every key of every file
in one table row, ~130 columns wide here.

``drift`` compares a batch (a folder of images, or a split of the pipeline's cache) with the
drift reference and writes Evidently's report, offline (the service's prediction log is the
drift flow's job, ``flows/drift.py``: the CLI sits beside serving, not above it). The
reference is the one the retrain flow keeps for the champion (``models/drift_reference``);
when there is none it is built here, by the same builder, from the champion (or the model
named by ``--model``, or the pipeline's ``models/model.pt`` when the store has no champion)
on the training split of the cache.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from bonefrac.cli.inference_commands import ModelOpt

EXIT_DRIFT = 3


def _say(message: str) -> None:
    typer.echo(message, err=True)


def _load_model(model: str | None, fallback: Path) -> Any:
    """``--model``, else ``$BONEFRAC_MODEL_PATH``, else the champion, else the pipeline's own bundle."""
    from bonefrac.registry.resolve import ModelNotFoundError, load_file, resolve_model

    try:
        return resolve_model(model)
    except ModelNotFoundError:
        if model is None and fallback.is_file():
            _say(f"no champion in the model store: using the pipeline's {fallback}")
            return load_file(fallback)
        raise


def drift(
    images: Annotated[Path | None, typer.Option("--images", help="a folder of new images (recursive)")] = None,
    split: Annotated[
        str | None, typer.Option("--split", help="a split of the pipeline's cache instead: train, val or test")
    ] = None,
    model: ModelOpt = None,
    reference: Annotated[
        Path | None, typer.Option("--reference", help="reference folder (default: models/drift_reference)")
    ] = None,
    rebuild_reference: Annotated[
        bool, typer.Option("--rebuild-reference", help="build the reference again from the model")
    ] = False,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="report folder (default: reports/drift/<time>)")
    ] = None,
    fail_on_drift: Annotated[bool, typer.Option("--fail-on-drift", help=f"exit {EXIT_DRIFT} on drift")] = False,
    params: Annotated[Path, typer.Option("--params", "-p", help="params file")] = Path("params.yaml"),
) -> None:
    """Drift of a batch against the training reference: Evidently report (HTML + JSON), verdict on the console."""
    if (images is None) == (split is None):
        raise typer.Exit(_error("give one of --images DIR or --split NAME"))
    from bonefrac.config import load_params, resolve
    from bonefrac.errors import user_error_types
    from bonefrac.monitoring.drift import run_drift
    from bonefrac.monitoring.reference import (
        build_reference,
        current_from_images,
        list_images,
        load_reference,
        split_features,
    )
    from bonefrac.monitoring.split_drift import drift_metrics, verdict_line

    try:
        p = load_params(params)
        cache_dir = resolve(p.paths.processed)
        ref_dir = reference or resolve(p.paths.models) / "drift_reference"
        loaded = None
        if rebuild_reference or not (ref_dir / "reference.csv").exists():
            loaded = _load_model(model, resolve(p.paths.models) / "model.pt")
            who = f"{loaded.name}:{loaded.version}"
            _say(f"no drift reference at {ref_dir}" if not rebuild_reference else f"rebuilding {ref_dir}")
            _say(f"building it from model {who} on the training split of {cache_dir}...")
            ref = build_reference(
                cache_dir,
                ref_dir,
                bundle=loaded.bundle,
                embedding_dims=p.drift.embedding_dims,
                seed=p.seed,
                provenance={"model": who},
            )
        else:
            ref = load_reference(ref_dir)
        built_for = ref.meta.get("model_tag") or ref.meta.get("model") or "an unrecorded model"
        _say(f"reference: {ref_dir} ({len(ref.table)} images, built for {built_for})")
        needs_model = ref.reducer is not None or "score" in ref.table.columns
        if needs_model and loaded is None:
            loaded = _load_model(model, resolve(p.paths.models) / "model.pt")
        if loaded is not None and built_for not in (f"{loaded.name}:{loaded.version}", "an unrecorded model"):
            _say(
                f"warning: the reference was built for {built_for}, the scores come from "
                f"{loaded.name}:{loaded.version}; --rebuild-reference compares like with like"
            )
        bundle = loaded.bundle if (loaded is not None and needs_model) else None
        if images is not None:
            current, skipped = current_from_images(list_images(images), bundle=bundle, reducer=ref.reducer)
            what = f"{images}"
            order = "the folder's sorted file listing"
        else:
            if loaded is None:
                loaded = _load_model(model, resolve(p.paths.models) / "model.pt")
            current, _, skipped = split_features(cache_dir, loaded.bundle, split=str(split), reducer=ref.reducer)
            what = f"{split} split"
            order = f"the {split} rows of the cache's index.csv"
        if skipped:
            # positions, not names: a file name can identify a patient (list_images sorts the folder)
            more = f", and {len(skipped) - 3} more" if len(skipped) > 3 else ""
            _say(
                f"{len(skipped)} images could not be read and were left out ({'; '.join(skipped[:3])}{more}; "
                f"counted in {order}; file names are not shown)"
            )
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        out_dir = out or resolve(p.paths.reports) / "drift" / stamp
        result = run_drift(ref.table, current, p.drift, out_dir)
    except (FileNotFoundError, *user_error_types()) as err:
        raise typer.Exit(_error(str(err))) from None
    typer.echo(verdict_line(drift_metrics(result), f"{what} vs reference"))
    if result.drifted_columns:
        typer.echo(f"  drifted: {', '.join(result.drifted_columns)}")
    for note in result.warnings:
        typer.echo(f"  note: {note}")
    typer.echo(f"  report: {result.html_path}")
    if fail_on_drift and result.dataset_drift:
        raise typer.Exit(EXIT_DRIFT)


def _error(message: str) -> int:
    typer.echo(f"error: {message}", err=True)
    return 1


def _metric_files(root: Path) -> list[Path]:
    """The metrics files dvc.yaml declares, in stage order."""
    import yaml

    spec = yaml.safe_load((root / "dvc.yaml").read_text()) or {}
    files = []
    for stage in (spec.get("stages") or {}).values():
        for entry in stage.get("metrics") or []:
            files.append(root / (next(iter(entry)) if isinstance(entry, dict) else str(entry)))
    return files


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    if isinstance(v, list):
        return ", ".join(map(str, v)) or "-"
    return str(v)


def format_metrics(name: str, data: dict[str, Any], width: int = 88) -> list[str]:
    """One section: ``name``, then ``label  value`` lines, compact where the file's shape allows.

    ``x`` with ``x_ci_low``/``x_ci_high`` → ``x  value  (low–high)``; a check's ``_success`` and
    ``_failures`` → one ``ok`` / ``FAILED (n)`` line; a group of short keys (``0``/``1`` counts)
    → one line; a group of one key → its dotted name.
    """
    flat = _flatten(data)
    ci = {k[: -len(suffix)] for k in flat for suffix in ("_ci_low", "_ci_high") if k.endswith(suffix)}
    groups: dict[str, list[tuple[str, str]]] = {}
    for key, raw in flat.items():
        if key.endswith(("_ci_low", "_ci_high")) or (key.endswith("_failures") and f"{key[:-9]}_success" in flat):
            continue
        head, _, leaf = key.rpartition(".")
        if key.endswith("_success") and f"{key[:-8]}_failures" in flat:
            failures = flat[f"{key[:-8]}_failures"]
            leaf, value = leaf[:-8], "ok" if raw else f"FAILED ({_fmt(failures)})"
        else:
            value = _fmt(raw)
            if key in ci:
                value += f"  ({_fmt(flat[key + '_ci_low'])}–{_fmt(flat[key + '_ci_high'])})"
        groups.setdefault(head, []).append((leaf, value))
    rows: list[tuple[str, str] | str] = []
    for head, items in groups.items():
        if not head:
            rows += items
        elif len(items) == 1:
            rows.append((f"{head}.{items[0][0]}", items[0][1]))
        elif all(len(leaf) <= 3 for leaf, _ in items):
            rows.append((head, " · ".join(f"{leaf}: {v}" for leaf, v in items)))
        else:
            rows.append(head)
            rows += [("  " + leaf, v) for leaf, v in items]
    pad = min(max((len(r[0]) for r in rows if isinstance(r, tuple)), default=0) + 2, 44)
    lines = [name]
    for r in rows:
        line = f"  {r}" if isinstance(r, str) else f"  {r[0]:<{pad}}{r[1]}"
        lines.append(line if len(line) <= width else line[: width - 1] + "…")
    return lines


def metrics(
    files: Annotated[
        list[Path] | None, typer.Argument(help="metrics JSON files (default: those dvc.yaml declares)")
    ] = None,
) -> None:
    """The pipeline's metrics, readable: one value per line (CIs beside), one section per file."""
    import json

    from bonefrac.config import project_root

    root = project_root()
    paths = files or _metric_files(root)
    for i, path in enumerate(paths):
        shown = path.relative_to(root) if path.is_absolute() and path.is_relative_to(root) else path
        if i:
            typer.echo("")
        if not path.is_file():
            typer.echo(f"{shown}: not written yet (run the pipeline: make run)")
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            typer.echo(f"{shown}: unreadable ({type(err).__name__})")
            continue
        typer.echo("\n".join(format_metrics(str(shown), data if isinstance(data, dict) else {"value": data})))
