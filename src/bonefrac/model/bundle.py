"""A trained model plus everything needed to use it safely: the model bundle.

MONAI bundles keep metadata and the deterministic transforms with the weights;
so does this. A bundle holds the architecture name and state_dict, the typed
preprocessing spec (:class:`PreprocessSpec`), the calibration map and the
operating-point thresholds, the type names, and provenance (metrics, params,
data version, git commit). Its three methods are the contract every stage uses:

    bundle.preprocess(array)   decoded pixels  -> the tensor the network was trained on
    bundle.calibrate(logits)   network output  -> calibrated probability, decisions, type probs
    bundle.decide(probs)       probabilities   -> decision at each named operating point

It is stored as a plain dict of tensors and primitives so ``torch.load(weights_only=True)``
can read it: no pickled modules, which is also what BentoML 1.4 with torch 2.14 needs.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from torch import nn

from bonefrac.atomic import atomic_write_bytes
from bonefrac.errors import BonefracError
from bonefrac.model.calibrate import CalibrationMap, Prediction, calibrate, decide
from bonefrac.model.transforms import PreprocessSpec

BUNDLE_FORMAT = "bonefrac-bundle/2"
#: Earlier formats this version reads (and upgrades in memory).
_FORMAT_1 = "bonefrac-bundle/1"


class BundleError(BonefracError, ValueError):
    """A file that is not a usable bonefrac model bundle; the message says how to get one."""


@dataclass
class ModelBundle:
    """Weights + the contract. ``operating_points`` maps a name to a threshold on the calibrated probability."""

    arch: str
    state_dict: dict[str, torch.Tensor]
    preprocess_spec: PreprocessSpec
    type_names: list[str] = field(default_factory=list)
    dropout: float = 0.0
    calibration: CalibrationMap = field(default_factory=CalibrationMap)
    operating_points: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def spatial_dims(self) -> int:
        return int(self.preprocess_spec.spatial_dims)

    @property
    def num_types(self) -> int:
        return len(self.type_names)

    # ------------------------------------------------------------ contract
    def preprocess(self, array: np.ndarray) -> torch.Tensor:
        """One decoded image (H, W) / volume (D, H, W) in stored units → ``(1, ...)`` float32 on [0, 1]."""
        return self.preprocess_spec.apply(array)

    def calibrate(self, logits: np.ndarray) -> Prediction:
        """Network output ``(N, 1 + T)`` → calibrated probability, decisions and type probabilities."""
        return calibrate(logits, self.calibration, self.operating_points)

    def decide(self, probs: np.ndarray) -> dict[str, np.ndarray]:
        """Calibrated probabilities → decision at each stored operating point."""
        return decide(probs, self.operating_points)

    def build_model(self) -> nn.Module:
        """Rebuild the network and load the weights (no pretrained download)."""
        from bonefrac.model.networks import build_model

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

    def describe(self) -> dict[str, Any]:
        """Public facts about the contract (no weights, no paths): /metadata, reports, registry."""
        md = self.metadata or {}
        return {
            "arch": self.arch,
            "spatial_dims": self.spatial_dims,
            "type_names": list(self.type_names),
            "preprocess": self.preprocess_spec.model_dump(mode="json"),
            "calibration": self.calibration.describe(),
            "operating_points": {k: float(v) for k, v in self.operating_points.items()},
            "metrics": md.get("metrics", {}),
            "trained_at": md.get("created_at") or md.get("trained_at"),
            "data_version": md.get("data_version"),
            "git_commit": md.get("git_commit"),
            "training_data": md.get("training_data"),
            # the per-image out-of-distribution reference fitted at evaluation (JSON), if any
            "ood": md.get("ood"),
        }

    @classmethod
    def from_description(cls, described: dict[str, Any]) -> ModelBundle:
        """A weightless bundle from :meth:`describe`: enough to preprocess, calibrate and decide.

        The service's front end runs in another process than the network; it gets
        the description over the wire and must apply exactly the same contract.
        """
        cal = {k: described["calibration"][k] for k in ("method", "slope", "intercept")}
        return cls(
            arch=str(described["arch"]),
            state_dict={},
            preprocess_spec=PreprocessSpec.model_validate(described["preprocess"]),
            type_names=list(described.get("type_names") or []),
            calibration=CalibrationMap.model_validate(cal),
            operating_points={k: float(v) for k, v in described["operating_points"].items()},
        )

    # ----------------------------------------------------------- storage
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": BUNDLE_FORMAT,
            "arch": self.arch,
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict.items()},
            "preprocess": self.preprocess_spec.model_dump(mode="json"),
            "type_names": list(self.type_names),
            "dropout": float(self.dropout),
            "calibration": self.calibration.model_dump(mode="json"),
            "operating_points": {k: float(v) for k, v in self.operating_points.items()},
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelBundle:
        fmt = d.get("format")
        if fmt == _FORMAT_1:
            d = _upgrade_format_1(d)
        elif fmt != BUNDLE_FORMAT:
            raise BundleError(
                f"not a bonefrac model bundle (format={fmt!r}, expected {BUNDLE_FORMAT!r}); "
                "rebuild it with `dvc repro` (train and evaluate stages)"
            )
        try:
            spec = PreprocessSpec.model_validate(d["preprocess"])
            calibration = CalibrationMap.model_validate(d.get("calibration") or {})
        except (ValidationError, KeyError) as err:
            raise BundleError(f"the model bundle's preprocessing or calibration is invalid: {err}") from None
        spec.check_version()
        return cls(
            arch=str(d["arch"]),
            state_dict=d["state_dict"],
            preprocess_spec=spec,
            type_names=list(d.get("type_names") or []),
            dropout=float(d.get("dropout", 0.0)),
            calibration=calibration,
            operating_points={k: float(v) for k, v in (d.get("operating_points") or {}).items()},
            metadata=dict(d.get("metadata") or {}),
        )

    def save(self, path: str | Path) -> Path:
        """Write atomically: a crash never leaves a half-written model behind.

        Serialised in memory, not into the temp file: ``torch.save`` names the archive's
        folder after the file it writes, so a random temp name made every save different bytes.
        """
        buf = io.BytesIO()
        torch.save(self.to_dict(), buf)
        return atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> ModelBundle:
        path = Path(path)
        if not path.is_file():
            raise BundleError(f"model bundle not found: {path}")
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for a file that is not a checkpoint
            raise BundleError(f"{path.name} is not a readable model bundle ({type(err).__name__})") from None
        if not isinstance(raw, dict):
            raise BundleError(f"{path.name} is not a bonefrac model bundle")
        return cls.from_dict(raw)


def _upgrade_format_1(d: dict[str, Any]) -> dict[str, Any]:
    """Format 1 stored an untyped preprocess dict beside ``spatial_dims`` and a temperature.

    Its transform was the one ``PREPROCESS_VERSION`` "1" names, so the upgrade is exact.
    """
    pre = {k: v for k, v in (d.get("preprocess") or {}).items() if k in PreprocessSpec.model_fields}
    pre.setdefault("version", "1")
    pre["spatial_dims"] = int(d.get("spatial_dims", 2))
    temperature = float(d.get("temperature", 1.0))
    calibration = CalibrationMap.from_temperature(temperature).model_dump(mode="json")
    if temperature == 1.0:
        calibration = CalibrationMap().model_dump(mode="json")
    return {**d, "format": BUNDLE_FORMAT, "preprocess": pre, "calibration": calibration}
