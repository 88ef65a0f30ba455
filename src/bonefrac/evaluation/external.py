"""External validation: score a trained model on a labelled dataset it never saw.

A hospital receiving a model checks it on its own data before trusting it. This
reads the data in any supported layout (:func:`bonefrac.data.sources.load_records`:
ImageFolder, CSV, FracAtlas, DICOM), decodes and preprocesses it with the bundle's
own stored settings, and hands it to the evaluation area's
:func:`bonefrac.evaluation.evaluate.evaluate_external`, which reports the full
metric suite with bootstrap CIs at the model's *stored* operating points and
calibration (nothing is refitted on this data), Grad-CAM localisation where boxes
exist, and the HTML report. Unreadable images are listed, not fatal.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bonefrac.errors import BonefracError
from bonefrac.model.bundle import ModelBundle

logger = logging.getLogger(__name__)


class ExternalValidationError(BonefracError):
    """The external dataset cannot be evaluated (no images, a single class, bad layout)."""


def _filter_body_parts(df: pd.DataFrame, include: list[str] | None, exclude: list[str] | None) -> pd.DataFrame:
    parts = df["body_part"].astype(str).str.lower()
    if include:
        df = df[parts.isin([p.lower() for p in include])]
        parts = df["body_part"].astype(str).str.lower()
    if exclude:
        df = df[~parts.isin([p.lower() for p in exclude])]
    return df


def build_external_cache(
    records: pd.DataFrame, cache_dir: Path, bundle: ModelBundle, max_pixels: int | None = 60_000_000
) -> tuple[Path, list[dict[str, str]]]:
    """Decode + preprocess every record with the bundle's settings into a cache folder.

    Uses the preprocess area's :func:`build_cache` (the pipeline's own path). Images
    that cannot be decoded are dropped from the index and returned as failures;
    ``width``/``height`` of the decoded images are added so boxes can be mapped.
    """
    from bonefrac.data.imageio import ImageDecodeError, read_image
    from bonefrac.inference.upload_policy import stored_size
    from bonefrac.preprocess.cache import INDEX_FILE, build_cache

    failures: dict[str, str] = {}
    sizes: dict[str, tuple[int, int]] = {}
    sd = int(bundle.spatial_dims)

    def read_fn(path: str) -> np.ndarray:
        try:
            img = read_image(
                path, max_pixels=max_pixels, expected_dims=sd, max_side_hint=bundle.preprocess_spec.decode_side_hint
            )
        except (ImageDecodeError, MemoryError) as err:
            failures[path] = str(err) or type(err).__name__
            # Placeholder row (dropped below); not constant, so windowing does not warn.
            shape = (8, 8) if sd == 2 else (4, 8, 8)
            return np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
        sizes[path] = stored_size(img)  # boxes are in stored pixels, also after a reduced-scale decode
        return img.array

    build_cache(records, cache_dir, bundle.preprocess_spec, read_fn=read_fn, workers=1)
    index = pd.read_csv(cache_dir / INDEX_FILE, keep_default_na=False)
    index["height"] = [sizes.get(str(p), (0, 0))[0] for p in index["path"]]
    index["width"] = [sizes.get(str(p), (0, 0))[1] for p in index["path"]]
    index = index[~index["path"].astype(str).isin(failures)]
    index.to_csv(cache_dir / INDEX_FILE, index=False)
    return cache_dir, [{"path": p, "error": e} for p, e in failures.items()]


def validate_external(
    source: str,
    root: str | Path,
    bundle: ModelBundle,
    model_label: tuple[str, str],
    out_dir: str | Path,
    *,
    manifest_csv: str | Path | None = None,
    include_body_parts: list[str] | None = None,
    exclude_body_parts: list[str] | None = None,
    n_bootstrap: int = 1000,
    ci_level: float = 0.95,
    gradcam_gallery: int = 6,
    max_images: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Evaluate ``bundle`` (named ``model_label`` = (name, version)) on the labelled data at ``root``.

    Writes the report to ``out_dir``; returns it (dict) plus ``external`` facts
    (counts, failures). The caller resolves which model (file, tag, champion).
    """
    from bonefrac.data.sources import load_records
    from bonefrac.evaluation.evaluate import evaluate_external

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name, version = model_label
    records = load_records(
        source,
        Path(root),
        manifest_csv=Path(manifest_csv) if manifest_csv else None,
        use_fracture_types=bool(bundle.type_names),
        deid_dir=out / "deid",
    )
    records = _filter_body_parts(records, include_body_parts, exclude_body_parts)
    # Rows refused at intake (unknown sub-folder, burned-in annotation, path outside the root)
    # are not read; they count as unreadable with their reason (no file name in it).
    intake_error = records["intake_error"] if "intake_error" in records.columns else None
    refused = (
        []
        if intake_error is None
        else [{"path": r["image_id"], "error": r["intake_error"]} for _, r in records[intake_error != ""].iterrows()]
    )
    if intake_error is not None:
        records = records[intake_error == ""]
    if max_images is not None and len(records) > max_images:
        # Stratified subsample keeps both classes; seeded for repeatability.
        records = (
            records.groupby("label", group_keys=False)
            .sample(frac=max_images / len(records), random_state=seed)
            .sort_index()
        )
    if records.empty:
        raise ExternalValidationError(f"no labelled images found in {root} (source {source})")
    cache_dir = out / "_cache"
    try:
        _, failures = build_external_cache(records.reset_index(drop=True), cache_dir, bundle)
        failures = refused + failures
        from bonefrac.preprocess.cache import load_cache

        _, index = load_cache(cache_dir)
        labels = set(index["label"].astype(int))
        if labels != {0, 1}:
            raise ExternalValidationError(
                "external data needs both classes to measure sensitivity and specificity; "
                f"found labels {sorted(labels)}"
            )
        # The model file the evaluation area reads: the resolved bundle, whatever its origin.
        model_path = out / "_model.pt"
        bundle.save(model_path)
        report = evaluate_external(
            model_path,
            cache_dir,
            out,
            n_bootstrap=n_bootstrap,
            ci_level=ci_level,
            gradcam_gallery=gradcam_gallery,
            seed=seed,
            title=f"External validation of {name} {version} on {source} data",
        )
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
        (out / "_model.pt").unlink(missing_ok=True)
    facts = {
        "source": source,
        "model": {"name": name, "version": version},
        "n_records": len(records) + len(refused),
        "n_evaluated": len(records) + len(refused) - len(failures),
        "n_unreadable": len(failures),
        "unreadable": failures[:50],
        "recalibrated": False,
        "operating_points": dict(bundle.operating_points),
        "calibration": bundle.calibration.describe(),
    }
    (out / "external.json").write_text(json.dumps(facts, indent=2))
    report = dict(report)
    report["external"] = facts
    return report
