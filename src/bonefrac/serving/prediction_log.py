"""Prediction log without PHI: what the drift flow compares with the training data.

Each prediction appends one JSON line (time, model version, score, and the same
image statistics ingest records: size, bit depth, format, intensity mean/std/p01/p99
on [0, 1]-scaled intensities) to ``<dir>/predictions-YYYY-MM-DD.jsonl``. Nothing
that identifies a patient is written: no file name, no DICOM tag, only numbers
describing the pixels. One file per day keeps appends cheap and lets the drift
flow pick a time window by file name.
"""

from __future__ import annotations

import json
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

LOG_PREFIX = "predictions-"
LOG_COLUMNS: list[str] = [
    "timestamp",
    "model_name",
    "model_version",
    "probability",
    "logit",
    "decision_high_sensitivity",
    "decision_high_specificity",
    "width",
    "height",
    "depth",
    "bit_depth",
    "channels",
    "format",
    "modality",
    "intensity_mean",
    "intensity_std",
    "intensity_p01",
    "intensity_p99",
    "latency_ms",
]

_lock = threading.Lock()


def image_statistics(array: np.ndarray, bit_depth: int) -> dict[str, float]:
    """Intensity statistics on [0, 1], scaled by the stored bit depth.

    Scaling by the nominal range (not min–max) keeps a change of exposure visible
    to drift detection, which is exactly what min–max scaling would hide.
    """
    arr = np.asarray(array, dtype=np.float32)
    lo = float(min(0.0, float(arr.min()) if arr.size else 0.0))
    top = float(2 ** int(bit_depth) - 1) if bit_depth and bit_depth > 0 else float(arr.max() or 1.0)
    scaled = np.clip((arr - lo) / max(top - lo, 1e-6), 0.0, 1.0)
    # A subsample keeps the cost flat for large images; 1M pixels give stable percentiles.
    flat = scaled.ravel()
    if flat.size > 1_000_000:
        flat = flat[:: flat.size // 1_000_000 + 1]
    p01, p99 = np.percentile(flat, [1.0, 99.0]) if flat.size else (0.0, 0.0)
    return {
        "intensity_mean": float(flat.mean()) if flat.size else 0.0,
        "intensity_std": float(flat.std()) if flat.size else 0.0,
        "intensity_p01": float(p01),
        "intensity_p99": float(p99),
    }


def log_path_for(log_dir: str | Path, when: datetime | None = None) -> Path:
    when = when or datetime.now(UTC)
    return Path(log_dir) / f"{LOG_PREFIX}{when:%Y-%m-%d}.jsonl"


def append_prediction(log_dir: str | Path, record: dict[str, Any]) -> Path:
    """Append one record (only the known, PHI-free columns) as a JSON line.

    Keys outside :data:`LOG_COLUMNS` are dropped on purpose: a caller can never
    leak an identifier into the log by passing a richer dict.
    """
    row = {k: record.get(k) for k in LOG_COLUMNS}
    if not row.get("timestamp"):
        row["timestamp"] = datetime.now(UTC).isoformat(timespec="milliseconds")
    path = log_path_for(log_dir)
    line = json.dumps(row, default=_json_default) + "\n"
    with _lock:
        path.parent.mkdir(parents=True, exist_ok=True)
        # One write() of a short line in append mode is atomic enough on POSIX
        # for several workers appending to the same file.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))
        finally:
            os.close(fd)
    return path


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_prediction_log(
    log_dir: str | Path, since: datetime | None = None, until: datetime | None = None
) -> pd.DataFrame:
    """All logged predictions under ``log_dir`` as a DataFrame (columns :data:`LOG_COLUMNS`).

    Broken lines (a crash mid-write) are skipped rather than failing the drift flow.
    ``timestamp`` is parsed to UTC datetimes; ``since``/``until`` filter on it.
    """
    rows: list[dict[str, Any]] = []
    for path in sorted(Path(log_dir).glob(f"{LOG_PREFIX}*.jsonl")):
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    df = pd.DataFrame(rows, columns=LOG_COLUMNS)
    df["timestamp"] = pd.to_datetime(df["timestamp"], utc=True, errors="coerce")
    if since is not None:
        df = df[df["timestamp"] >= _utc(since)]
    if until is not None:
        df = df[df["timestamp"] < _utc(until)]
    return df.reset_index(drop=True)


def _utc(t: datetime) -> pd.Timestamp:
    ts = pd.Timestamp(t)
    return ts.tz_convert("UTC") if ts.tzinfo else ts.tz_localize("UTC")
