"""Stage `evaluate`: calibrate on validation, measure on test, explain, report, model card."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from prefect import flow
from prefect.states import State

from bonefrac.atomic import atomic_write_text
from bonefrac.config import Params, load_params, project_root, resolve
from bonefrac.evaluation.evaluate import publish_prefect_artifacts, run_evaluation
from bonefrac.inference.cache_outputs import CacheOutputs
from bonefrac.inference.predictor import Predictor
from bonefrac.model.bundle import ModelBundle
from bonefrac.monitoring.features import EmbeddingReducer
from bonefrac.monitoring.ood import build_ood_detector
from bonefrac.monitoring.reference import load_reference
from bonefrac.monitoring.split_drift import REFERENCE_SUBDIR, split_drift, verdict_line
from bonefrac.preprocess.cache import IMAGES_FILE, load_cache
from bonefrac.provenance import data_version
from bonefrac.training.feature_cache import trained_trunk_features
from flows._stage import guarded, run_stage


def _evaluate(params_path: str) -> str:
    p = load_params(params_path)
    if p.train.threads > 0:  # forward passes depend on the thread count too (efficientnet: yes)
        torch.set_num_threads(p.train.threads)
    cache_dir = resolve(p.paths.processed)
    trained = resolve(p.paths.models) / "train" / "best_model.pt"
    # One forward pass per cached image for the whole stage: the evaluation, the drift reference
    # and the OOD detector share the network's outputs (the calibrated model.pt has the same weights);
    # a dense network's training sample comes from the train stage's trunk features (the head alone).
    predictor = Predictor(ModelBundle.load(trained))
    images, index = load_cache(cache_dir)
    trunk = trained_trunk_features(
        predictor.model, predictor.bundle.metadata.get("trunk_cache"), images, cache_dir / IMAGES_FILE, index,
        resolve(p.paths.features),
    )  # fmt: skip
    outputs = CacheOutputs(predictor, images, trunk=trunk)
    summary = run_evaluation(
        model_path=trained,
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
        outputs=outputs,
    )
    publish_prefect_artifacts(summary)
    report = resolve(p.paths.reports) / "evaluation" / "report.html"
    drift_dir = resolve(p.paths.reports) / "drift" / "pipeline"
    drift = _drift_report(p, resolve(p.paths.models) / "model.pt", cache_dir, drift_dir, outputs)
    # The OOD check's embedding axes are the drift reference's PCA (the one reference builder).
    reducer = load_reference(drift_dir / REFERENCE_SUBDIR).reducer
    _attach_serving_facts(resolve(p.paths.models) / "model.pt", cache_dir, p.data.source, reducer, outputs)
    test = summary["test"]  # the report nests the AUROC as {value, ci_low, ci_high}
    a = test["auroc"]
    shown = "n/a" if a.get("value") is None else f"{a['value']:.3f} ({a['ci_low']:.3f}-{a['ci_high']:.3f})"
    shared = f"; {outputs.n_from_trunk} of {outputs.n_computed} images from the trunk cache" if trunk else ""
    return f"evaluate: test AUROC {shown}, n={test['n']}{shared} -> {report}\n{drift}"


def _drift_report(p: Params, model_path: Path, cache_dir: Path, out: Path, outputs: CacheOutputs) -> str:
    """The run ends with a drift report of its test split against its training split (no drift expected).

    Evidently's HTML goes to reports/drift/pipeline (not a DVC output: random ids, a timestamp);
    the verdict and counts to metrics/drift.json (a DVC metric: deterministic).
    """
    metrics, result = split_drift(cache_dir, ModelBundle.load(model_path), p.drift, out, seed=p.seed, outputs=outputs)
    atomic_write_text(resolve(p.paths.metrics) / "drift.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return verdict_line(metrics) + (f" -> {out / 'drift_report.html'}" if result is not None else "")


def _attach_serving_facts(
    model_path: Path, cache_dir: Path, source: str, reducer: EmbeddingReducer | None, outputs: CacheOutputs
) -> None:
    """What the viewer shows beside a prediction: what the model was trained on, and the
    per-image out-of-distribution reference (image statistics and the model's embedding on
    the drift reference's PCA axes, fitted on the training split, thresholds from the
    validation split), stored in the bundle so the served model carries its own reference."""
    bundle = ModelBundle.load(model_path)
    detector = build_ood_detector(
        cache_dir, model_path.with_name("ood.json"), bundle=bundle, reducer=reducer, outputs=outputs
    )
    counts = load_cache(cache_dir)[1]["split"].value_counts()
    bundle.metadata["training_data"] = {"source": source, **{f"n_{k}": int(v) for k, v in sorted(counts.items())}}
    bundle.metadata["ood"] = detector.to_dict()
    bundle.save(model_path)


@flow(name="evaluate", log_prints=True)
def evaluate_flow(params_path: str = "params.yaml") -> str | State:
    return guarded(lambda: _evaluate(params_path))


if __name__ == "__main__":
    run_stage(evaluate_flow, sys.argv)
