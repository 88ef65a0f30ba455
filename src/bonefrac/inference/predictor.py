"""A model bundle made ready to run: the network rebuilt, in eval mode, on a device.

Preprocessing and calibration are the bundle's own (:meth:`ModelBundle.preprocess`,
:meth:`ModelBundle.calibrate`); this class adds only what needs the network:
batched forward passes and penultimate-layer embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from bonefrac.errors import BonefracError
from bonefrac.model.bundle import ModelBundle
from bonefrac.model.calibrate import Prediction
from bonefrac.model.transforms import PreprocessError


class PredictionError(BonefracError, ValueError):
    """Input the model cannot take (wrong shape or channel count, non-finite values)."""


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

    # ------------------------------------------------------------ helpers
    @property
    def spatial_dims(self) -> int:
        return int(self.bundle.spatial_dims)

    def check_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as float32 ``(N, 1, ...)`` for this model, all finite; else :class:`PredictionError`."""
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
        x = self.check_input(x)
        outs = [self.model(b.to(self.device)).float().cpu() for b in self._batches(x)]
        out = torch.cat(outs).numpy()
        return out[:, None] if out.ndim == 1 else out

    # ------------------------------------------------------------- public
    def predict_tensor(self, x: torch.Tensor) -> Prediction:
        """Preprocessed batch ``(N, 1, ...)`` on [0, 1] → calibrated predictions."""
        return self.bundle.calibrate(self.logits(x))

    def preprocess(self, array: np.ndarray) -> torch.Tensor:
        """One decoded image/volume in stored units → the ``(1, ...)`` tensor the model was trained on."""
        try:
            return self.bundle.preprocess(np.asarray(array))
        except PreprocessError as err:
            raise PredictionError(str(err)) from err

    def predict_arrays(self, arrays: Sequence[np.ndarray]) -> Prediction:
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
        x = self.check_input(x)
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
