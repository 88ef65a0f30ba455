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


def image_statistics(img: Any) -> dict[str, float]:
    """Intensity statistics of a :class:`~bonefrac.data.imageio.DecodedImage` on [0, 1].

    They must be computed exactly as ingest computes the training table's, or the
    drift flow would see drift that is only a difference in formulas: so the scaling
    is ingest's own (nominal value range, e.g. 0..65535 for 16 bits, not min–max,
    so a change of exposure stays visible), and the percentiles are p1/p99.
    """
    try:
        from bonefrac.data.metadata import scaled_intensities as scaled_fn  # ingest's scaling
    except ImportError:  # pragma: no cover - metadata module always ships with bonefrac
        scaled_fn = _scaled_fallback
    scaled = np.asarray(scaled_fn(img), dtype=np.float32)
    if scaled.size == 0:
        return {"intensity_mean": 0.0, "intensity_std": 0.0, "intensity_p01": 0.0, "intensity_p99": 0.0}
    p01, p99 = np.percentile(scaled, [1, 99])
    return {
        "intensity_mean": float(scaled.mean()),
        "intensity_std": float(scaled.std()),
        "intensity_p01": float(p01),
        "intensity_p99": float(p99),
    }


def image_fields(img: Any) -> dict[str, Any]:
    """The log's numbers about one decoded image: size as stored, format, intensity statistics.

    Taken while the pixels are in memory (the service drops them before the model call);
    the size is the stored one also when a JPEG was decoded at reduced scale.
    """
    from bonefrac.inference.upload_policy import stored_size

    arr = img.array
    height, width = stored_size(img)
    return {
        "width": int(width),
        "height": int(height),
        "depth": int(arr.shape[0]) if arr.ndim == 3 else 1,
        "bit_depth": img.bit_depth,
        "channels": img.channels,
        "format": img.format,
        "modality": img.modality,
        **image_statistics(img),
    }


def prediction_record(
    image: dict[str, Any],
    *,
    model_name: str,
    model_version: str,
    probability: float,
    logit: float,
    decisions: dict[str, Any],
    latency_ms: float | None = None,
) -> dict[str, Any]:
    """One log record (the :data:`LOG_COLUMNS`) for an image's :func:`image_fields` and its prediction.

    The one place a record is made, for the service and ``bonefrac predict --log-predictions``
    alike, so both write the same schema; only numbers about the pixels, no name or tag.
    """
    return {
        "model_name": model_name,
        "model_version": model_version,
        "probability": probability,
        "logit": logit,
        "decision_high_sensitivity": decisions.get("high_sensitivity"),
        "decision_high_specificity": decisions.get("high_specificity"),
        "latency_ms": latency_ms,
        **image,
    }


def _scaled_fallback(img: Any) -> np.ndarray:
    arr = np.asarray(img.array, dtype=np.float32).ravel()
    vr = (img.meta or {}).get("value_range")
    lo, hi = (
        (float(vr[0]), float(vr[1]))
        if vr
        else (float(np.percentile(arr, 0.5)), float(np.percentile(arr, 99.5)))
    )
    return np.clip((arr - lo) / max(hi - lo, 1e-6), 0.0, 1.0)


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
