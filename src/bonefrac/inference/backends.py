"""Interchangeable runners from a preprocessed batch to logits: eager PyTorch or ONNX Runtime.

Both take a float32 array ``(N, 1, ...)`` on [0, 1] and return float32 logits
``(N, 1 + T)``, so the service and ``bonefrac predict`` do not care which one runs;
``with_embedding`` also returns the model's embedding ``(N, F)`` from the same pass
(the service's per-image out-of-distribution check projects it on the drift PCA).
Which one is used is decided by measurement (:func:`select_backend`): on a GPU,
PyTorch on CUDA; on CPU, ONNX Runtime only where it is measurably faster than
eager PyTorch on this machine and this model, and only after a parity check shows
the same logits. ``preference`` ("torch" | "onnx") overrides the measurement.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import nn

from bonefrac.model.bundle import ModelBundle

logger = logging.getLogger(__name__)

BackendName = Literal["auto", "torch", "onnx"]


class LogitRunner(Protocol):
    name: str
    device: str

    def __call__(self, x: np.ndarray) -> np.ndarray: ...

    def with_embedding(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class TorchRunner:
    """Eager PyTorch in inference mode."""

    name = "torch"

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu") -> None:
        self.device = str(device)
        self.model = model.eval().to(self.device)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            t = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32), device=self.device)
            return self.model(t).float().cpu().numpy()

    def with_embedding(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from bonefrac.model.networks import forward_with_embedding

        with torch.inference_mode():
            t = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32), device=self.device)
            logits, emb = forward_with_embedding(self.model, t)
            return logits.float().cpu().numpy(), emb.float().flatten(1).cpu().numpy()


class OnnxRunner:
    """ONNX Runtime on CPU, from an exported model file."""

    name = "onnx"
    device = "cpu"

    def __init__(self, onnx_path: str | Path, threads: int | None = None) -> None:
        from bonefrac.inference.onnx_export import EMBEDDING_NAME, INPUT_NAME, OUTPUT_NAME, onnx_session

        self.path = Path(onnx_path)
        self.session = onnx_session(self.path, threads=threads)
        self._input, self._output, self._embedding = INPUT_NAME, OUTPUT_NAME, EMBEDDING_NAME
        if EMBEDDING_NAME not in {o.name for o in self.session.get_outputs()}:
            raise RuntimeError(f"{self.path.name} has no {EMBEDDING_NAME!r} output: export it again")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        return self.session.run([self._output], {self._input: x})[0].astype(np.float32, copy=False)

    def with_embedding(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(x, dtype=np.float32)
        logits, emb = self.session.run([self._output, self._embedding], {self._input: x})
        return logits.astype(np.float32, copy=False), emb.astype(np.float32, copy=False)


@dataclass
class BackendChoice:
    """The runner in use and why: surfaced in the service's ``/metadata``."""

    runner: LogitRunner
    reason: str
    timings_ms_per_image: dict[str, float] = field(default_factory=dict)
    parity_max_abs_diff: float | None = None

    @property
    def name(self) -> str:
        return self.runner.name

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.runner.name,
            "device": self.runner.device,
            "reason": self.reason,
            "timings_ms_per_image": {k: round(v, 3) for k, v in self.timings_ms_per_image.items()},
            "parity_max_abs_diff": self.parity_max_abs_diff,
        }


def time_runner(runner: LogitRunner, x: np.ndarray, repeats: int = 3, warmup: int = 1) -> float:
    """Median milliseconds per image over ``repeats`` runs of the batch ``x``."""
    for _ in range(warmup):
        runner(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        runner(x)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1000.0 / max(len(x), 1)


def bundle_digest(bundle: ModelBundle) -> str:
    """A short content hash of the weights: the ONNX cache key (a new model re-exports)."""
    h = hashlib.sha256(bundle.arch.encode())
    for k in sorted(bundle.state_dict):
        v = bundle.state_dict[k]
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def select_backend(
    bundle: ModelBundle,
    preference: BackendName = "auto",
    device: str | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 8,
    threads: int | None = None,
    model: nn.Module | None = None,
) -> BackendChoice:
    """Pick the runner for ``bundle`` (see module docstring); "auto" never fails: it falls back to torch."""
    from bonefrac.inference.onnx_export import EXPORT_LAYOUT, OnnxExportError, export_bundle, input_shape

    device = device or default_device()
    model = model if model is not None else bundle.build_model()
    torch_runner = TorchRunner(model, device)
    if preference == "torch":
        return BackendChoice(torch_runner, "requested (torch)")
    if device.startswith("cuda") and preference == "auto":
        return BackendChoice(torch_runner, "GPU present: PyTorch on CUDA")

    cache = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "bonefrac-onnx"
    onnx_path = cache / f"{bundle.arch}-{bundle_digest(bundle)}-{EXPORT_LAYOUT}.onnx"
    try:
        onnx_path, diff = export_bundle(bundle, onnx_path)
        onnx_runner = OnnxRunner(onnx_path, threads=threads)
    except (OnnxExportError, ImportError, RuntimeError) as err:
        if preference == "onnx":
            raise
        logger.warning("ONNX backend unavailable, using PyTorch: %s", err)
        return BackendChoice(torch_runner, f"ONNX export failed: {err}")
    if preference == "onnx":
        return BackendChoice(onnx_runner, "requested (onnx)", parity_max_abs_diff=diff)

    x = np.random.default_rng(0).random(input_shape(bundle, batch_size), dtype=np.float32)
    timings = {"torch": time_runner(torch_runner, x), "onnx": time_runner(onnx_runner, x)}
    faster = onnx_runner if timings["onnx"] < timings["torch"] else torch_runner
    reason = (
        f"measured on CPU, batch {batch_size}: onnx {timings['onnx']:.2f} ms/img, "
        f"torch {timings['torch']:.2f} ms/img"
    )
    return BackendChoice(faster, reason, timings, parity_max_abs_diff=diff)
