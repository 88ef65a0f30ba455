"""The ingest step: source records + metadata from reading every image → one manifest CSV.

:func:`ingest` is what the ``ingest`` DVC stage (via its Prefect flow) calls: it
reads the chosen source (:mod:`bonefrac.data.sources`, DICOM de-identified on the
way), optionally keeps or drops body parts, reads every image
(:mod:`bonefrac.data.metadata`), writes the table atomically and logs one summary
line. Nothing is dropped for being broken: undecodable images stay in the table
with the reason, and validation decides what to quarantine.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from bonefrac.atomic import atomic_write_csv, atomic_write_text
from bonefrac.config import project_relative, project_root
from bonefrac.data.deid import pseudonymise
from bonefrac.data.ingest_cache import IngestCache
from bonefrac.data.metadata import build_metadata_table
from bonefrac.data.sources import IntakeReport, load_records

log = logging.getLogger(__name__)

_SOURCE_DIMS = {"fracatlas": 2, "dicom": 2, "volume": 3}  # sources whose dimensionality is known


def filter_body_parts(
    records: pd.DataFrame, include: list[str] | None = None, exclude: list[str] | None = None
) -> pd.DataFrame:
    """Keep rows whose body part is in ``include`` (when given) and not in ``exclude`` (case-insensitive)."""
    parts = records["body_part"].str.lower()
    keep = pd.Series(True, index=records.index)
    if include:
        keep &= parts.isin([p.lower() for p in include])
    if exclude:
        keep &= ~parts.isin([p.lower() for p in exclude])
    return records[keep].reset_index(drop=True)


def ingest(
    source: str,
    root: Path,
    out_csv: Path,
    manifest_csv: Path | None = None,
    use_fracture_types: bool = True,
    deid_dir: Path | None = None,
    include_body_parts: list[str] | None = None,
    exclude_body_parts: list[str] | None = None,
    workers: int = 1,
    max_pixels: int | None = None,
    expected_dims: int | None = None,
    fracture_types: Iterable[str] | None = None,
    allow_burned_in_annotation: bool = False,
    cache_dir: Path | None = None,
    body_parts: Iterable[str] | None = None,
) -> pd.DataFrame:
    """Build the per-image metadata table of a source and write it to ``out_csv``; return it.

    ``path`` in the table is relative to the project root (:func:`bonefrac.config.project_relative`;
    :func:`bonefrac.config.resolve` turns it back into a file).

    ``deid_dir`` defaults to ``out_csv``'s folder ``/deid`` (used only when DICOM is met).
    ``workers`` processes decode in parallel. ``max_pixels`` refuses larger images
    (recorded as undecodable, not raised). ``expected_dims`` (default: 2 for the ``fracatlas``
    and ``dicom`` sources, 3 for ``volume``, not checked otherwise; flows pass
    ``Params.spatial_dims``) marks images of the other dimensionality undecodable.
    ``fracture_types`` / ``body_parts`` / ``allow_burned_in_annotation``: see :func:`load_records`.
    ``cache_dir``: keep per-file results there (:mod:`bonefrac.data.ingest_cache`), so a
    rerun decodes and de-identifies only files whose bytes changed; the table is the same.

    Every input gets a verdict, written to ``intake.json`` next to ``out_csv`` and kept in
    ``table.attrs["intake"]`` (``seen == rows + skipped``); ``table.attrs["summary"]`` is the
    one-line summary (also logged).
    """
    t0 = time.perf_counter()
    out_csv = Path(out_csv)
    deid = Path(deid_dir) if deid_dir is not None else out_csv.parent / "deid"
    report = IntakeReport()
    if expected_dims is None:
        expected_dims = _SOURCE_DIMS.get(source)
    cache = None
    if cache_dir is not None:
        # Everything besides a file's bytes that decides its row or its de-identified copy
        # (the code and library versions are added by the cache itself).
        settings = {"max_pixels": max_pixels, "expected_dims": expected_dims, "key": pseudonymise("cache", "key")}
        cache = IngestCache(cache_dir, settings)
    records = load_records(
        source,
        Path(root),
        manifest_csv=manifest_csv,
        use_fracture_types=use_fracture_types,
        deid_dir=deid,
        fracture_types=fracture_types,
        body_parts=body_parts,
        allow_burned_in_annotation=allow_burned_in_annotation,
        report=report,
        cache=cache,
    )
    n_all = len(records)
    records = filter_body_parts(records, include_body_parts, exclude_body_parts)
    if n_all - len(records):
        report.skipped["filtered out by body part"] += n_all - len(records)
    # The table stores paths relative to the project root (readers resolve them back), so it
    # is the same file whichever folder the project is checked out in.
    root_dir = project_root()
    records["path"] = records["path"].map(lambda p: project_relative(p, root_dir))
    table = build_metadata_table(
        records, max_pixels=max_pixels, workers=workers, expected_dims=expected_dims, cache=cache
    )
    if cache is not None:
        cache.touch()
    atomic_write_csv(table, out_csv)
    dt = time.perf_counter() - t0
    n = len(table)
    bad = int((~table["decodes_ok"]).sum())
    refused = sum(report.refused.values())
    pos = int((table["label"] == 1).sum())
    skipped = sum(report.skipped.values())
    intake = {**report.as_dict(), "rows": n, "undecodable": bad - refused, "refused_total": refused}
    intake["skipped_total"] = skipped
    atomic_write_text(out_csv.parent / "intake.json", json.dumps(intake, indent=2, sort_keys=True) + "\n")
    reasons = ", ".join(f"{k} {v}" for k, v in sorted((report.skipped + report.refused).items()))
    notes = "".join(f"; {k}: {v}" for k, v in sorted(report.notes.items()))
    summary = (
        f"ingest {source}: {report.seen} inputs -> {n} images ({pos} fracture, {bad - refused} undecodable, "
        f"{refused} refused at intake) + {skipped} skipped"
        + (f" [{reasons}]" if reasons else "")
        + notes
        + (f"; cache: {cache.stats()}" if cache is not None else "")
        + f"; {int(table['sha256'].ne('').mul(table['sha256'].duplicated(keep=False)).sum())} exact-duplicate"
        f" files; {dt:.1f} s ({n / dt if dt > 0 else 0.0:.1f} img/s) -> {out_csv}"
    )
    log.info("%s", summary)
    table.attrs["intake"] = intake
    table.attrs["summary"] = summary
    table.attrs["cache"] = {"hits": dict(cache.hits), "misses": dict(cache.misses)} if cache else {}
    return table
