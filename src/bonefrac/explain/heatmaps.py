"""Which map a model is explained by: its own evidence map, or Grad-CAM.

A network that pools its fracture score from a map of its own (the dense archs,
:class:`bonefrac.model.dense.DenseFractureNet`, which have an ``evidence_map(x)``
method) is shown *that* map: the per-cell fracture probability (the sigmoid of its
logit map, through :func:`bonefrac.model.calibrate.sigmoid`), upsampled to the input.
It is the model's evidence, trained against the radiologists' boxes, not a post-hoc
guess. Every other network gets Grad-CAM (and Grad-CAM++ in the report). The viewer,
``/explain``, ``bonefrac predict --gradcam`` and the evaluation report all ask here,
so the choice is made by the network's capability, never by its arch name.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bonefrac.model.calibrate import sigmoid

EVIDENCE = "evidence_map"
GRADCAM = "gradcam"
GRADCAM_PP = "gradcam++"

#: How each map is named in reports and API answers.
LABELS = {EVIDENCE: "model's own map", GRADCAM: "Grad-CAM", GRADCAM_PP: "Grad-CAM++"}


def has_evidence_map(model: nn.Module) -> bool:
    """True when the network produces its own localisation map (``evidence_map(x)``)."""
    return callable(getattr(model, "evidence_map", None))


def map_methods(model: nn.Module) -> list[str]:
    """The maps the report shows for ``model``: its own map, or Grad-CAM and Grad-CAM++."""
    return [EVIDENCE] if has_evidence_map(model) else [GRADCAM, GRADCAM_PP]


@torch.no_grad()
def evidence_heatmaps(model: nn.Module, x: torch.Tensor, batch_size: int = 8) -> np.ndarray:
    """``(N, H, W)`` per-cell fracture probabilities on [0, 1], bilinearly upsampled to ``x``'s size.

    Not rescaled per image (unlike Grad-CAM): a confident normal image stays dark.
    """
    x = torch.as_tensor(x).float()
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"expected a batch shaped (N, 1, H, W), got {tuple(x.shape)}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        for i in range(0, x.shape[0], batch_size):
            z = model.evidence_map(x[i : i + batch_size].to(device)).float().cpu()
            p = torch.from_numpy(sigmoid(z.numpy()).astype(np.float32))
            out.append(F.interpolate(p, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0])
    finally:
        model.train(was_training)
    return torch.cat(out).clamp(0.0, 1.0).numpy()


def heatmaps(model: nn.Module, x: torch.Tensor, method: str = GRADCAM, layer: str | None = None) -> np.ndarray:
    """Maps ``(N, *spatial)`` on [0, 1] for a preprocessed batch: ``method`` is ``evidence_map``,
    ``gradcam`` or ``gradcam++``; a model with its own map always answers with it."""
    if has_evidence_map(model) or method == EVIDENCE:
        return evidence_heatmaps(model, x)
    from bonefrac.explain.gradcam import compute_cams

    return compute_cams(model, x, method=method, layer=layer)  # type: ignore[arg-type]
