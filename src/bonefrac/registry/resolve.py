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
from bonefrac.model.bundle import BundleError, ModelBundle
from bonefrac.registry import store

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
        return {"name": self.name, "version": self.version, **self.bundle.describe()}


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
    except BundleError as err:
        raise ModelNotFoundError(str(err)) from None
    md = bundle.metadata or {}
    name = str(md.get("model_name") or md.get("name") or path.stem)
    version = str(md.get("version") or md.get("model_version") or _file_digest(path))
    return LoadedModel(bundle, name, version, f"file:{path}")


def _with_provenance(bundle: ModelBundle, tag: str) -> ModelBundle:
    """Fill the data version and git commit the registry recorded at registration."""
    recorded = store.get_record(tag).metadata
    for key in ("data_version", "git_commit"):
        if recorded.get(key) and not bundle.metadata.get(key):
            bundle.metadata[key] = recorded[key]
    return bundle


def load_tag(tag: str) -> LoadedModel:
    """A model-store entry ``name:version``."""
    try:
        bundle = _with_provenance(store.load_bundle(tag), tag)
    except (store.RegistryError, BundleError) as err:
        raise ModelNotFoundError(f"model {tag!r} not found in the model store: {err}") from None
    name, _, version = tag.partition(":")
    return LoadedModel(bundle, name, version or "latest", f"store:{tag}")


def load_embedded(tag: str) -> LoadedModel:
    """A model from BentoML's *active* model store: inside a Bento's container, the Bento's own.

    ``bentoml serve <bento>`` points BentoML's store at the models packed in the Bento
    (when it has any), so this finds the model the Bento was built with even where no
    registry exists. Provenance comes from the model's own metadata, written at registration.
    """
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        model = bentoml.models.get(tag)
    except NotFound:
        raise ModelNotFoundError(f"the Bento's model {tag!r} is in neither the Bento nor the model store") from None
    path = Path(model.path) / store.BUNDLE_FILE
    try:
        bundle = ModelBundle.load(path)
    except (FileNotFoundError, BundleError) as err:
        raise ModelNotFoundError(f"the Bento's model {tag!r} has no readable bundle: {err}") from None
    for key in ("data_version", "git_commit"):
        if model.info.metadata.get(key) and not bundle.metadata.get(key):
            bundle.metadata[key] = model.info.metadata[key]
    return LoadedModel(bundle, model.tag.name, str(model.tag.version), f"bento:{model.tag}")


def champion_tag(name: str = "bonefrac") -> str | None:
    """The registry champion's tag (``None`` without one): what ``bentoml build`` packs into the Bento."""
    try:
        rec = store.champion_record(name)
    except Exception:  # an unreadable store must not stop a service that was given a file
        return None
    return rec.tag if rec is not None else None


def load_champion(name: str = "bonefrac") -> LoadedModel:
    try:
        tag, bundle = store.get_champion(name)
        bundle = _with_provenance(bundle, tag)
    except (store.RegistryError, BundleError) as err:
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
