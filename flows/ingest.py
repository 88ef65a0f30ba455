"""Stage `ingest`: read every image of the chosen source into the per-image metadata table."""

from __future__ import annotations

import sys

from prefect import flow
from prefect.states import State

from bonefrac.config import load_params, resolve
from bonefrac.data.ingest import ingest
from flows._stage import guarded, run_stage


def _ingest(params_path: str) -> str:
    p = load_params(params_path)
    out_dir = resolve(p.paths.interim) / "ingest"
    table = ingest(
        p.data.source,
        resolve(p.data.root),
        out_dir / "manifest.csv",
        manifest_csv=resolve(p.data.manifest_csv) if p.data.manifest_csv else None,
        use_fracture_types=p.data.use_fracture_types,
        deid_dir=out_dir / "deid",
        include_body_parts=p.data.include_body_parts,
        exclude_body_parts=p.data.exclude_body_parts,
        workers=p.data.ingest_workers,
        max_pixels=p.serving.max_pixels,
        expected_dims=p.spatial_dims,
        fracture_types=p.data.fracture_types,
        body_parts=p.data.body_parts,
        allow_burned_in_annotation=p.data.allow_burned_in_annotation,
        cache_dir=resolve(p.paths.cache) / "ingest",
    )
    return str(table.attrs["summary"])


@flow(name="ingest", log_prints=True)
def ingest_flow(params_path: str = "params.yaml") -> str | State:
    return guarded(lambda: _ingest(params_path))


if __name__ == "__main__":
    run_stage(ingest_flow, sys.argv)
