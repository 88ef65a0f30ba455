"""Stage `evaluate`: calibrate on validation, measure on test, explain, report, model card."""

from __future__ import annotations

import sys

import torch
from prefect import flow
from prefect.states import State

from bonefrac.config import load_params, project_root, resolve
from bonefrac.evaluation.evaluate import publish_prefect_artifacts, run_evaluation
from bonefrac.provenance import data_version
from flows._stage import guarded, run_stage


def _evaluate(params_path: str) -> str:
    p = load_params(params_path)
    if p.train.threads > 0:  # forward passes depend on the thread count too (efficientnet: yes)
        torch.set_num_threads(p.train.threads)
    cache_dir = resolve(p.paths.processed)
    summary = run_evaluation(
        model_path=resolve(p.paths.models) / "train" / "best_model.pt",
        cache_dir=cache_dir,
        out_model_path=resolve(p.paths.models) / "model.pt",
        reports_dir=resolve(p.paths.reports) / "evaluation",
        metrics_json=resolve(p.paths.metrics) / "evaluate.json",
        plots_dir=resolve(p.paths.reports) / "plots",
        params=p.evaluate,
        validation_summary=resolve(p.paths.metrics) / "validation.json",
        params_snapshot=p.model_dump(mode="json"),
        data_version=data_version(project_root(), p.paths.processed),
        seed=p.seed,
    )
    publish_prefect_artifacts(summary)
    report = resolve(p.paths.reports) / "evaluation" / "report.html"
    return f"evaluate: test AUROC {summary.get('auroc')} -> {report}"


@flow(name="evaluate", log_prints=True)
def evaluate_flow(params_path: str = "params.yaml") -> str | State:
    return guarded(lambda: _evaluate(params_path))


if __name__ == "__main__":
    run_stage(evaluate_flow, sys.argv)
