"""The naive baseline the BentoML service is measured against: FastAPI + eager PyTorch, one image per request.

Same contract as the service's ``POST /predict`` (multipart ``file``), same decoding,
preprocessing and calibration (the pipeline's Predictor), but no batching, no ONNX
Runtime and the model call made on the event loop's worker thread one at a time.

    BONEFRAC_MODEL_PATH=models/model.pt uvicorn benchmarks.naive_fastapi:app --host 127.0.0.1 --port 3001
"""

from __future__ import annotations

import os
import threading
import time

import torch
from fastapi import FastAPI, File, HTTPException, UploadFile

from bonefrac.data.imageio import ImageDecodeError, read_image
from bonefrac.inference.predictor import Predictor
from bonefrac.model.bundle import ModelBundle

app = FastAPI(title="bonefrac naive baseline")
_predictor: Predictor | None = None
_lock = threading.Lock()  # eager PyTorch, one forward pass at a time, one image per pass


def predictor() -> Predictor:
    global _predictor
    if _predictor is None:
        _predictor = Predictor(ModelBundle.load(os.environ["BONEFRAC_MODEL_PATH"]),
                               device="cuda" if torch.cuda.is_available() else "cpu")
    return _predictor


@app.on_event("startup")
def _load() -> None:
    predictor()


@app.get("/readyz")
def readyz() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/predict")
def predict(file: UploadFile = File(...)) -> dict:
    t0 = time.perf_counter()
    try:
        img = read_image(
            file.file.read(),
            max_pixels=60_000_000,
            expected_dims=predictor().spatial_dims,
            max_side_hint=predictor().bundle.preprocess_spec.decode_side_hint,  # the contract's decode scale
        )
    except ImageDecodeError as err:
        raise HTTPException(status_code=422, detail=str(err)) from None
    with _lock:
        out = predictor().predict_arrays([img.array])
    return {
        "probability": float(out.prob[0]),
        "decisions": {k: bool(v[0]) for k, v in out.decisions.items()},
        "timing_ms": {"total": (time.perf_counter() - t0) * 1000},
    }
