"""The one path from pixels to a calibrated, thresholded prediction.

Evaluation, ``bonefrac predict`` and the BentoML service all call
:class:`Predictor`, so preprocessing (``preprocess_array`` with the bundle's
settings), temperature scaling (``sigmoid(logit / T)``), the decision rule at
each stored operating point (``prob >= threshold``) and the fracture-type
softmax are written once and cannot drift apart between the report and the
clinic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bonefrac.errors import BonefracError
from bonefrac.evaluation.calibration import apply_temperature
from bonefrac.evaluation.operating_points import apply_threshold
from bonefrac.inference.bundle import ModelBundle
from bonefrac.preprocess.transforms import preprocess_array


class PredictionError(BonefracError, ValueError):
    """Input the model cannot take (wrong shape or channel count, non-finite values)."""


@dataclass
class PredictionBatch:
    """Per-image outputs; all arrays have N rows."""

    logit: np.ndarray  # (N,) raw fracture logit
    prob: np.ndarray  # (N,) calibrated probability sigmoid(logit / temperature)
    type_probs: np.ndarray | None  # (N, T) softmax over fracture types, None without a type head
    decisions: dict[str, np.ndarray] = field(default_factory=dict)  # operating point -> (N,) bool

    def __len__(self) -> int:
        return int(self.logit.shape[0])

    @property
    def raw_prob(self) -> np.ndarray:
        """Uncalibrated ``sigmoid(logit)`` (for reliability diagrams "before")."""
        return apply_temperature(self.logit, 1.0)


def type_probabilities(type_logits: np.ndarray) -> np.ndarray:
    """A fracture has one type: softmax over the type logits (columns 1.. of the output)."""
    t = torch.as_tensor(np.asarray(type_logits, dtype=np.float32))
    return torch.softmax(t, dim=1).double().numpy()


def _head_linear(model: nn.Module) -> nn.Linear:
    head = getattr(model, "head", None)
    search = head if isinstance(head, nn.Module) else model
    linears = [m for m in search.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise PredictionError("cannot find the classifier's linear layer to take embeddings from")
    return linears[-1]


class Predictor:
    """A model bundle made ready to predict: network rebuilt, eval mode, on ``device``."""

    def __init__(
        self,
        bundle: ModelBundle,
        device: str = "cpu",
        model: nn.Module | None = None,
        batch_size: int = 32,
    ) -> None:
        """``model`` overrides ``bundle.build_model()`` (tests, or a network already in memory)."""
        self.bundle = bundle
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        net = model if model is not None else bundle.build_model()
        self.model: nn.Module = net.to(self.device).eval()

    @classmethod
    def from_path(cls, path: str | Path, device: str = "cpu") -> Predictor:
        return cls(ModelBundle.load(path), device=device)

    # ------------------------------------------------------------ helpers
    @property
    def spatial_dims(self) -> int:
        return int(self.bundle.spatial_dims)

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x)
        want = 2 + self.spatial_dims
        if x.ndim != want or x.shape[1] != 1:
            shape = "(N, 1, H, W)" if self.spatial_dims == 2 else "(N, 1, D, H, W)"
            raise PredictionError(f"expected a batch shaped {shape}, got {tuple(x.shape)}")
        x = x.to(torch.float32)
        if not torch.isfinite(x).all():
            raise PredictionError("input contains NaN or infinite values")
        return x

    def _batches(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x[i : i + self.batch_size] for i in range(0, x.shape[0], self.batch_size)] or [x]

    @torch.inference_mode()
    def logits(self, x: torch.Tensor) -> np.ndarray:
        """Raw network output (N, 1 + T), computed in batches."""
        x = self._check_input(x)
        outs = [self.model(b.to(self.device)).float().cpu() for b in self._batches(x)]
        out = torch.cat(outs).numpy()
        return out[:, None] if out.ndim == 1 else out

    # ------------------------------------------------------------- public
    def from_logits(self, logits: np.ndarray) -> PredictionBatch:
        """Apply the bundle's temperature, operating points and type softmax to raw logits."""
        logits = np.asarray(logits, dtype=np.float64)
        if logits.ndim == 1:
            logits = logits[:, None]
        fracture = logits[:, 0]
        prob = apply_temperature(fracture, float(self.bundle.temperature))
        decisions = {name: apply_threshold(prob, t) for name, t in self.bundle.operating_points.items()}
        type_probs = type_probabilities(logits[:, 1:]) if logits.shape[1] > 1 else None
        return PredictionBatch(logit=fracture, prob=prob, type_probs=type_probs, decisions=decisions)

    def predict_tensor(self, x: torch.Tensor) -> PredictionBatch:
        """Preprocessed batch ``(N, 1, ...)`` on [0, 1] → calibrated predictions."""
        return self.from_logits(self.logits(x))

    def preprocess(self, array: np.ndarray) -> torch.Tensor:
        """One decoded image/volume in stored units → the ``(1, ...)`` tensor the model was trained on."""
        pp = self.bundle.preprocess
        if "image_size" not in pp:
            raise PredictionError("the model bundle has no preprocessing settings (preprocess.image_size)")
        kwargs = {k: pp[k] for k in ("volume_size", "lower_percentile", "upper_percentile") if k in pp}
        if "volume_size" in kwargs:
            kwargs["volume_size"] = tuple(kwargs["volume_size"])
        try:
            return preprocess_array(np.asarray(array), self.spatial_dims, int(pp["image_size"]), **kwargs)
        except ValueError as err:
            raise PredictionError(str(err)) from err

    def predict_arrays(self, arrays: Sequence[np.ndarray]) -> PredictionBatch:
        """Decoded arrays (H, W) or (D, H, W) in stored units → calibrated predictions."""
        if len(arrays) == 0:
            raise PredictionError("no images given")
        return self.predict_tensor(torch.stack([self.preprocess(a) for a in arrays]))

    @torch.inference_mode()
    def embed(self, x: torch.Tensor) -> np.ndarray:
        """Penultimate-layer features (N, F), for drift monitoring.

        Uses the model's ``features(x)`` when it has one (pooling any spatial
        axes left), otherwise the input of the classifier's last linear layer.
        """
        x = self._check_input(x)
        feats_fn = getattr(self.model, "features", None)
        outs: list[torch.Tensor] = []
        captured: list[torch.Tensor] = []
        hook = None
        if not callable(feats_fn):
            hook = _head_linear(self.model).register_forward_hook(
                lambda _m, inp, _out: captured.append(inp[0].detach())
            )
        try:
            for b in self._batches(x):
                b = b.to(self.device)
                if callable(feats_fn):
                    f = feats_fn(b)
                else:
                    captured.clear()
                    self.model(b)
                    f = captured[-1]
                if f.ndim > 2:
                    f = f.flatten(2).mean(-1)
                outs.append(f.float().cpu())
        finally:
            if hook is not None:
                hook.remove()
        return torch.cat(outs).numpy()
