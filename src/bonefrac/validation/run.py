"""Validate the per-image manifest: GX checks with severities, quarantine, Data Docs, metrics.

Severities (``params.validation.severities``):

- ``critical``: the run stops with :class:`CriticalValidationError`, naming the
  check and the offending files. Data Docs and the summary are still written,
  so the failure can be inspected; ``clean.csv`` is not.
- ``quarantine``: offending rows move to ``quarantine.csv`` with the check and
  a reason; the files themselves are never touched. Table-level checks
  (required columns, class balance) cannot single out rows, so at this
  severity they are reported like ``warn``.
- ``warn``: reported in the summary and the Data Docs only.
- ``off``: not run.

Entry point: ``python -m bonefrac.validation.run --manifest data/interim/manifest.csv``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from bonefrac.atomic import atomic_write_csv
from bonefrac.config import ValidationParams, load_params
from bonefrac.errors import BonefracError
from bonefrac.validation.checks import (
    CHECKS,
    CHECKS_BY_NAME,
    TEXT_COLUMNS,
    build_expectations,
    prepare_table,
    row_reason,
    settings_for,
)
from bonefrac.validation.expectations import Outcome, run_suite
from bonefrac.validation.offline_docs import make_offline
from bonefrac.validation.quarantine import (
    replace_dir_atomic,
    split_clean_quarantine,
    write_json_atomic,
)

log = logging.getLogger(__name__)

MAX_NAMED_FILES = 10


class CriticalValidationError(BonefracError, ValueError):
    """A check with severity ``critical`` failed; the message names the check(s) and files."""


@dataclass
class ValidationResult:
    clean: pd.DataFrame
    quarantine: pd.DataFrame
    summary: dict[str, Any]
    elapsed_s: float = 0.0


def read_manifest(path: Path) -> pd.DataFrame:
    """Read a manifest CSV keeping ids and hashes as text (a hex phash like ``"0123..."`` is not a number)."""
    return pd.read_csv(path, dtype={c: str for c in TEXT_COLUMNS}, keep_default_na=False)


def _name_files(table: pd.DataFrame, rows: list[int]) -> str:
    col = "path" if "path" in table.columns else ("image_id" if "image_id" in table.columns else None)
    names = [str(table.iloc[r][col]) if col else f"row {r}" for r in rows[:MAX_NAMED_FILES]]
    more = f" ... and {len(rows) - MAX_NAMED_FILES} more" if len(rows) > MAX_NAMED_FILES else ""
    return f"{len(rows)} file(s): " + ", ".join(names) + more


def _table_message(check: str, outs: list[Outcome], params: ValidationParams, table: pd.DataFrame) -> str:
    if check == "class_balance" and "dq_trains" in table.columns and not int(table["dq_trains"].sum()):
        return "no image left to train after quarantine"
    for o in outs:
        if o.success:
            continue
        if o.error:
            return f"check errored: {o.error}"
        if check == "required_columns":
            missing = (o.details or {}).get("mismatched", {}).get("missing", [])
            return f"missing column(s) {sorted(missing)}"
        if check == "class_balance":
            n = int(table["dq_trains"].sum()) if "dq_trains" in table.columns else None
            return (
                f"positive fraction {o.observed_value} outside "
                f"[{params.min_positive_fraction}, {params.max_positive_fraction}]"
                + (f" among the {n} image(s) that will train (after quarantine)" if n is not None else "")
            )
    return "failed"


def _row_failures(
    outcomes: list[Outcome], table: pd.DataFrame, prep: Any, params: ValidationParams, skipped: dict[str, str]
) -> dict[str, list[int]]:
    """check → failing row positions, for the row-level checks that are not off or skipped."""
    severities = params.severities.model_dump()
    out: dict[str, list[int]] = {}
    for check in CHECKS:
        if not check.row_level or severities[check.name] == "off" or check.name in skipped:
            continue
        rows = sorted({r for o in outcomes if o.check == check.name for r in o.unexpected_rows})
        if rows:
            out[check.name] = rows
    return out


def _remove_stale(out_dir: Path) -> None:
    """A stopped run leaves no clean list behind: nothing downstream may train on the last run's data."""
    for name in ("clean.csv", "quarantine.csv"):
        (out_dir / name).unlink(missing_ok=True)


def validate_manifest(
    manifest: pd.DataFrame,
    params: ValidationParams,
    out_dir: Path,
    data_docs_dir: Path,
    summary_json: Path,
) -> ValidationResult:
    """Run every check, write ``clean.csv``/``quarantine.csv``, Data Docs and the summary metrics.

    Dataset-level checks (class balance) judge what will actually train: a first GX run of
    the row-level checks finds the rows quarantine takes out (``dq_trains`` = 0), then the
    full suite runs once more, with Data Docs. A critical stop removes any ``clean.csv`` /
    ``quarantine.csv`` left by an earlier run.
    """
    t0 = time.perf_counter()
    out_dir, data_docs_dir, summary_json = Path(out_dir), Path(data_docs_dir), Path(summary_json)
    _remove_stale(out_dir)  # written again below only if the run passes
    prep = prepare_table(manifest, params)
    table = prep.table
    expectations, skipped = build_expectations(params, set(table.columns))
    row_level = [e for e in expectations if CHECKS_BY_NAME[e.meta["check"]].row_level]
    if "dq_trains" in table.columns and len(row_level) < len(expectations):
        first = run_suite(table, row_level, None)
        trains = table["dq_trains"].to_numpy(dtype=int).copy()
        quarantining = {c for c, s in params.severities.model_dump().items() if s == "quarantine"}
        for check, rows in _row_failures(first, table, prep, params, skipped).items():
            if check in quarantining:
                trains[rows] = 0
        table["dq_trains"] = trains
        expectations, skipped = build_expectations(params, set(table.columns))  # fresh GX objects

    data_docs_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{data_docs_dir.name}.new.", dir=data_docs_dir.parent))
    try:
        outcomes = run_suite(table, expectations, staging)
        make_offline(staging)  # no CDN request: the docs open in an air-gapped network or an archive
        replace_dir_atomic(staging, data_docs_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)

    severities = params.severities.model_dump()
    summary: dict[str, Any] = {"rows": len(table)}
    failures: dict[str, dict[int, str]] = {}
    critical: list[str] = []
    all_ok = True
    for check in CHECKS:
        sev = severities[check.name]
        if sev == "off":
            continue
        if check.name in skipped:
            # Only reachable when required_columns is not critical: say so rather than pass silently.
            summary[f"{check.name}_skipped"] = True
            all_ok = False
            log.warning("check %s skipped: %s", check.name, skipped[check.name])
            if sev == "critical":
                critical.append(f"{check.name}: cannot run, {skipped[check.name]}")
            continue
        outs = [o for o in outcomes if o.check == check.name]
        ok = all(o.success for o in outs)
        errors = [o.error for o in outs if o.error]
        all_ok &= ok
        summary[f"{check.name}_success"] = ok
        if check.row_level:
            rows = sorted({r for o in outs for r in o.unexpected_rows})
            summary[f"{check.name}_failures"] = len(rows)
            if errors:
                summary[f"{check.name}_errors"] = len(errors)
            if sev == "critical" and not ok:
                detail = (
                    _name_files(table, rows) if rows else f"check errored: {errors[0] if errors else '?'}"
                )
                critical.append(f"{check.name}: {detail}")
            elif sev == "quarantine" and rows:
                failures[check.name] = {
                    r: row_reason(check.name, table.iloc[r], prep, params, r) for r in rows
                }
            elif sev == "warn" and rows:
                log.warning("check %s (warn): %s", check.name, _name_files(table, rows))
        else:
            summary[f"{check.name}_failures"] = 0 if ok else 1
            if not ok:
                msg = f"{check.name}: {_table_message(check.name, outs, params, table)}"
                if sev == "critical":
                    critical.append(msg)
                else:
                    log.warning("check %s (%s, table-level): %s", check.name, sev, msg)

    labels = (
        pd.to_numeric(table["label"], errors="coerce") if "label" in table.columns else pd.Series(dtype=float)
    )
    valid = labels[labels.isin([0, 1])]
    summary["positive_fraction"] = round(float(valid.mean()), 6) if len(valid) else 0.0
    if "dq_trains" in table.columns:
        summary["training_rows"] = int(table["dq_trains"].sum())
    summary.update(prep.facts)
    summary["checks_failed"] = sum(1 for k, v in summary.items() if k.endswith("_success") and not v)
    summary["success_critical"] = not critical

    base = manifest.reset_index(drop=True)
    if critical:
        summary.update(clean=0, quarantined=0, success=False)
        write_json_atomic(summary, summary_json)
        raise CriticalValidationError(
            "validation stopped by critical check(s):\n  - "
            + "\n  - ".join(critical)
            + f"\nsee the Data Docs in {data_docs_dir}"
        )

    clean, quarantine = split_clean_quarantine(base, failures)
    summary["clean"] = len(clean)
    summary["quarantined"] = len(quarantine)
    clean_labels = pd.to_numeric(clean["label"], errors="coerce") if "label" in clean.columns else valid
    summary["clean_positive_fraction"] = round(float(clean_labels.mean()), 6) if len(clean) else 0.0
    summary["success"] = all_ok
    atomic_write_csv(clean, out_dir / "clean.csv")
    atomic_write_csv(quarantine, out_dir / "quarantine.csv")
    write_json_atomic(summary, summary_json)
    elapsed = time.perf_counter() - t0
    log.info(
        "validation: %d rows, %d clean, %d quarantined (%s) in %.1f s",
        len(base),
        len(clean),
        len(quarantine),
        ", ".join(f"{k} {len(v)}" for k, v in failures.items()) or "none",
        elapsed,
    )
    return ValidationResult(clean=clean, quarantine=quarantine, summary=summary, elapsed_s=elapsed)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Validate the per-image manifest with Great Expectations.")
    ap.add_argument("--manifest", type=Path, default=Path("data/interim/manifest.csv"))
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--out-dir", type=Path, default=Path("data/interim"))
    ap.add_argument("--data-docs", type=Path, default=Path("reports/validation"))
    ap.add_argument("--summary", type=Path, default=Path("metrics/validation.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("great_expectations").setLevel(logging.WARNING)  # its INFO lines are internal noise
    if not args.manifest.exists():
        print(f"error: manifest {args.manifest} not found (run the ingest stage first)", file=sys.stderr)
        return 2
    params = settings_for(load_params(args.params))
    try:
        res = validate_manifest(
            read_manifest(args.manifest), params, args.out_dir, args.data_docs, args.summary
        )
    except CriticalValidationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"validated {res.summary['rows']} rows in {res.elapsed_s:.1f} s: {res.summary['clean']} clean, "
        f"{res.summary['quarantined']} quarantined"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
