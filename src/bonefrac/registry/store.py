"""The BentoML model store as model registry.

Every trained model is kept (never overwritten) as a BentoML model whose folder
holds the bundle file and whose ``model.yaml`` holds its provenance: metrics,
params, data version (DVC hash), git commit and calibration (calibration map and
operating points). A ``stage`` label says what the model is to the service:

- ``challenger``: registered, not (yet) judged;
- ``champion``: the one model the service loads;
- ``rejected``: failed the promotion gate (reasons in the metadata);
- ``archived``: a former champion (a rollback target).

Why the BentoML store and not ``bentoml.pytorch.save_model``: with torch 2.14
``bentoml.pytorch.load_model`` fails (weights-only unpickling of a whole
module), so the store keeps the weights-only bundle file and the service
rebuilds the network from it (``ModelBundle.build_model``).

The store is resolved from ``BENTOML_HOME`` on every call (not once at import,
as BentoML's own container does), so tests and tools can point it elsewhere.

Every change of champion (promote, rollback) also rewrites one small file, the
**champion pointer** ``$BENTOML_HOME/.bonefrac-champion-<name>.json`` (atomically,
under the registry lock). A running service watches that one file (its mtime) instead
of re-reading every model's ``model.yaml``, and reloads when it names another model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from bonefrac.atomic import atomic_write_json
from bonefrac.errors import BonefracError

Stage = Literal["champion", "challenger", "rejected", "archived"]
STAGES: tuple[str, ...] = ("champion", "challenger", "rejected", "archived")
BUNDLE_FILE = "bundle.pt"
STAGE_LABEL = "stage"


class RegistryError(BonefracError):
    """The registry cannot do what was asked; the message names the model or tag."""


class NoChampionError(RegistryError):
    """No model carries the champion label yet."""


@dataclass
class ModelRecord:
    """One registered model as the registry sees it (no weights loaded)."""

    tag: str
    name: str
    version: str
    stage: str
    labels: dict[str, str]
    metadata: dict[str, Any]
    created: datetime
    path: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def bundle_path(self) -> Path:
        return self.path / BUNDLE_FILE


# ------------------------------------------------------------------ store access
def bentoml_home() -> Path:
    """``$BENTOML_HOME`` or BentoML's default (``~/bentoml``)."""
    return Path(os.environ.get("BENTOML_HOME") or Path.home() / "bentoml")


def _store() -> Any:
    # BentoML exposes no public constructor for a store at a chosen path; the
    # ``_model_store`` keyword of its public functions is the injection point.
    from bentoml._internal.models import ModelStore

    path = bentoml_home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return ModelStore(str(path))


@contextmanager
def _locked() -> Iterator[None]:
    """Serialise label changes: two flows promoting at once must not make two champions."""
    from filelock import FileLock

    home = bentoml_home()
    home.mkdir(parents=True, exist_ok=True)
    with FileLock(str(home / ".bonefrac-registry.lock"), timeout=60):
        yield


def _jsonable(value: Any) -> Any:
    """Metadata must be plain JSON types (BentoML validates them; ``None`` becomes "")."""

    def _clean(v: Any) -> Any:
        if isinstance(v, dict):
            return {str(k): _clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [_clean(x) for x in v]
        return "" if v is None else v

    return _clean(json.loads(json.dumps(value, default=str)))


def _record(model: Any) -> ModelRecord:
    info = model.info
    return ModelRecord(
        tag=str(model.tag),
        name=info.name,
        version=info.version,
        stage=info.labels.get(STAGE_LABEL, "challenger"),
        labels=dict(info.labels),
        metadata=dict(info.metadata),
        created=info.creation_time,
        path=Path(model.path),
    )


def _get(tag: str) -> Any:
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        return bentoml.models.get(tag, _model_store=_store())
    except NotFound:
        raise RegistryError(f"no model {tag!r} in the registry at {bentoml_home() / 'models'}") from None


def _set_labels(model: Any, **labels: str) -> None:
    # ModelInfo is a frozen attrs class but its labels dict is mutable, and
    # BentoML has no public "update labels" call: change the dict and rewrite
    # model.yaml (``flush``), which is the store's record of the model.
    model.info.labels.update({k: str(v) for k, v in labels.items()})
    model.flush()


def _set_metadata(model: Any, **entries: Any) -> None:
    model.info.metadata.update(_jsonable(entries))
    model.flush()


def champion_pointer_path(name: str) -> Path:
    """The file a running service watches: it names the current champion of ``name``."""
    return bentoml_home() / f".bonefrac-champion-{name}.json"


def _write_pointer(name: str, tag: str, why: str) -> None:
    atomic_write_json(champion_pointer_path(name), {"name": name, "tag": tag, "at": _now(), "why": why})


def read_champion_pointer(name: str) -> str | None:
    """The champion's tag as the pointer names it (``None``: no pointer, or unreadable mid-rename)."""
    try:
        data = json.loads(champion_pointer_path(name).read_text())
    except (OSError, ValueError):
        return None
    tag = data.get("tag") if isinstance(data, dict) else None
    return str(tag) if tag else None


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


# ---------------------------------------------------------------------- API
def register_model(
    bundle_path: str | Path,
    *,
    name: str,
    labels: dict[str, str] | None = None,
    metrics: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
    data_version: str | None = None,
    git_commit: str | None = None,
) -> str:
    """Store a bundle file as a new ``challenger`` model; return its tag (``name:version``).

    The same bundle file (by SHA-256) is registered only once: registering it
    again returns the existing tag, so a re-run of the retrain flow does not
    fill the store with copies. Calibration (the map, operating points) is
    read from the bundle itself, so it always matches the weights.
    """
    import bentoml

    from bonefrac.model.bundle import ModelBundle

    bundle_path = Path(bundle_path)
    try:
        bundle = ModelBundle.load(bundle_path)
    except (FileNotFoundError, ValueError) as err:
        raise RegistryError(f"cannot register {bundle_path}: {err}") from None
    sha = file_sha256(bundle_path)
    with _locked():
        for rec in list_models(name):
            if (
                rec.labels.get("bundle_sha256", "")[:16] == sha[:16]
                and rec.metadata.get("bundle_sha256") == sha
            ):
                return rec.tag
        all_labels = {
            STAGE_LABEL: "challenger",
            "bundle_sha256": sha[:16],
            "data_version": (data_version or "unknown")[:63],
            "git_commit": (git_commit or "unknown")[:12],
            "arch": bundle.arch,
            **(labels or {}),
        }
        metadata = _jsonable(
            {
                "bundle_sha256": sha,
                "metrics": metrics if metrics is not None else bundle.metadata.get("metrics", {}),
                "params": params or {},
                "data_version": data_version or "",
                "git_commit": git_commit or "",
                "calibration": {
                    **bundle.calibration.describe(),
                    "operating_points": bundle.operating_points,
                },
                "arch": bundle.arch,
                "spatial_dims": bundle.spatial_dims,
                "type_names": bundle.type_names,
                "registered_at": _now(),
                "history": [{"at": _now(), "stage": "challenger", "why": "registered"}],
            }
        )
        with bentoml.models.create(
            name, labels=all_labels, metadata=metadata, _model_store=_store()
        ) as model:
            shutil.copy2(bundle_path, Path(model.path) / BUNDLE_FILE)
            tag = str(model.tag)
    return tag


def list_models(name: str | None = None, stage: str | None = None) -> list[ModelRecord]:
    """Registered models (newest first), optionally only one name and/or one stage."""
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        models = bentoml.models.list(name, _model_store=_store())
    except NotFound:
        return []
    records = [_record(m) for m in models]
    if stage is not None:
        records = [r for r in records if r.stage == stage]
    return sorted(records, key=lambda r: r.created, reverse=True)


def get_record(tag: str) -> ModelRecord:
    return _record(_get(tag))


def champion_record(name: str) -> ModelRecord | None:
    """The champion's record, or ``None`` when no model has been promoted yet."""
    champions = list_models(name, stage="champion")
    return champions[0] if champions else None


def load_bundle(tag: str) -> Any:
    """The :class:`~bonefrac.model.bundle.ModelBundle` stored under ``tag``."""
    from bonefrac.model.bundle import ModelBundle

    path = Path(_get(tag).path) / BUNDLE_FILE
    if not path.exists():
        raise RegistryError(f"model {tag!r} has no {BUNDLE_FILE}; it was not registered by bonefrac")
    return ModelBundle.load(path)


def get_champion(name: str) -> tuple[str, Any]:
    """``(tag, ModelBundle)`` of the current champion; :class:`NoChampionError` if there is none."""
    rec = champion_record(name)
    if rec is None:
        raise NoChampionError(
            f"no champion for {name!r} in {bentoml_home() / 'models'}: "
            "run the retrain flow or `bonefrac promote`"
        )
    return rec.tag, load_bundle(rec.tag)


def _history(model: Any, stage: str, why: str) -> list[dict[str, str]]:
    hist = list(model.info.metadata.get("history", []))
    hist.append({"at": _now(), "stage": stage, "why": why})
    return hist


def promote(tag: str, *, reason: str = "promoted") -> str:
    """Make ``tag`` the champion; the previous one becomes ``archived``. Returns its tag (or "")."""
    with _locked():
        model = _get(tag)
        name = model.info.name
        previous = ""
        for rec in list_models(name, stage="champion"):
            if rec.tag == str(model.tag):
                continue
            old = _get(rec.tag)
            _set_labels(old, **{STAGE_LABEL: "archived"})
            _set_metadata(old, history=_history(old, "archived", f"replaced by {model.tag}"))
            previous = rec.tag
        _set_labels(model, **{STAGE_LABEL: "champion", "promoted_at": _now(), "rolled_back": "false"})
        _set_metadata(model, history=_history(model, "champion", reason), decision_reasons=[reason])
        _write_pointer(name, str(model.tag), reason)
    return previous


def reject(tag: str, reasons: list[str]) -> None:
    """Mark ``tag`` as rejected by the gate and keep the reasons in its metadata."""
    with _locked():
        model = _get(tag)
        if model.info.labels.get(STAGE_LABEL) == "champion":
            raise RegistryError(f"{tag} is the champion; roll back instead of rejecting it")
        _set_labels(model, **{STAGE_LABEL: "rejected"})
        _set_metadata(
            model, history=_history(model, "rejected", "; ".join(reasons)), decision_reasons=reasons
        )


def rollback(name: str) -> tuple[str, str]:
    """Put the previous champion back; the current one is archived (and never rolled back to).

    The previous champion is the archived model promoted most recently that was
    not itself rolled back. Returns ``(restored_tag, retired_tag)``.
    """
    with _locked():
        current = champion_record(name)
        if current is None:
            raise NoChampionError(f"no champion for {name!r}: nothing to roll back")
        candidates = [
            r
            for r in list_models(name, stage="archived")
            if r.labels.get("promoted_at") and r.labels.get("rolled_back") != "true"
        ]
        if not candidates:
            raise RegistryError(
                f"{current.tag} is the only model {name!r} ever promoted: no previous champion"
            )
        previous = max(candidates, key=lambda r: r.labels["promoted_at"])
        cur = _get(current.tag)
        _set_labels(cur, **{STAGE_LABEL: "archived", "rolled_back": "true"})
        _set_metadata(cur, history=_history(cur, "archived", f"rolled back to {previous.tag}"))
        prev = _get(previous.tag)
        _set_labels(prev, **{STAGE_LABEL: "champion", "restored_at": _now()})
        _set_metadata(prev, history=_history(prev, "champion", f"restored by rollback of {current.tag}"))
        _write_pointer(name, previous.tag, f"rollback of {current.tag}")
    return previous.tag, current.tag
