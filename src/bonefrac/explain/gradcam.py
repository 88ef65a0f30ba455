"""Grad-CAM and Grad-CAM++ heatmaps for the fracture logit (MONAI's implementations, 2D and 3D).

The target is always output column 0, the fracture logit: the map answers
"which regions raised the fracture score", whatever the type head says.
"""

from __future__ import annotations

import copy
from typing import Literal

import numpy as np
import torch
from monai.visualize import GradCAM, GradCAMpp
from torch import nn

from bonefrac.errors import BonefracError
from bonefrac.explain.overlay import overlay

__all__ = ["CamError", "compute_cams", "overlay"]

FRACTURE_CLASS = 0
CamMethod = Literal["gradcam", "gradcam++"]


class CamError(BonefracError, ValueError):
    """A heatmap that cannot be computed (unknown layer or method, bad input)."""


def _unit_per_sample(x: torch.Tensor) -> torch.Tensor:
    # MONAI's default_normalizer maps (min, max) to (1, 0), i.e. it *flips* the map
    # (documented in its docstring); we want hot = important, so scale to [0, 1].
    x = x.detach().float().cpu()
    flat = x.flatten(1)
    lo = flat.min(1).values.view(-1, *[1] * (x.ndim - 1))
    hi = flat.max(1).values.view(-1, *[1] * (x.ndim - 1))
    span = hi - lo
    return torch.where(span > 0, (x - lo) / span.clamp_min(1e-12), torch.zeros_like(x))


def resolve_layer(model: nn.Module, layer: str | None) -> str:
    """The layer to explain: ``layer`` or the model's own ``gradcam_layer``; must exist."""
    name = layer or getattr(model, "gradcam_layer", None)
    if not name:
        raise CamError("no Grad-CAM layer given and the model has no 'gradcam_layer' attribute")
    names = {n for n, _ in model.named_modules()}
    if name not in names:
        raise CamError(f"Grad-CAM layer {name!r} is not a module of the model")
    return str(name)


def compute_cams(
    model: nn.Module,
    x: torch.Tensor,
    method: CamMethod = "gradcam",
    layer: str | None = None,
    batch_size: int = 16,
) -> np.ndarray:
    """Heatmaps ``(N, *spatial)`` on [0, 1] (upsampled to the input size) for the fracture logit.

    ``x`` is a preprocessed batch ``(N, 1, H, W)`` or ``(N, 1, D, H, W)``. The
    model is copied first: MONAI registers hooks it never removes and switches
    in-place activations off, and neither should leak into the caller's model.
    """
    cls = {"gradcam": GradCAM, "gradcam++": GradCAMpp}.get(method)
    if cls is None:
        raise CamError(f"method must be 'gradcam' or 'gradcam++', got {method!r}")
    x = torch.as_tensor(x).detach().float()
    if x.ndim not in (4, 5) or x.shape[1] != 1:
        raise CamError(f"expected a batch shaped (N, 1, H, W) or (N, 1, D, H, W), got {tuple(x.shape)}")
    target = resolve_layer(model, layer)
    device = next(model.parameters()).device
    if cls is GradCAMpp:
        # MONAI 1.6's GradCAMpp multiplies the (B,) score by the (B, C, ...) gradient
        # without reshaping, which only broadcasts for B == 1: go one image at a time.
        batch_size = 1
    outs = []
    # Callers (the Predictor) may be inside torch.inference_mode(); CAMs need autograd,
    # and tensors (weights included) made under inference mode cannot join a graph.
    with torch.inference_mode(False), torch.enable_grad():
        net = copy.deepcopy(model).eval()
        for p in net.parameters():
            p.requires_grad_(True)  # a frozen backbone must still pass gradients back to the layer
        cam = cls(nn_module=net, target_layers=target, postprocessing=_unit_per_sample)
        for i in range(0, x.shape[0], batch_size):
            xb = x[i : i + batch_size].clone().to(device)
            outs.append(cam(xb, class_idx=FRACTURE_CLASS))
        del cam, net
    return torch.cat(outs)[:, 0].numpy()
