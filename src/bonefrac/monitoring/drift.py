"""Reference vs current drift check with Evidently 0.7: per-feature tests and one dataset verdict.

Each feature is tested with a p-value test whatever the sample size
(Kolmogorov–Smirnov for numbers; a two-proportion z-test for a binary
category such as bit depth 8/16, chi-square for more categories), so the
single ``drift.stattest_threshold`` means the same thing for every column.
Evidently's own default switches to distance measures above 1,000 reference
rows, where a p-value threshold would be meaningless — hence the explicit methods.

The dataset is declared drifted when the share of drifted features reaches
``drift.drift_share``: one noisy feature does not page anyone, a change in
exposure (which moves several intensity statistics at once) does. A column
that holds one and the same value in both tables (e.g. every image 8-bit, or
one fixed size) is reported but not counted: it could never drift, and
counting it would only dilute the share.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from bonefrac.config import DriftParams
from bonefrac.errors import BonefracError
from bonefrac.monitoring.features import CATEGORICAL_COLUMNS, EMBEDDING_PREFIX, IMAGE_COLUMNS, SCORE_COLUMN
from bonefrac.monitoring.io import atomic_write_text

REPORT_HTML = "drift_report.html"
SUMMARY_JSON = "drift_summary.json"
MIN_ROWS = 5


class DriftError(BonefracError):
    """The two tables cannot be compared (empty, no shared feature columns...)."""


@dataclass
class FeatureDrift:
    column: str
    method: str
    p_value: float | None
    drifted: bool
    # False when the column holds one and the same value in both tables: its test
    # can say nothing, so it is reported but left out of the drift share.
    informative: bool = True


@dataclass
class DriftResult:
    """The verdict, each feature's test, and where the report was written."""

    dataset_drift: bool
    drift_share: float
    drift_share_threshold: float
    stattest_threshold: float
    n_reference: int
    n_current: int
    features: list[FeatureDrift] = field(default_factory=list)
    html_path: str = ""
    json_path: str = ""
    created: str = ""
    warnings: list[str] = field(default_factory=list)
    # "checked": the tests ran; "no_traffic": too few current rows to test (an hour without
    # uploads is a normal state of a service, not a failure of the check).
    status: str = "checked"

    @property
    def drifted_columns(self) -> list[str]:
        return [f.column for f in self.features if f.drifted]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["drifted_columns"] = self.drifted_columns
        return d


def feature_columns(frame: pd.DataFrame) -> list[str]:
    """The drift feature columns present in ``frame`` (image statistics, embedding, score)."""
    known = [*IMAGE_COLUMNS, SCORE_COLUMN]
    emb = sorted(
        (c for c in frame.columns if str(c).startswith(EMBEDDING_PREFIX)), key=lambda c: int(c[4:])
    )
    return [c for c in known if c in frame.columns] + emb


def shared_feature_columns(reference: pd.DataFrame, current: pd.DataFrame) -> list[str]:
    """Feature columns present and not all-empty in both tables."""
    return [
        c
        for c in feature_columns(reference)
        if c in current.columns and reference[c].notna().any() and current[c].notna().any()
    ]


def _cat_method(ref: pd.Series, cur: pd.Series) -> str:
    # The z-test is Evidently's test for a binary category; chi-square needs
    # >= 2 categories in the reference and returns NaN for a constant column.
    n_categories = len(set(ref.dropna().unique()) | set(cur.dropna().unique()))
    return "z" if n_categories <= 2 else "chisquare"


def run_drift(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    params: DriftParams,
    out_dir: str | Path | None = None,
    columns: list[str] | None = None,
) -> DriftResult:
    """Compare ``current`` with ``reference``.

    With ``out_dir``, writes ``drift_report.html`` (Evidently) and ``drift_summary.json`` there.
    """
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    cols = columns or shared_feature_columns(reference, current)
    if not cols:
        raise DriftError(
            f"no feature column shared by the reference ({list(reference.columns)}) and the current batch "
            f"({list(current.columns)})"
        )
    missing = [c for c in cols if c not in reference.columns or c not in current.columns]
    if missing:
        raise DriftError(f"columns missing from the reference or the current batch: {missing}")
    ref = reference[cols].copy()
    cur = current[cols].copy()
    for name, frame in (("reference", ref), ("current batch", cur)):
        if len(frame.dropna(how="all")) < MIN_ROWS:
            raise DriftError(
                f"the {name} has {len(frame)} rows; at least {MIN_ROWS} are needed for a drift test"
            )
    notes: list[str] = []
    if len(cur) < 30:
        notes.append(f"small current batch ({len(cur)} rows): only large shifts can be detected")

    cat = [c for c in cols if c in CATEGORICAL_COLUMNS]
    num = [c for c in cols if c not in cat]
    for c in num:
        ref[c] = pd.to_numeric(ref[c], errors="coerce").astype(float)
        cur[c] = pd.to_numeric(cur[c], errors="coerce").astype(float)
    for c in cat:  # categories as strings: 8 and 8.0 are the same bit depth
        ref[c] = ref[c].map(lambda v: "" if pd.isna(v) else str(int(float(v))))
        cur[c] = cur[c].map(lambda v: "" if pd.isna(v) else str(int(float(v))))

    definition = DataDefinition(numerical_columns=num, categorical_columns=cat)
    per_column_method = {c: "ks" for c in num} | {c: _cat_method(ref[c], cur[c]) for c in cat}
    report = Report(
        [
            DataDriftPreset(
                columns=cols,
                drift_share=params.drift_share,
                per_column_method=per_column_method,
                threshold=params.stattest_threshold,
            )
        ]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Evidently's divide-by-zero noise on constant columns
        snapshot = report.run(
            Dataset.from_pandas(cur, data_definition=definition),
            Dataset.from_pandas(ref, data_definition=definition),
        )
    features = _parse(snapshot.dict(), cols, per_column_method, params.stattest_threshold)
    for f in features:
        values = set(ref[f.column].dropna().unique()) | set(cur[f.column].dropna().unique())
        f.informative = len(values) > 1
    counted = [f for f in features if f.informative]
    share = sum(f.drifted for f in counted) / len(counted) if counted else 0.0
    result = DriftResult(
        dataset_drift=share >= params.drift_share,
        drift_share=share,
        drift_share_threshold=params.drift_share,
        stattest_threshold=params.stattest_threshold,
        n_reference=len(ref),
        n_current=len(cur),
        features=features,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        warnings=notes,
    )
    if out_dir is not None:
        out = Path(out_dir)
        result.html_path = str(atomic_write_text(out / REPORT_HTML, snapshot.get_html_str(as_iframe=False)))
        result.json_path = str(out / SUMMARY_JSON)
        atomic_write_text(out / SUMMARY_JSON, json.dumps(result.to_dict(), indent=2))
    return result


def has_traffic(current: pd.DataFrame) -> bool:
    """Whether the current batch has enough rows (:data:`MIN_ROWS`) to be tested at all."""
    return len(current.dropna(how="all")) >= MIN_ROWS


def record_no_traffic(
    n_reference: int, current: pd.DataFrame, params: DriftParams, out_dir: str | Path | None = None, window: str = ""
) -> DriftResult:
    """The result of a window with too little traffic: no verdict, recorded (``drift_summary.json``) like any check."""
    n = len(current.dropna(how="all"))
    result = DriftResult(
        dataset_drift=False,
        drift_share=0.0,
        drift_share_threshold=params.drift_share,
        stattest_threshold=params.stattest_threshold,
        n_reference=n_reference,
        n_current=n,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        warnings=[f"no traffic: {n} prediction(s){f' in {window}' if window else ''}, {MIN_ROWS} needed for a test"],
        status="no_traffic",
    )
    if out_dir is not None:
        result.json_path = str(atomic_write_text(Path(out_dir) / SUMMARY_JSON, json.dumps(result.to_dict(), indent=2)))
    return result


def _parse(
    snapshot: dict[str, Any], cols: list[str], methods: dict[str, str], threshold: float
) -> list[FeatureDrift]:
    """Per-column p-values from the snapshot's ``ValueDrift`` metrics (drifted when p < threshold)."""
    values: dict[str, float] = {}
    for m in snapshot.get("metrics", []):
        cfg = m.get("config", {})
        if str(cfg.get("type", "")).endswith("ValueDrift") and cfg.get("column") in cols:
            values[cfg["column"]] = float(m["value"])
    out = []
    for c in cols:
        p = values.get(c)
        ok = p is not None and not math.isnan(p)
        out.append(
            FeatureDrift(
                column=c, method=methods[c], p_value=p if ok else None, drifted=bool(ok and p < threshold)
            )
        )
    return out


def summarize(result: DriftResult) -> str:
    """A short markdown summary (for the Prefect artifact and logs)."""
    if result.status == "no_traffic":
        return f"No traffic: nothing to test. {' '.join(result.warnings)}"
    verdict = "**DRIFT**" if result.dataset_drift else "no drift"
    counted = sum(f.informative for f in result.features)
    lines = [
        f"Dataset verdict: {verdict} — {result.drift_share:.0%} of {counted} features drifted "
        f"(threshold {result.drift_share_threshold:.0%}, constant columns not counted); "
        f"reference {result.n_reference} rows, current {result.n_current} rows.",
        "",
        "| feature | test | p-value | drifted |",
        "|---|---|---|---|",
    ]
    for f in result.features:
        p = "n/a" if f.p_value is None else f"{f.p_value:.3g}"
        lines.append(f"| {f.column} | {f.method} | {p} | {'yes' if f.drifted else ''} |")
    lines += [f"\n_{w}_" for w in result.warnings]
    return "\n".join(lines)
