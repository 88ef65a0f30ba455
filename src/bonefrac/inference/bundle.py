"""A trained model plus everything needed to use it safely: the model bundle.

MONAI bundles keep metadata with the weights; so does this. A bundle holds the
architecture name, the state_dict, the preprocessing settings, the calibration
temperature and the operating-point thresholds, the type names, and provenance
(metrics, params, data version, git commit). It is stored as a plain dict of
tensors and primitives so ``torch.load(weights_only=True)`` can read it: no
pickled modules, which is also what BentoML 1.4 with torch 2.14 needs.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bonefrac.atomic import atomic_write_bytes

BUNDLE_FORMAT = "bonefrac-bundle/1"


@dataclass
class ModelBundle:
    """Weights + metadata. ``operating_points`` maps a name to a threshold on the calibrated probability."""

    arch: str
    spatial_dims: int
    state_dict: dict[str, torch.Tensor]
    type_names: list[str] = field(default_factory=list)
    preprocess: dict[str, Any] = field(default_factory=dict)
    dropout: float = 0.0
    temperature: float = 1.0
    operating_points: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def num_types(self) -> int:
        return len(self.type_names)

    def build_model(self) -> nn.Module:
        """Rebuild the network and load the weights (no pretrained download)."""
        from bonefrac.training.models import build_model

        model = build_model(
            self.arch,
            num_types=self.num_types,
            pretrained="none",
            dropout=self.dropout,
            spatial_dims=self.spatial_dims,
        )
        model.load_state_dict(self.state_dict)
        model.eval()
        return model

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["format"] = BUNDLE_FORMAT
        d["state_dict"] = {k: v.detach().cpu() for k, v in self.state_dict.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelBundle:
        if d.get("format") != BUNDLE_FORMAT:
            raise ValueError(f"not a bonefrac model bundle (format={d.get('format')!r})")
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**fields)

    def save(self, path: str | Path) -> Path:
        """Write atomically: a crash never leaves a half-written model behind."""
        # Serialised in memory, not into the temp file: torch.save names the archive's
        # folder after the file, so a random temp name made every save different bytes.
        buf = io.BytesIO()
        torch.save(self.to_dict(), buf)
        return atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> ModelBundle:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"model bundle not found: {path}")
        return cls.from_dict(torch.load(path, map_location="cpu", weights_only=True))
