"""Stage `preprocess`: leakage-safe splits and the cache of preprocessed tensors."""

from __future__ import annotations

import json
import sys

from prefect import flow
from prefect.states import State

from bonefrac.config import load_params, resolve
from bonefrac.model.transforms import PreprocessSpec
from bonefrac.preprocess.cache import build_cache
from bonefrac.preprocess.splits import assign_splits, split_report
from bonefrac.validation.run import read_manifest
from flows._stage import guarded, run_stage


def _preprocess(params_path: str) -> str:
    p = load_params(params_path)
    clean = read_manifest(resolve(p.paths.interim) / "validated" / "clean.csv")
    split = assign_splits(
        clean,
        val_fraction=p.split.val_fraction,
        test_fraction=p.split.test_fraction,
        seed=p.split.seed,
        near_duplicate_max_distance=p.validation.near_duplicate_max_distance,
        stratify_fracture_type=p.split.stratify_fracture_type,
    )
    report_path = resolve(p.paths.metrics) / "splits.json"
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(split_report(split), indent=2, default=int))
    out_dir = resolve(p.paths.processed)
    build_cache(split, out_dir, PreprocessSpec.from_params(p.preprocess, p.spatial_dims), workers=2)
    counts = split["split"].value_counts().to_dict()
    return f"preprocess: {len(split)} images cached ({counts}) -> {out_dir}"


@flow(name="preprocess", log_prints=True)
def preprocess_flow(params_path: str = "params.yaml") -> str | State:
    return guarded(lambda: _preprocess(params_path))


if __name__ == "__main__":
    run_stage(preprocess_flow, sys.argv)
