"""Export a model bundle's network to ONNX, and check that ONNX Runtime agrees with PyTorch.

ONNX serves two purposes: a faster CPU path in the service (ONNX Runtime beats
eager PyTorch on small CNNs, see GUIDE.md numbers) and a portable artifact for edge
or mobile use. The export is only trusted after :func:`check_parity` shows the
same logits within a tolerance on real-shaped inputs.

The graph has two outputs: ``logits`` and ``embedding`` (the pooled features the head
reads, :func:`bonefrac.model.networks.forward_with_embedding`), so the service gets the
embedding its per-image out-of-distribution check needs from the same forward pass.

We use the TorchScript-based exporter (``dynamo=False``): it needs no extra
package (the torch.export-based one needs ``onnxscript``) and handles a dynamic
batch axis for the CNNs we ship.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bonefrac.atomic import atomic_path
from bonefrac.errors import BonefracError
from bonefrac.model.bundle import ModelBundle
from bonefrac.model.networks import forward_with_embedding

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
EMBEDDING_NAME = "embedding"
DEFAULT_OPSET = 17
#: Part of the cached file's name: an export of an older layout (one output) is never reused.
EXPORT_LAYOUT = "le2"


class OnnxExportError(BonefracError, RuntimeError):
    """The network could not be exported, or ONNX Runtime disagrees with PyTorch."""


class LogitsAndEmbedding(nn.Module):
    """``model`` with a second output, its embedding (what is exported)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return forward_with_embedding(self.model, x)


def input_shape(bundle: ModelBundle, batch: int = 1) -> tuple[int, ...]:
    """The (N, 1, ...) input shape the bundle's preprocessing produces."""
    return (batch, *bundle.preprocess_spec.input_shape)


def export_onnx(
    model: nn.Module, path: str | Path, example: torch.Tensor, opset: int = DEFAULT_OPSET
) -> Path:
    """Export ``model`` (eval mode, CPU) with a dynamic batch axis and both outputs; written atomically."""
    model = model.eval().cpu()
    try:
        with atomic_path(path) as tmp, warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
            torch.onnx.export(
                LogitsAndEmbedding(model).eval(),
                (example.cpu(),),
                str(tmp),
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME, EMBEDDING_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}, EMBEDDING_NAME: {0: "batch"}},
                opset_version=opset,
                do_constant_folding=True,
            )
    except Exception as err:
        raise OnnxExportError(f"ONNX export of {type(model).__name__} failed: {err}") from err
    return Path(path)


def onnx_session(path: str | Path, threads: int | None = None, allow_spinning: bool = False):
    """A CPU ONNX Runtime session (``onnxruntime.InferenceSession``).

    ``threads`` caps intra-op threads (None = ORT default). Spinning is off by
    default: ORT's idle worker threads otherwise busy-wait between runs, and in
    the service they burn the cores the front end needs for decoding (measured
    with ``python -m benchmarks.service``; BENCHMARKS.md, Service).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not allow_spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def check_parity(
    model: nn.Module, onnx_path: str | Path, inputs: torch.Tensor, atol: float = 1e-4, rtol: float = 1e-3
) -> float:
    """Run both on ``inputs``; return the max absolute logit difference or raise if out of tolerance.

    The embedding output is checked too, relative to its own scale (features are not logits:
    they can be large), so the OOD check sees the same vector on either runtime.
    """
    with torch.inference_mode():
        logits, emb = forward_with_embedding(model.eval().cpu(), inputs.cpu())
        expected, expected_emb = logits.float().numpy(), emb.float().flatten(1).numpy()
    got, got_emb = onnx_session(onnx_path).run(
        [OUTPUT_NAME, EMBEDDING_NAME], {INPUT_NAME: inputs.cpu().numpy().astype(np.float32)}
    )
    if got.shape != expected.shape or got_emb.shape != expected_emb.shape:
        raise OnnxExportError(
            f"ONNX output shapes {got.shape}, {got_emb.shape} differ from PyTorch's {expected.shape}, "
            f"{expected_emb.shape}"
        )
    diff = float(np.max(np.abs(got - expected))) if got.size else 0.0
    if not np.allclose(got, expected, atol=atol, rtol=rtol):
        raise OnnxExportError(f"ONNX Runtime disagrees with PyTorch: max |Δlogit| = {diff:.2e} (atol {atol})")
    scale = max(float(np.max(np.abs(expected_emb))) if expected_emb.size else 0.0, 1.0)
    if not np.allclose(got_emb, expected_emb, atol=atol * scale, rtol=rtol):
        emb_diff = float(np.max(np.abs(got_emb - expected_emb)))
        raise OnnxExportError(f"ONNX Runtime disagrees with PyTorch on the embedding: max |Δ| = {emb_diff:.2e}")
    return diff


def export_bundle(
    bundle: ModelBundle, path: str | Path, parity_batch: int = 4, atol: float = 1e-4, seed: int = 0
) -> tuple[Path, float]:
    """Export a bundle's network and verify parity on random inputs in [0, 1].

    Returns (path, max |Δlogit|). A batch of several images also exercises the
    dynamic batch axis, which a batch of one would not.
    """
    model = bundle.build_model()
    gen = torch.Generator().manual_seed(seed)
    example = torch.rand(input_shape(bundle, 1), generator=gen)
    try:
        out = export_onnx(model, path, example)
        probe = torch.rand(input_shape(bundle, parity_batch), generator=gen)
        diff = check_parity(model, out, probe, atol=atol)
    except OnnxExportError as err:  # name the architecture and the way out
        raise OnnxExportError(
            f"{bundle.arch} ({bundle.spatial_dims}D) cannot be served through ONNX Runtime: {err}. "
            "Serve it with PyTorch (BONEFRAC_BACKEND=torch, or auto, which falls back to it)"
        ) from err
    return out, diff
