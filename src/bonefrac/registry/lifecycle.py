"""What follows a change of champion: monitoring is moved onto the new model.

The drift reference holds the champion's own scores and a PCA of *its* embedding;
a reference built for another model is wrong (its scores) or unusable (another
embedding width: "embeddings have 512 features but the PCA was fitted on 1280").
So every promotion and rollback rebuilds it (``bonefrac promote``, ``bonefrac
rollback``, the retrain flow), and the drift check rebuilds it too when the
reference it finds was made for another model (a promotion made by hand with an
older tool, or a rebuild that failed): monitoring always follows the registry.
"""

from __future__ import annotations

import json
from pathlib import Path

from bonefrac.config import Params, resolve
from bonefrac.monitoring.reference import META_JSON, build_reference
from bonefrac.registry import store

REFERENCE_DIR = "drift_reference"


def reference_dir(params: Params, root: str | Path | None = None) -> Path:
    """``<paths.models>/drift_reference``: where the drift check reads the reference."""
    return resolve(params.paths.models, root) / REFERENCE_DIR


def reference_model(ref_dir: str | Path) -> str | None:
    """The model tag the reference at ``ref_dir`` was built for (``None``: none, or not recorded)."""
    try:
        return json.loads((Path(ref_dir) / META_JSON).read_text()).get("model_tag") or None
    except (OSError, ValueError, AttributeError):
        return None


def refresh_drift_reference(
    params: Params,
    *,
    root: str | Path | None = None,
    name: str | None = None,
    ref_dir: str | Path | None = None,
    force: bool = False,
) -> str:
    """Make the drift reference the current champion's; returns what was done, in words.

    Nothing is rebuilt when the reference already names the champion (unless
    ``force``). Raises :class:`~bonefrac.registry.store.NoChampionError` without a
    champion, and the reference builder's errors (no cache, unreadable images).
    """
    name = name or params.serving.model_name
    champion = store.champion_record(name)
    if champion is None:
        raise store.NoChampionError(f"no champion for {name!r}: no drift reference to build")
    out = Path(ref_dir) if ref_dir is not None else reference_dir(params, root)
    if not force and reference_model(out) == champion.tag:
        return f"drift reference already built for {champion.tag}"
    ref = build_reference(
        resolve(params.paths.processed, root),
        out,
        bundle=store.load_bundle(champion.tag),
        embedding_dims=params.drift.embedding_dims,
        seed=params.seed,
        provenance={"model_tag": champion.tag},
    )
    return (
        f"drift reference rebuilt for {champion.tag}: {ref.meta['n_rows']} rows, "
        f"{ref.meta['embedding_dims']} embedding dims"
    )
