"""Stage `generate`: the embedded default dataset (radiograph phantoms).

Only for ``data.source: phantom``. With any other source (FracAtlas, a hospital
export) the stage writes a one-line note in each of its DVC outputs instead of the
phantom set nobody reads (141 s of a FracAtlas run). ``data.source`` is one of the
stage's params in ``dvc.yaml``, so switching back to ``phantom`` reruns it and the
phantoms come back, the same bytes as ever.
"""

from __future__ import annotations

import sys

from prefect import flow
from prefect.states import State

from bonefrac.atomic import atomic_write_text
from bonefrac.config import load_params, resolve
from bonefrac.data.contact_sheet import make_contact_sheet
from bonefrac.data.phantom import generate_phantom_dataset
from flows._stage import guarded, run_stage

NOT_GENERATED = "NOT_GENERATED.txt"


def _generate(params_path: str) -> str:
    p = load_params(params_path)
    out_dir = resolve(p.paths.raw) / "phantom"
    sheet_dir = resolve(p.paths.reports) / "phantom"
    if p.data.source != "phantom":
        note = f"No phantoms generated: data.source is {p.data.source!r}, not 'phantom' (flows/generate.py).\n"
        for folder in (out_dir, sheet_dir):  # DVC outputs must exist; the note says why they are empty
            atomic_write_text(folder / NOT_GENERATED, note)
        return f"generate: skipped (data.source is {p.data.source!r}; phantoms only for data.source: phantom)"
    manifest = generate_phantom_dataset(out_dir, p.data.phantom)
    sheet_dir.mkdir(parents=True, exist_ok=True)
    if p.data.phantom.spatial_dims == 2:
        make_contact_sheet(manifest, out_dir, sheet_dir / "contact_sheet.png", n=24)
    kind = "volumes" if p.data.phantom.spatial_dims == 3 else "images"
    return (
        f"generate: {len(manifest)} phantom {kind}, {int((manifest['label'] == 1).sum())} fractured, "
        f"{manifest['patient_id'].nunique()} patients -> {out_dir}"
    )


@flow(name="generate", log_prints=True)
def generate_flow(params_path: str = "params.yaml") -> str | State:
    return guarded(lambda: _generate(params_path))


if __name__ == "__main__":
    run_stage(generate_flow, sys.argv)
