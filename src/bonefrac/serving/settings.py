"""Serving settings: ``params.yaml``'s ``serving`` section when present, then environment overrides.

A container has no ``params.yaml``, a developer has one; both must work, and an
operator must be able to retune batching or limits without rebuilding, so every
value can be overridden by a ``BONEFRAC_*`` environment variable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServingSettings:
    model_name: str = "bonefrac"
    max_batch_size: int = 16
    max_latency_ms: int = 200
    max_upload_mb: float = 32.0
    max_pixels: int = 60_000_000
    backend: str = "auto"  # auto | torch | onnx
    api_key: str | None = None
    prediction_log_dir: str = "data/predictions"
    onnx_cache_dir: str | None = None
    workers: int = 1  # front-end processes; BONEFRAC_WORKERS

    @classmethod
    def load(cls, params_path: str | Path | None = None) -> ServingSettings:
        base = cls()
        path = Path(params_path) if params_path else Path(os.environ.get("BONEFRAC_PARAMS", "params.yaml"))
        values = {}
        if path.is_file():
            try:
                from bonefrac.config import load_params

                params = load_params(path)
                s = params.serving
                values = {
                    "model_name": s.model_name,
                    "max_batch_size": s.max_batch_size,
                    "max_latency_ms": s.max_latency_ms,
                    "max_upload_mb": s.max_upload_mb,
                    "max_pixels": s.max_pixels,
                    "backend": s.backend,
                    "workers": s.workers,
                    "prediction_log_dir": params.paths.predictions_log,
                }
            except Exception:  # a broken params file must not stop the clinic's service
                values = {}
        env = os.environ
        if "BONEFRAC_MAX_BATCH_SIZE" in env:
            values["max_batch_size"] = int(env["BONEFRAC_MAX_BATCH_SIZE"])
        if "BONEFRAC_MAX_LATENCY_MS" in env:
            values["max_latency_ms"] = int(env["BONEFRAC_MAX_LATENCY_MS"])
        if "BONEFRAC_MAX_UPLOAD_MB" in env:
            values["max_upload_mb"] = float(env["BONEFRAC_MAX_UPLOAD_MB"])
        if "BONEFRAC_MAX_PIXELS" in env:
            values["max_pixels"] = int(float(env["BONEFRAC_MAX_PIXELS"]))
        if "BONEFRAC_WORKERS" in env:
            values["workers"] = int(env["BONEFRAC_WORKERS"])
        if env.get("BONEFRAC_BACKEND"):
            values["backend"] = env["BONEFRAC_BACKEND"].strip().lower()
        if env.get("BONEFRAC_PREDICTION_LOG_DIR"):
            values["prediction_log_dir"] = env["BONEFRAC_PREDICTION_LOG_DIR"]
        if env.get("BONEFRAC_ONNX_CACHE"):
            values["onnx_cache_dir"] = env["BONEFRAC_ONNX_CACHE"]
        values["api_key"] = env.get("BONEFRAC_API_KEY") or None
        if values.get("backend", base.backend) not in ("auto", "torch", "onnx"):
            raise ValueError(f"BONEFRAC_BACKEND must be auto, torch or onnx, got {values['backend']!r}")
        if int(values.get("workers", base.workers)) < 1:
            raise ValueError(f"BONEFRAC_WORKERS must be at least 1, got {values['workers']!r}")
        # BentoML requires max_batch_size > 1.
        values["max_batch_size"] = max(2, int(values.get("max_batch_size", base.max_batch_size)))
        return cls(**{**base.__dict__, **values})
