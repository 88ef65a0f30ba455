"""The drift report that ends a pipeline run: the run's own test split against its training reference.

Why at the end of every run: it shows what "no drift" looks like for this model and this data
(the baseline a reader of the service's drift reports compares against), and a run whose test
split *does* drift from its training split has a split problem (a leak in the grouping, a
stratum missing from one side) that no metric of the model would reveal.

The reference is built by the one reference builder (:mod:`bonefrac.monitoring.reference`)
with the run's own calibrated bundle; the test split is described the same way and projected
on the reference's embedding axes. Evidently's HTML carries random element ids and a
timestamp, so it is written beside the pipeline's outputs, not tracked by DVC; the small
metrics dict (verdict and counts, no time, no path) is deterministic and is a DVC metric.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bonefrac.config import DriftParams
from bonefrac.inference.cache_outputs import CacheOutputs
from bonefrac.model.bundle import ModelBundle
from bonefrac.monitoring.drift import DriftError, DriftResult, run_drift
from bonefrac.monitoring.reference import build_reference, split_features

REFERENCE_SUBDIR = "reference"


def drift_metrics(result: DriftResult) -> dict[str, Any]:
    """Verdict and counts only: the same for the same data and model on any machine or day."""
    counted = [f for f in result.features if f.informative]
    return {
        "dataset_drift": bool(result.dataset_drift),
        "drift_share": round(float(result.drift_share), 4),
        "drift_share_threshold": float(result.drift_share_threshold),
        "n_features": len(counted),
        "n_drifted": sum(f.drifted for f in counted),
        "n_reference": int(result.n_reference),
        "n_current": int(result.n_current),
    }


def split_drift(
    cache_dir: str | Path,
    bundle: ModelBundle,
    params: DriftParams,
    out_dir: str | Path,
    *,
    current_split: str = "test",
    reference_split: str = "train",
    seed: int = 0,
    outputs: CacheOutputs | None = None,
) -> tuple[dict[str, Any], DriftResult | None]:
    """Build the reference from ``reference_split`` into ``out_dir/reference``, compare ``current_split``.

    Writes Evidently's ``drift_report.html`` and ``drift_summary.json`` into ``out_dir``. A split
    too small to test (fewer rows than a test needs) gives ``{"skipped": reason}``, not an error:
    a small run must still finish. ``outputs``: the network's outputs on this cache, shared with
    the evaluation (:class:`bonefrac.inference.cache_outputs.CacheOutputs`).
    """
    out = Path(out_dir)
    ref = build_reference(
        cache_dir,
        out / REFERENCE_SUBDIR,
        bundle=bundle,
        embedding_dims=params.embedding_dims,
        split=reference_split,
        seed=seed,
        provenance={"model": bundle.arch, "purpose": f"pipeline run: {current_split} vs {reference_split}"},
        outputs=outputs,
    )
    current, _, _skipped = split_features(
        cache_dir, bundle, split=current_split, reducer=ref.reducer, seed=seed, outputs=outputs
    )
    try:
        result = run_drift(ref.table, current, params, out)
    except DriftError as err:
        return {"skipped": str(err)}, None
    return drift_metrics(result), result


def verdict_line(metrics: dict[str, Any], what: str = "test vs train") -> str:
    """One console line: the verdict and how many features moved."""
    if "skipped" in metrics:
        return f"drift {what}: not tested ({metrics['skipped']})"
    word = "DRIFT" if metrics["dataset_drift"] else "no drift"
    return (
        f"drift {what}: {word} ({metrics['n_drifted']} of {metrics['n_features']} features drifted, "
        f"threshold {metrics['drift_share_threshold']:.0%})"
    )
