"""Stage `validate`: Great Expectations checks on the metadata table; quarantine or stop."""

from __future__ import annotations

import sys

from prefect import flow
from prefect.states import State

from bonefrac.config import load_params, resolve
from bonefrac.validation.checks import settings_for
from bonefrac.validation.run import read_manifest, validate_manifest
from flows._stage import guarded, run_stage


def _validate(params_path: str) -> str:
    p = load_params(params_path)
    manifest = read_manifest(resolve(p.paths.interim) / "ingest" / "manifest.csv")
    out_dir = resolve(p.paths.interim) / "validated"
    result = validate_manifest(
        manifest,
        settings_for(p),
        out_dir=out_dir,
        data_docs_dir=resolve(p.paths.reports) / "validation",
        summary_json=resolve(p.paths.metrics) / "validation.json",
    )
    counts = f"{len(manifest)} rows, {len(result.clean)} clean, {len(result.quarantine)} quarantined"
    by_check = (
        result.quarantine["check"].str.split("; ").explode().value_counts().sort_index()
        if len(result.quarantine)
        else {}
    )
    why = ", ".join(f"{k} {v}" for k, v in dict(by_check).items())
    return f"validate: {counts}" + (f" ({why})" if why else "") + f" -> {out_dir}"


@flow(name="validate", log_prints=True)
def validate_flow(params_path: str = "params.yaml") -> str | State:
    return guarded(lambda: _validate(params_path))


if __name__ == "__main__":
    run_stage(validate_flow, sys.argv)
