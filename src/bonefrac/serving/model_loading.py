"""Find the model to serve or to run: a bundle file, a model-store tag, or the champion.

Resolution order (the same for the service and ``bonefrac predict``):

1. an explicit ``source`` (CLI ``--model``): an existing ``.pt`` bundle path, or a
   BentoML model-store tag ``name:version``;
2. ``BONEFRAC_MODEL_PATH`` (a bundle file), so a container or a test can pin a model;
3. the champion in the BentoML model store (:func:`bonefrac.registry.store.get_champion`).

We load our own :class:`ModelBundle` (state_dict + metadata, ``weights_only``) rather than
``bentoml.pytorch.load_model``, which fails with torch 2.14 (GUIDE.md).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bonefrac.errors import BonefracError
from bonefrac.inference.bundle import ModelBundle

MODEL_PATH_ENV = "BONEFRAC_MODEL_PATH"


class ModelNotFoundError(BonefracError):
    """No model could be found where we were told to look."""


@dataclass(frozen=True)
class LoadedModel:
    bundle: ModelBundle
    name: str
    version: str
    source: str  # "file:<path>" or "store:<tag>"

    def describe(self) -> dict[str, Any]:
        """Public model facts (no paths): for responses, CSV rows and /metadata."""
        md = self.bundle.metadata or {}
        return {
            "name": self.name,
            "version": self.version,
            "arch": self.bundle.arch,
            "spatial_dims": self.bundle.spatial_dims,
            "type_names": list(self.bundle.type_names),
            "temperature": float(self.bundle.temperature),
            "operating_points": {k: float(v) for k, v in self.bundle.operating_points.items()},
            "preprocess": dict(self.bundle.preprocess),
            "metrics": md.get("metrics", {}),
            "trained_at": md.get("created_at") or md.get("trained_at"),
            "data_version": md.get("data_version"),
            "git_commit": md.get("git_commit"),
        }


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def load_file(path: str | Path) -> LoadedModel:
    """A bundle file; its version is the bundle's own or a content hash (stable per file)."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"model bundle not found: {path}")
    try:
        bundle = ModelBundle.load(path)
    except (ValueError, RuntimeError, OSError) as err:
        raise ModelNotFoundError(f"{path} is not a bonefrac model bundle: {err}") from None
    md = bundle.metadata or {}
    name = str(md.get("model_name") or md.get("name") or path.stem)
    version = str(md.get("version") or md.get("model_version") or _file_digest(path))
    return LoadedModel(bundle, name, version, f"file:{path}")


def _bundle_in_store_dir(model_dir: Path) -> Path:
    candidates = sorted(model_dir.rglob("*.pt"))
    if not candidates:
        raise ModelNotFoundError(f"no bundle (.pt) inside the model-store entry {model_dir.name}")
    return candidates[0]


def load_tag(tag: str) -> LoadedModel:
    """A model-store entry ``name:version`` (registry helper first, then the raw store)."""
    try:
        from bonefrac.registry import store  # written by the registry area

        for fn_name in ("load_bundle", "get_bundle", "load_model"):
            fn = getattr(store, fn_name, None)
            if fn is not None:
                out = fn(tag)
                bundle = out[1] if isinstance(out, tuple) else out
                if isinstance(bundle, ModelBundle):
                    name, _, version = str(out[0] if isinstance(out, tuple) else tag).partition(":")
                    return LoadedModel(bundle, name, version or "latest", f"store:{tag}")
    except ImportError:
        pass
    import bentoml

    try:
        model = bentoml.models.get(tag)
    except Exception as err:  # bentoml raises its own NotFound
        raise ModelNotFoundError(f"model {tag!r} not found in the BentoML model store: {err}") from None
    loaded = load_file(_bundle_in_store_dir(Path(model.path)))
    return LoadedModel(loaded.bundle, model.tag.name, model.tag.version or "latest", f"store:{model.tag}")


def load_champion(name: str = "bonefrac") -> LoadedModel:
    try:
        from bonefrac.registry.store import get_champion
    except ImportError as err:
        raise ModelNotFoundError(
            f"no model given and the registry is unavailable ({err}); set {MODEL_PATH_ENV} or pass --model"
        ) from None
    try:
        tag, bundle = get_champion(name)
    except Exception as err:
        raise ModelNotFoundError(
            f"no champion model in the model store ({err}); "
            f"promote one, set {MODEL_PATH_ENV}, or pass --model"
        ) from None
    name, _, version = str(tag).partition(":")
    return LoadedModel(bundle, name, version or "latest", f"store:{tag}")


def resolve_model(source: str | Path | None = None, model_name: str = "bonefrac") -> LoadedModel:
    """Load the model named by ``source``, else ``$BONEFRAC_MODEL_PATH``, else the champion."""
    if source:
        p = Path(source)
        if p.exists() or str(source).endswith(".pt"):
            return load_file(p)
        return load_tag(str(source))
    env = os.environ.get(MODEL_PATH_ENV)
    if env:
        return load_file(env)
    return load_champion(model_name)
