"""Drift check: reference (training data) vs a current batch, and optionally trigger retraining.

The current batch is either the service's prediction log (default; a time
window in hours) or a folder of new images. The verdict, the HTML report and
the JSON summary go to ``reports/drift/<timestamp>/``, a markdown artifact
summarises them in the Prefect UI. A window with too little traffic completes as
"no traffic" (recorded, not a failure). The reference is first made the current
champion's (``bonefrac.registry.lifecycle``), so the check follows promotions and
rollbacks. When ``drift.trigger_retrain`` is on, a drifted dataset starts a run of
the retrain deployment only if there is new labelled data
(``bonefrac.monitoring.trigger``); otherwise the run records that it cannot act.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from bonefrac.config import load_params, resolve

RETRAIN_DEPLOYMENT = "retrain/retrain-nightly"


# NO_CACHE: a drift check must look at the data as it is now, and tables do not hash cheaply.
@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def load_current(
    current: str | None, log_dir: str, since_hours: float | None, reference_dir: str, model_name: str
) -> tuple[Any, list[str]]:
    """Feature table of the current batch (retried: a log file may be mid-rotation)."""
    from bonefrac.monitoring.features import features_from_prediction_log
    from bonefrac.monitoring.prediction_log import read_prediction_log
    from bonefrac.monitoring.reference import current_from_images, list_images, load_reference

    if current and Path(current).is_dir() and not list(Path(current).glob("predictions-*.jsonl")):
        bundle = None
        ref = load_reference(reference_dir)
        if ref.reducer is not None or "score" in ref.table.columns:
            from bonefrac.registry.store import NoChampionError, get_champion

            try:
                _, bundle = get_champion(model_name)
            except NoChampionError:
                bundle = None
        return current_from_images(list_images(current), bundle=bundle, reducer=ref.reducer)
    since = datetime.now(UTC) - timedelta(hours=since_hours) if since_hours else None
    log = read_prediction_log(current or log_dir, since=since)
    return features_from_prediction_log(log), []


@task(cache_policy=NO_CACHE)
def follow_champion(params_path: str, reference_dir: str) -> str:
    """Rebuild the reference when it was made for another model than the champion (no-op otherwise)."""
    from bonefrac.registry.lifecycle import refresh_drift_reference
    from bonefrac.registry.store import NoChampionError

    try:
        return refresh_drift_reference(load_params(params_path), ref_dir=reference_dir)
    except NoChampionError as err:
        return f"reference kept: {err}"


@task(cache_policy=NO_CACHE)
def trigger_decision(params_path: str, dataset_drift: bool, trigger: bool) -> Any:
    """Gather the data versions (DVC, registry) and ask the library whether a retrain can help."""
    from bonefrac.config import project_root
    from bonefrac.monitoring.trigger import pending_data_change, retrain_decision
    from bonefrac.provenance import data_version
    from bonefrac.registry import store

    p = load_params(params_path)
    if not (dataset_drift and trigger):
        return retrain_decision(
            dataset_drift=dataset_drift, trigger_enabled=trigger, data_version="", champion_data_version=None
        )
    root = project_root()
    models = store.list_models(p.serving.model_name)
    champion = next((m for m in models if m.stage == "champion"), None)
    stages = ("generate", "ingest") if p.data.source == "phantom" else ("ingest",)
    return retrain_decision(
        dataset_drift=True,
        trigger_enabled=True,
        data_version=data_version(root, resolve(p.paths.processed, root)),
        champion_data_version=str(champion.metadata.get("data_version") or "") if champion else None,
        judged_data_versions=[str(m.metadata.get("data_version") or "") for m in models if m.stage != "challenger"],
        pending_data_change=pending_data_change(root, stages),
    )


@task(cache_policy=NO_CACHE)
def compare(reference_dir: str, current_table: Any, out_dir: str, params: Any) -> Any:
    from bonefrac.monitoring.drift import run_drift
    from bonefrac.monitoring.reference import load_reference

    return run_drift(load_reference(reference_dir).table, current_table, params, out_dir)


@flow(name="drift-check", log_prints=True)
def drift_flow(
    params_path: str = "params.yaml",
    current: str | None = None,
    reference_dir: str | None = None,
    since_hours: float | None = 24.0,
    out_dir: str | None = None,
    trigger_retrain: bool | None = None,
) -> dict[str, Any]:
    """Compare ``current`` (prediction-log folder or image folder; default: the service's log)
    with the reference (default: ``<models>/drift_reference``); returns the JSON summary."""
    from bonefrac.monitoring.drift import has_traffic, record_no_traffic, summarize
    from bonefrac.monitoring.reference import load_reference

    log = get_run_logger()
    p = load_params(params_path)
    ref_dir = reference_dir or str(resolve(p.paths.models) / "drift_reference")
    if reference_dir is None:
        log.info(follow_champion(params_path, ref_dir))
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = out_dir or str(resolve(p.paths.reports) / "drift" / stamp)
    table, skipped = load_current(
        current, str(resolve(p.paths.predictions_log)), since_hours, ref_dir, p.serving.model_name
    )
    if skipped:
        log.warning("%d current images could not be decoded and were skipped", len(skipped))
    if not has_traffic(table):
        window = f"the last {since_hours:g} h" if since_hours and not current else ""
        result = record_no_traffic(len(load_reference(ref_dir).table), table, p.drift, out, window)
        log.info("drift: no traffic (%d rows)", result.n_current)
        create_markdown_artifact(
            key="drift-report", markdown=f"# Drift check\n\n{summarize(result)}\n", description="No traffic"
        )
        return {**result.to_dict(), "action": "none"}
    result = compare(ref_dir, table, out, p.drift)
    summary = summarize(result)
    log.info("drift: %s", "DRIFT" if result.dataset_drift else "no drift")
    trigger = p.drift.trigger_retrain if trigger_retrain is None else trigger_retrain
    decision = trigger_decision(params_path, result.dataset_drift, trigger)
    action = decision.reason
    if decision.action == "retrain":
        from prefect.deployments import run_deployment

        # timeout=0: start the retrain run and return; it runs on its own worker slot.
        run = run_deployment(
            RETRAIN_DEPLOYMENT,
            timeout=0,
            as_subflow=False,
            parameters={"params_path": params_path, "reason": f"drift detected ({out})"},
        )
        action = f"triggered retrain run {run.id}: {decision.reason}"
    log.info("action: %s", action)
    create_markdown_artifact(
        key="drift-report",
        markdown=f"# Drift check\n\n{summary}\n\nAction: {action}\n\nReport: `{result.html_path}`\n",
        description="Reference vs current batch (Evidently)",
    )
    return {**result.to_dict(), "action": action, "trigger": decision.to_dict()}


if __name__ == "__main__":
    drift_flow(*(sys.argv[1:2] or ["params.yaml"]))
